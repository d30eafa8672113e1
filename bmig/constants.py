"""Units, device geometry, protocol versions, defaults and paths shared by the toolkit,
checked against each other at import.

Caps on what a peer or a file can make a component allocate are not here: they are in
bmig/limits.py (invariant 8), which imports this module; this one imports nothing.
"""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
TiB = 1024 * GiB

MIN_CHUNK_SIZE = 4 * KiB
MAX_CHUNK_SIZE = 16 * MiB
# 64 KiB: QEMU's default mirror granularity; 2 MiB of bitmap per TiB, and see
# docs/state-format.md for the measurement behind the choice.
DEFAULT_CHUNK_SIZE = 64 * KiB
# A device size the bitmap format can describe (2^63-1 bytes would overflow offset math
# in clients; 2^60 is far beyond any block device).
MAX_DEVICE_SIZE = 1 << 60
MAX_DEVICE_NAME = 64

# Control protocol (breqd).
# 2: MARK with "hold", MARK_COMPLETED releases holds, QUERY, held_bytes in the status.
# 3: CLAIM (a cutover takes the sender slot), the slot in the status.
CONTROL_PROTOCOL_VERSION = 3
# bmig-nbd lets go of a held chunk HOLD_IDLE seconds after its last write, found by a sweep
# every HOLD_IDLE / HOLD_IDLE_SWEEPS: so up to HOLD_IDLE * (1 + 1 / HOLD_IDLE_SWEEPS) late.
# A sender that finds only held chunks dirty waits that long before it ships them again.
HOLD_IDLE = 2.0
HOLD_IDLE_SWEEPS = 4

# Synchronous replication (bmigrate replicate, bmig-nbd): what a write's reply waits for,
# and what happens when the target fails (bmigrate(1) has both in full).
REPLICATION_PROTOCOLS = ("A", "B", "C")
REPLICATION_POLICIES = ("degrade", "block")

DEFAULT_STATE_DIR = "/var/lib/bmig"
DEFAULT_CONFIG_DIR = "/etc/bmig/devices.d"
DEFAULT_CONTROL_SOCKET = "/run/bmig/breqd.sock"
DEFAULT_RECEIVER_STATE_DIR = "/var/lib/bmig/targets"
DEFAULT_RECEIVER_CONFIG = "/etc/bmig/breceive.toml"
# Where bmigrate run publishes its state for bmigrate status (bmig/sender/statusfile.py).
DEFAULT_STATUS_DIR = "/run/bmig/migrate"

assert MIN_CHUNK_SIZE <= DEFAULT_CHUNK_SIZE <= MAX_CHUNK_SIZE
