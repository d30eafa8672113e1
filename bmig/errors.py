"""One exception hierarchy for the whole toolkit.

Each class carries the exit code a CLI returns for it, the code it travels under on a
wire (control or replication protocol) and whether a traceback helps (never for a
mistake the user can fix). The docstring is the meaning; the message says what to do.
"""

from __future__ import annotations

# Exit codes (documented in man/bmigrate.1 EXIT STATUS; tests/docs checks they are unique).
EXIT_OK = 0
EXIT_ERROR = 1          # generic failure
EXIT_USAGE = 2          # bad command line (click's own code)
EXIT_CONFIG = 3         # bad configuration file or value
EXIT_UNREACHABLE = 4    # daemon or peer not reachable
EXIT_REFUSED = 5        # the daemon understood and refused the request
EXIT_STATE = 6          # state directory unusable (locked, unwritable, corrupt beyond repair)
EXIT_PROTOCOL = 7       # the peer broke the protocol
EXIT_AUTH = 8           # authentication failed (secret, certificate, host key)
EXIT_LINEAGE = 9        # the target holds another lineage's data (split brain refused)
EXIT_NOT_CONVERGING = 10  # writes outpace shipping: cut over with protocol C
EXIT_TARGET = 11        # the target could not store the data (I/O error, no space)
EXIT_HOOK = 12          # a cutover hook failed
EXIT_NOT_CONVERGED = 13  # cutover: not converged within --timeout
EXIT_VERIFY = 14        # verify found chunks that differ
EXIT_LIVE = 15          # sync converged while the device is being written: not identical
EXIT_HANDOVER_UNKNOWN = 16  # cutover: PROMOTE unanswered, the target's state unknown
EXIT_BUSY = 17          # another sender ships the device, or another session has the target
# cutover --check: the first precondition that does not hold (bmig/sender/precheck.py)
EXIT_CHECK_BREQD = 20       # breqd unreachable, or it does not track the device
EXIT_CHECK_SOURCE = 21      # the source cannot be read, or its size is not breqd's
EXIT_CHECK_INTERCEPT = 22   # bmig-nbd's control socket (or the dm intercept) does not answer
EXIT_CHECK_SLOT = 23        # the device's sender slot cannot be had (another cutover)
EXIT_CHECK_HOOK = 24        # a hook is not a command that can run
EXIT_CHECK_RECEIVER = 25    # the receiver cannot be reached
EXIT_CHECK_AUTH = 26        # the receiver and this sender do not authenticate each other
EXIT_CHECK_LINEAGE = 27     # source or target is not in a lineage a cutover may hand over


