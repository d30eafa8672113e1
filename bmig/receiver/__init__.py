"""breceive: writes what a sender ships to target devices."""
