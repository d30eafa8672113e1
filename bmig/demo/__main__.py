"""``python -m bmig.demo`` (what ``make demo`` runs). Importing it runs nothing."""

import sys

from bmig.demo.story import main

if __name__ == "__main__":
    sys.exit(main())
