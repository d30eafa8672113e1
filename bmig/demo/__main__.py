"""``python -m bmig.demo`` (what ``make demo`` runs)."""

import sys

from bmig.demo.story import main

sys.exit(main())
