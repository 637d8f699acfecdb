"""The `mtad` command. Until issue 4 lands it only says so."""

import sys


def main() -> int:
    print("mtad: not yet available; see issue 4 (postroom serve says what runs)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
