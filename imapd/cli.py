"""The `imapd` command. Until issue 5 lands it only says so."""

import sys


def main() -> int:
    print("imapd: not yet available; see issue 5 (postroom serve says what runs)", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
