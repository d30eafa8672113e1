"""bmig: keep a remote copy of a live Linux block device and move the workload to it."""

__version__ = "0.1.0"
