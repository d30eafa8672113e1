#!/usr/bin/env python3
"""Entry point of bmig-dm, the dm-era importer (installed as the `bmig-dm` command)."""

from bmig.cli.dm import main

if __name__ == "__main__":
    main()
