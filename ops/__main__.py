"""python -m ops up"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    command = argv[0] if argv else ""
    if command == "up":
        from ops import up

        up.main()
    else:
        sys.exit("usage: python -m ops up")


if __name__ == "__main__":
    main(sys.argv[1:])
