"""NBD wire constants, header layouts and printable names, in one place.

Values follow NetworkBlockDevice/nbd doc/proto.md. Every log line names a command, option,
reply or error through ``name()`` so that nobody has to decode numbers by hand.

Constants, layouts and names only: no I/O, no state, and no import of the rest of bmig.
"""

from __future__ import annotations

import enum
import struct

from bmig.limits import (MAX_DISCARD, MAX_EXTENTS, MAX_INFLIGHT_BYTES,  # noqa: F401 (as p.MAX_*)
                         MAX_NAME_LENGTH, MAX_OPTION_LENGTH, MAX_OPTIONS, MAX_PAYLOAD)

# -- handshake ------------------------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
REPLY_MAGIC_OPT = 0x0003E889045565A9   # option reply magic

# Server handshake flags (16 bits) and client flags (32 bits).
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = 1 << 0
FLAG_C_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


class Rep(enum.IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = (1 << 31) + 1
    ERR_POLICY = (1 << 31) + 2
    ERR_INVALID = (1 << 31) + 3
    ERR_PLATFORM = (1 << 31) + 4
    ERR_TLS_REQD = (1 << 31) + 5
    ERR_UNKNOWN = (1 << 31) + 6
    ERR_SHUTDOWN = (1 << 31) + 7
    ERR_BLOCK_SIZE_REQD = (1 << 31) + 8
    ERR_TOO_BIG = (1 << 31) + 9
    ERR_EXT_HEADER_REQD = (1 << 31) + 10


class Info(enum.IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


# Transmission flags (16 bits, sent with NBD_INFO_EXPORT or after NBD_OPT_EXPORT_NAME).
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11

# -- transmission -----------------------------------------------------------------------

REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


# Command flags (16 bits).
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# Flags each command may carry; anything else is NBD_EINVAL.
ALLOWED_CMD_FLAGS: dict[Cmd, int] = {
    Cmd.READ: CMD_FLAG_DF,
    Cmd.WRITE: CMD_FLAG_FUA,
    Cmd.DISC: 0,
    Cmd.FLUSH: 0,
    Cmd.TRIM: CMD_FLAG_FUA,
    Cmd.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    Cmd.BLOCK_STATUS: CMD_FLAG_REQ_ONE,
}

# Structured reply flags and chunk types.
REPLY_FLAG_DONE = 1 << 0


class ReplyType(enum.IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    ERROR = (1 << 15) + 1
    ERROR_OFFSET = (1 << 15) + 2


class Err(enum.IntEnum):
    """The NBD error set; errnos become one of these in transmission's mapping."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


# base:allocation flags.
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

META_BASE_ALLOCATION = "base:allocation"
META_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"

# -- header layouts (network byte order) -------------------------------------------------

SERVER_GREETING = struct.Struct(">QQH")      # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")        # IHAVEOPT, option, length
OPTION_REPLY = struct.Struct(">QIII")        # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")     # size, transmission flags (then 124 zeroes)
REQUEST = struct.Struct(">IHHQQI")           # magic, flags, type, cookie, offset, length
SIMPLE_REPLY = struct.Struct(">IIQ")         # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")   # magic, flags, type, cookie, length
INFO_TYPE = struct.Struct(">H")              # NBD_REP_INFO type; NBD_OPT_GO info request
BLOCK_SIZES = struct.Struct(">III")          # NBD_INFO_BLOCK_SIZE: minimum, preferred, maximum
OFFSET_HOLE = struct.Struct(">QI")           # NBD_REPLY_TYPE_OFFSET_HOLE: offset, size
ERROR_CHUNK = struct.Struct(">IH")           # error chunks: error, message length
EXTENT = struct.Struct(">II")                # block status descriptor: length, flags

DEFAULT_PORT = 10809                 # IANA port for NBD
CLISERV_MAGIC = 0x00420281861253     # oldstyle negotiation (not supported)
EXPORT_NAME_PADDING = 124            # zeroes after NBD_OPT_EXPORT_NAME's reply, unless NO_ZEROES
REP_ERR_BIT = 1 << 31                # option replies that are errors
REPLY_TYPE_ERR_BIT = 1 << 15         # structured reply chunks that are errors
BLOCK_SIZE_NONE = 0xFFFFFFFF         # a maximum block size meaning "no inherent limit"

# -- limits --------------------------------------------------------------------------------

# The caps (MAX_OPTIONS, MAX_OPTION_LENGTH, MAX_NAME_LENGTH, MAX_PAYLOAD, MAX_DISCARD,
# MAX_INFLIGHT_BYTES, MAX_EXTENTS) are bmig.limits', imported above.
MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096

_TABLES: tuple[type[enum.IntEnum], ...] = (Opt, Rep, Info, Cmd, ReplyType, Err)


def name(kind: type[enum.IntEnum], value: int) -> str:
    """Printable name of a wire value, e.g. ``NBD_CMD_WRITE``, or the number if unknown."""
    prefix = {Opt: "NBD_OPT_", Rep: "NBD_REP_", Info: "NBD_INFO_", Cmd: "NBD_CMD_",
              ReplyType: "NBD_REPLY_TYPE_", Err: "NBD_"}[kind]
    try:
        return prefix + kind(value).name
    except ValueError:
        return f"{prefix}{value:#x}"
