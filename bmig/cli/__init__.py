"""Command-line interfaces: one module per command group, one error handler.

They parse and print; what a command does lives in bmig.sender, bmig.receiver,
bmig.tracker and bmig.nbd.
"""
