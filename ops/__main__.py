"""python -m ops up | health [HOST:PORT] | bootstrap DIR | gaps | parked | blocked | entity | status | watch | skip |
retry | webhooks ...  (`python -m ops --help`; docs/cli.md)"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    command = argv[0] if argv else ""
    if command == "up":
        from ops import up

        up.main()
    elif command == "bootstrap":
        from ops import bootstrap

        sys.exit(bootstrap.main(argv[1:]))
    elif command == "health" and len(argv) <= 2:
        from logistics.client.config import ClientConfig, ClientConfigError
        from ops import up

        try:
            config = ClientConfig.from_env()
        except ClientConfigError as exc:
            sys.exit(f"python -m ops health: {exc}")
        sys.exit(0 if up.is_serving(argv[1] if len(argv) == 2 else config.sequencer, config=config) else 1)
    else:
        from ops import cli

        sys.exit(cli.main(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
