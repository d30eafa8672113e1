"""bmigrate's sender: passes that ship dirty chunks, convergence, the catch-up service."""
