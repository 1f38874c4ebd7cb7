"""python -m ops up | health HOST:PORT"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    command = argv[0] if argv else ""
    if command == "up":
        from ops import up

        up.main()
    elif command == "health" and len(argv) == 2:
        from ops import up

        sys.exit(0 if up.is_serving(argv[1]) else 1)
    else:
        sys.exit("usage: python -m ops up | health HOST:PORT")


if __name__ == "__main__":
    main(sys.argv[1:])
