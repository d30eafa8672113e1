"""breceive: writes what a sender ships to target devices.

It writes target devices and their records (bmig.lineage); it never reaches breqd or
a source. service.py listens, session.py runs one sender's session, opening.py decides
an OPEN, target.py holds the device.
"""
