"""The chain a request goes through: tracking on top, the backing file at the bottom."""
