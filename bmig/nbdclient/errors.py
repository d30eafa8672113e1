"""What the NBD client raises, and how it words what a server or a socket said.

Kept apart so that the handshake, the transmission and the socket raise the same
classes without importing each other.

No I/O here.
"""

from __future__ import annotations

from bmig.errors import BmigError, RequestError, UnreachableError
from bmig.nbd import protocol as p


def errno_name(error: int) -> str:
    """``EIO`` for NBD_EIO; proto.md: an unexpected value counts as NBD_EINVAL."""
    try:
        return p.Err(error).name
    except ValueError:
        return "EINVAL"


class NbdError(BmigError):
    """An NBD request failed on the server, or the client refused to send it."""

    wire_code = "nbd"

    def __init__(self, error: int, message: str, *, from_server: bool = True):
        super().__init__(message)
        self.error = int(error)
        self.errno_name = errno_name(error)
        self.from_server = from_server


class NbdExportError(RequestError):
    """The NBD server refused the export or an option the client needs."""

    wire_code = "nbd-refused"

    def __init__(self, message: str, reply: int = 0):
        super().__init__(message)
        self.reply = reply


class ServerClosed(UnreachableError):
    """The server closed the connection."""

    wire_code = "nbd-closed"


def printable(data: bytes, limit: int = 200) -> str:
    """A server's text on one line, without control characters."""
    text = data.decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= limit else text[:limit] + "..."


def reason(exc: BaseException) -> str:
    return printable(str(getattr(exc, "strerror", None) or exc or type(exc).__name__).encode())


def seconds(timeout: float | None) -> str:
    return "forever" if timeout is None else f"{timeout:g} s"


def describe(cmd: p.Cmd, offset: int, length: int) -> str:
    """A request as error messages name it."""
    if cmd == p.Cmd.FLUSH:
        return p.name(p.Cmd, cmd)
    return f"{p.name(p.Cmd, cmd)} of {length} bytes at offset {offset}"
