import sys

from postroom.cli import main

sys.exit(main())
