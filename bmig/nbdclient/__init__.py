"""A small blocking NBD client, as libnbd is beside nbdkit: not part of the NBD server
(bmig.nbd), which it shares only the protocol's constants with (bmig.nbd.protocol).

    uri.py           where an export is: NbdAddress, parse_uri (nbd://, nbd+unix://, nbds...)
    connection.py    the socket: open, STARTTLS, send, buffered receive, the first failure
    handshake.py     fixed newstyle negotiation up to transmission
    transmission.py  NbdClient: requests, their checks, pipelining
    replies.py       reading simple and structured replies, checked before use
    errors.py        NbdError, NbdExportError, ServerClosed, and how server text is shown

Used by the tests, the demo's writer and nbd:// targets (bmig.sender.targets).
"""

from bmig.nbdclient.errors import NbdError, NbdExportError, errno_name
from bmig.nbdclient.transmission import MAX_IN_FLIGHT, NbdClient
from bmig.nbdclient.uri import DEFAULT_PORT, NbdAddress, parse_uri

__all__ = [
    "DEFAULT_PORT", "MAX_IN_FLIGHT", "NbdAddress", "NbdClient", "NbdError", "NbdExportError",
    "errno_name", "parse_uri",
]
