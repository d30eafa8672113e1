"""The replication protocol between bmigrate (sender) and breceive (receiver)."""
