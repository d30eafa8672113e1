#!/usr/bin/env python3
"""Entry point of bmig-nbd, the tracking NBD server (installed as the `bmig-nbd` command)."""

from bmig.cli.nbd import main

if __name__ == "__main__":
    main()
