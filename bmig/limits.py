"""Invariant 8 (bounded memory): every cap on what a peer or a file can make a component
allocate, in one place, checked against each other at import.

A peer (a control client, a wire sender or receiver, an NBD client or server, an SSH
server) or a file (settings, secrets, keys, state records, sysfs) decides lengths and
counts; each component checks them against a cap here before it allocates. Where two
caps depend on each other (a message must fit the frame that carries it, a reply's runs
must fit one message, one component must not ask more of another than the other allows)
``relations`` says so with the reason, and ``check`` refuses to import a set of caps that
breaks one (an AssertionError that names the reason; raised, not asserted, so ``python
-O`` keeps it). tests/unit/test_limits.py also checks that no other module defines a cap
of its own.

The room may hold caps and the arithmetic between them, nothing else: no defaults that
bound no allocation (constants.py has those, with units, device geometry and paths), no
checks of values (each component checks its input against the cap it imports), no I/O.
It imports only bmig.constants, so every package may import it.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Mapping

from bmig.constants import KiB, MiB

# -- breqd's control protocol (bmig/tracker/protocol.py; docs/control-protocol.md) ------------

MAX_CONTROL_FRAME = 4 * MiB        # a frame body, checked before it is read
MAX_CONTROL_JSON = 1 * MiB         # a message's field block
MAX_RANGES_PER_FRAME = 65536       # ranges in one message (16 bytes each)
MAX_CHECKOUT_RUNS = MAX_RANGES_PER_FRAME   # runs one CHECKOUT reply carries
MAX_QUERY_RUNS = MAX_RANGES_PER_FRAME      # runs one QUERY reply carries

# -- breqd (bmig/tracker/) ---------------------------------------------------------------

# Chunks per device. ChunkMap keeps four bit arrays (dirty, in flight, held, mirrored),
# and a fifth for the activity log unless it is off: 2^32 chunks are 2.5 GiB of memory
# (256 TiB at 64 KiB chunks). bmig-nbd's tracking layer keeps two more of its own for its
# fast path, per export (bmig/nbd/layers/track.py): 1 GiB at this cap. A bigger device is
# refused.
MAX_CHUNKS = 1 << 32
# Disjoint runs one connection may hold (marked with "hold", not yet released).
MAX_HELD_RUNS = 1 << 18
# Chunks per bit-array step of a MARK: its temporaries are MARK_PIECE / 8 bytes (128 KiB)
# however many ranges it has and however large the device.
MARK_PIECE = 1 << 20
# Chunks in one device's activity log (breqd's activity_log_chunks; bmig/tracker/activity.py):
# about 100 bytes of memory each (an ordered dict entry), 26 MiB per device at the cap, and
# what a crash may add to the next sync. The default is 512 MiB at 64 KiB chunks.
MAX_ACTIVITY_LOG = 1 << 18
DEFAULT_ACTIVITY_LOG = 8192
# Bitmap pages whose images one flush prepares at a time: 1 MiB of 4 KiB pages.
PAGES_PER_WRITE = 256
# A control client's name (HELLO's "client"), kept for log lines and status: characters.
MAX_CLIENT_NAME = 64
# How long a CLAIM may wait for a device's sender to give it up: one timer per device.
MAX_CLAIM_WAIT_MS = 24 * 3600 * 1000

# -- bmigrate cutover's hooks (bmig/sender/hooks.py) ----------------------------------------

MAX_HOOK_LINE = 64 * KiB           # a hook's output line; a longer one is cut in pieces

# -- bmig-nbd's own control socket (bmig/nbd/manage.py, manage_client.py) -----------------

MAX_MANAGE_FRAME = 64 * KiB

# -- the wire protocol, bmigrate/bmig-nbd <-> breceive (bmig/wire/; wire-protocol.md) ------

MAX_DATA = 4 * MiB                 # raw bytes in one DATA frame
MAX_JSON = 64 * KiB                # the JSON object of one message
MAX_HASHES = 65536                 # hashes in one HASHES reply
MAX_FRAME = 32 + MAX_DATA + 64 * KiB   # a DATA frame whose payload grew a little
MAX_PREAUTH_FRAME = 4096           # what an unauthenticated peer may send
PREAUTH_BUFFER = 2 * (MAX_PREAUTH_FRAME + 4)   # all a stranger gets: two frames, u32 lengths
MAX_UNAUTHENTICATED = 32           # breceive's connections still in their handshake (default)

# The SSH transport (bmig/wire/ssh.py): the window and packet size we advertise for data
# coming to us (paramiko's defaults: 2 MiB, 32 KiB). Measured on loopback, 16 and 64 MiB
# receive as fast as 2 MiB with 256 KiB packets, and slower with 32 KiB ones; 16 MiB still
# allows 300 MB/s at a 50 ms round trip, and bounds what one stream buffers (twice the
# window, see recv_into). What we send is bounded by the server's window instead: stock
# sshd grants 2 MiB in 32 KiB packets per session, whatever the client asks.
SSH_WINDOW_SIZE = 16 * MiB
SSH_MAX_PACKET_SIZE = 256 * KiB    # OpenSSH's own cap on a packet (PACKET_MAX_SIZE)

# -- the NBD server, bmig-nbd (bmig/nbd/protocol.py, handshake.py, transmission.py) --------

MAX_OPTIONS = 64                   # options one client may send before transmission
MAX_OPTION_LENGTH = 64 * KiB       # option payload cap, checked before allocating
MAX_NAME_LENGTH = 4096             # export and meta context names (proto.md: 4096 bytes)
MAX_PAYLOAD = 32 * MiB             # advertised maximum block size; larger requests are refused
MAX_DISCARD = 64 * MiB             # a refused write payload up to this is read and dropped
MAX_INFLIGHT_BYTES = 64 * MiB      # payload bytes held per connection at once
MAX_EXTENTS = 1024                 # block status descriptors per reply
RECV_BUFFER = 512 * KiB            # each connection's receive buffer (nbd/connection.py)
INLINE_PAYLOAD = 128 * KiB         # write payloads up to this are used in the receive buffer
DEFAULT_HOLD_LIMIT = 65536         # chunks held at once (nbd/layers/track.py; hold_chunks)
QUEUE_BYTES = 64 * MiB             # protocol A: bytes queued before writers wait (replica.py)

# -- the NBD client (bmig/nbdclient/): what a server's replies may make it hold -----------

NBD_CHUNK_HEADROOM = 64            # a reply chunk's fixed fields on top of its largest payload
MAX_NBD_ERROR_CHUNK = 6 + MAX_NAME_LENGTH + 64   # error, length, message (a string), offset
MAX_NBD_CONTEXTS = 256             # meta contexts one SET_META_CONTEXT may select

# -- files ---------------------------------------------------------------------------------

MAX_CONFIG_FILE = 1 * MiB          # a TOML settings or definition file (bmig/config.py)
MAX_STATE_FILE = 1 * MiB           # a JSON state record: lineage, target (bmig/config.py)
RESYNC_PAGE = 1024                 # ranges of a rejoining copy's resync set per RESYNC
# Ranges of a resync set the sender takes from a receiver (bmig/wire/client.py): the most a
# receiver's state file can hold; a larger offer is refused before any range is fetched.
MAX_RESYNC_RANGES = 1 << 18
MAX_SECRET_FILE = 4096             # a shared secret (bmig/wire/auth.py)
MAX_PSK_FILE = 1 * MiB             # a TLS-PSK file (bmig/nbd/psk.py)
MAX_PSK_IDENTITY = 128             # bytes; below OpenSSL's PSK_MAX_IDENTITY_LEN
MAX_PSK_KEY_BYTES = 256            # below OpenSSL's PSK_MAX_PSK_LEN (checked again per call)
MAX_SYSFS_ID = 256                 # characters of a sysfs id kept (bmig/identity.py)


def relations(c: Any) -> list[tuple[bool, str]]:
    """Each relation between caps, with the reason it must hold."""
    return [
        (16 + c.MAX_CONTROL_JSON + 16 * c.MAX_RANGES_PER_FRAME <= c.MAX_CONTROL_FRAME,
         "a control message (16-byte header) with the largest field block and the most "
         "ranges (16 bytes each) fits a frame"),
        (c.MAX_CHECKOUT_RUNS <= c.MAX_RANGES_PER_FRAME,
         "a CHECKOUT reply's runs travel as the ranges of one message"),
        (c.MAX_QUERY_RUNS <= c.MAX_RANGES_PER_FRAME,
         "a QUERY reply's runs travel as the ranges of one message"),
        (c.MAX_RANGES_PER_FRAME <= c.MAX_HELD_RUNS,
         "a MARK with hold and the most ranges is accepted on a connection that holds none"),
        (c.DEFAULT_HOLD_LIMIT <= c.MAX_HELD_RUNS,
         "bmig-nbd at its default hold limit never holds more runs than breqd allows"),
        (0 <= c.DEFAULT_ACTIVITY_LOG <= c.MAX_ACTIVITY_LOG,
         "breqd's default activity log is within its cap"),
        (c.MARK_PIECE % 8 == 0 and c.MARK_PIECE <= c.MAX_CHUNKS,
         "a MARK piece is whole bytes of a bit array, and no larger than a device"),
        (32 + c.MAX_DATA <= c.MAX_FRAME,
         "a DATA frame (32-byte header) of the most raw bytes fits a frame; a payload that "
         "zstd would grow travels raw"),
        (4 + c.MAX_JSON <= c.MAX_FRAME,
         "a JSON message (4-byte head) of the largest object fits a frame"),
        (16 + 8 * c.MAX_HASHES <= c.MAX_FRAME,
         "a HASHES reply (16-byte header, 8 bytes a hash) of the most hashes fits a frame"),
        (c.MAX_PREAUTH_FRAME <= c.MAX_FRAME and c.MAX_PREAUTH_FRAME <= c.MAX_JSON,
         "authentication only raises the cap: a hello that fits before it fits after"),
        (c.MAX_UNAUTHENTICATED * c.PREAUTH_BUFFER <= 1 * MiB,
         "strangers at the default cap hold at most 1 MiB of breceive's buffers"),
        (c.SSH_MAX_PACKET_SIZE <= c.SSH_WINDOW_SIZE,
         "an SSH packet fits the window we advertise"),
        (4 + c.MAX_NAME_LENGTH + 2 <= c.MAX_OPTION_LENGTH,
         "an NBD_OPT_GO naming an export of the longest name fits one option"),
        (c.MAX_PAYLOAD <= c.MAX_DISCARD,
         "a refused NBD write of the advertised maximum is skipped, the stream kept in step"),
        (c.MAX_PAYLOAD <= c.MAX_INFLIGHT_BYTES,
         "one NBD request of the advertised maximum fits a connection's payload budget"),
        (28 + c.INLINE_PAYLOAD <= c.RECV_BUFFER,
         "a write whose payload is used in place fits the receive buffer with its 28-byte "
         "request header"),
        (64 + c.RESYNC_PAGE * 48 <= c.MAX_JSON,
         "a RESYNC page of ranges (\"[o, n], \": two 20-digit numbers and 8 more) fits one JSON message"),
        (c.MAX_STATE_FILE // 6 <= c.MAX_RESYNC_RANGES,
         "every resync set a receiver's state file can hold (a range takes at least 6 bytes "
         "of JSON, \"[o,n],\") is taken by its sender"),
        (c.MAX_PSK_IDENTITY + 1 + 2 * c.MAX_PSK_KEY_BYTES + 1 <= c.MAX_PSK_FILE,
         "a PSK file line with the longest identity and key (hex) fits the file cap"),
    ]


def check(caps: Mapping[str, Any]) -> None:
    """Raise AssertionError naming every relation ``caps`` breaks."""
    broken = [why for holds, why in relations(SimpleNamespace(**caps)) if not holds]
    if broken:
        raise AssertionError("bmig.limits: " + "; ".join(broken))


check(globals())
