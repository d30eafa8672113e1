"""bmigrate's sender: passes that ship dirty chunks, convergence, the catch-up service.

It reads the source, talks to breqd (through LockedTracker) and reaches targets only
through bmig.wire (breceive) or bmig.nbdclient (NBD servers); it never writes the source.
settings.py turns flags and migration files into a Migration; bmig.cli parses and prints.
"""
