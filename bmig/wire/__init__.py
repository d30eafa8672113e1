"""The replication protocol between bmigrate (sender) and breceive (receiver).

The sender's end lives here (client.py: WireTarget; connect.py; options.py; urls.py),
both halves of the handshake (handshake.py), and what both ends share (protocol.py,
channel.py, seal.py, auth.py, codec.py, transports.py, ssh/); the receiver's session,
which also writes target devices, is bmig.receiver's. The package knows frames,
messages and connections; it never touches breqd, a source or a target device.
"""
