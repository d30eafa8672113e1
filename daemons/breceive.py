#!/usr/bin/env python3
"""Entry point of breceive, the receiving daemon (installed as the `breceive` command)."""

from bmig.cli.breceive import main

if __name__ == "__main__":
    main()
