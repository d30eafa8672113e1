"""Command-line interfaces: one module per command group, one error handler."""
