"""The `pop3d` command. Until issue 6 lands it only says so."""

import sys


def main() -> int:
    print("pop3d: not yet available; see issue 6 (postroom serve says what runs)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