class BmigError(Exception):
    """A failure with a message meant for the operator."""

    exit_code = EXIT_ERROR
    wire_code = "error"
    traceback = False

    def __init__(self, message: str | None = None):
        super().__init__(message or (self.__doc__ or self.__class__.__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(BmigError):
    """The configuration is invalid."""

    exit_code = EXIT_CONFIG
    wire_code = "config"

    def __init__(self, message: str | None = None):
        # One line, whatever a file name or a value quoted in it holds (a file named
        # "\n.toml" in a watched directory must not split the log line).
        super().__init__(None if message is None else _one_line(message))


def _one_line(text: str) -> str:
    return "".join(c if c >= " " and c != "\x7f" else repr(c)[1:-1] for c in text)


class TargetMissing(ConfigError):
    """The target's file does not exist (yet): only a pass may create it."""

    wire_code = "no-target"


class UnreachableError(BmigError):
    """The daemon or peer cannot be reached."""

    exit_code = EXIT_UNREACHABLE
    wire_code = "unreachable"


class ProtocolError(BmigError):
    """The peer sent something the protocol does not allow."""

    exit_code = EXIT_PROTOCOL
    wire_code = "protocol"


class FrameTooLarge(ProtocolError):
    """A frame is larger than the protocol allows."""

    wire_code = "frame-too-large"


class IntegrityError(ProtocolError):
    """A sealed frame failed its check: altered, dropped, replayed or reordered on the way."""

    wire_code = "integrity"


class RequestError(BmigError):
    """The request is well formed but cannot be honoured."""

    exit_code = EXIT_REFUSED
    wire_code = "refused"


class UnknownDevice(RequestError):
    """No such tracked device."""

    wire_code = "unknown-device"


class DeviceExists(RequestError):
    """The device is already tracked."""

    wire_code = "device-exists"


class RangeError(RequestError):
    """A byte range is empty or reaches past the end of the device."""

    wire_code = "bad-range"


class NotCheckedOut(RequestError):
    """The chunks are not checked out by this client."""

    wire_code = "not-checked-out"


class DeviceBusy(RequestError):
    """Another sender is shipping the device."""

    exit_code = EXIT_BUSY
    wire_code = "device-busy"


class SenderClaimed(DeviceBusy):
    """A cutover claims the device: its sender gives it up."""

    wire_code = "sender-claimed"


class UnknownExport(RequestError):
    """The receiver has no target of that name."""

    wire_code = "unknown-export"


class TargetBusy(RequestError):
    """Another session is writing to the target."""

    exit_code = EXIT_BUSY
    wire_code = "busy"


class LineageError(RequestError):
    """The target holds data of another lineage."""

    exit_code = EXIT_LINEAGE
    wire_code = "lineage"


class AuthError(BmigError):
    """Authentication failed."""

    exit_code = EXIT_AUTH
    wire_code = "auth-failed"


class ChecksumMismatch(ProtocolError):
    """A chunk arrived with a checksum that does not match its data."""

    wire_code = "checksum"


class TargetError(BmigError):
    """The target could not store the data."""

    exit_code = EXIT_TARGET
    wire_code = "target-io"


class TargetFull(TargetError):
    """The target has no space left."""

    wire_code = "no-space"


class NotConverging(BmigError):
    """The dirty amount stopped shrinking: writes outpace shipping."""

    exit_code = EXIT_NOT_CONVERGING
    wire_code = "not-converging"


class HookFailed(BmigError):
    """A cutover hook failed."""

    exit_code = EXIT_HOOK
    wire_code = "hook-failed"


class NotConverged(BmigError):
    """The copy did not converge in time."""

    exit_code = EXIT_NOT_CONVERGED
    wire_code = "not-converged"


class VerifyFailed(BmigError):
    """Source and target differ."""

    exit_code = EXIT_VERIFY
    wire_code = "verify-failed"


class HandoverUnknown(BmigError):
    """The cutover cannot tell whether the target was promoted."""

    exit_code = EXIT_HANDOVER_UNKNOWN
    wire_code = "handover-unknown"


class InterceptError(BmigError):
    """The write intercept cannot be set up, changed or trusted (dm-era, dmsetup)."""

    wire_code = "intercept"


class StateError(BmigError):
    """The state directory cannot be used."""

    exit_code = EXIT_STATE
    wire_code = "state"


class StateWriteError(StateError):
    """Dirty state could not be made durable; the write it guards must fail."""

    wire_code = "state-write-failed"


class StateLocked(StateError):
    """Another process owns the state directory."""

    wire_code = "state-locked"


# Wire code -> class, so a client rebuilds the server's error as the same type.
_ALL: tuple[type[BmigError], ...] = (
    BmigError, ConfigError, TargetMissing, UnreachableError, ProtocolError, FrameTooLarge, IntegrityError,
    RequestError,
    UnknownDevice, DeviceExists, RangeError, NotCheckedOut, DeviceBusy, SenderClaimed,
    UnknownExport,
    TargetBusy,
    LineageError, AuthError, ChecksumMismatch, TargetError, TargetFull, NotConverging,
    HookFailed, NotConverged, VerifyFailed, StateError, StateWriteError, StateLocked,
    HandoverUnknown, InterceptError,
)
BY_WIRE_CODE: dict[str, type[BmigError]] = {cls.wire_code: cls for cls in _ALL}


def from_wire(code: str, message: str) -> BmigError:
    """Rebuild an error received from a peer; unknown codes become a plain BmigError."""
    return BY_WIRE_CODE.get(code, BmigError)(message)
