#!/usr/bin/env python3
"""Entry point of breqd, the dirty-bitmap daemon (installed as the `breqd` command)."""

from bmig.cli.breqd import main

if __name__ == "__main__":
    main()
