"""Where an NBD export is: ``NbdAddress`` and the URIs libnbd reads (``parse_uri``).

    nbd://HOST[:PORT][/EXPORT]            TCP (port 10809 by default)
    nbd+unix:///[EXPORT]?socket=PATH      a Unix socket
    nbds://..., nbds+unix://...           the same with TLS (STARTTLS)

Parsing and checking only; the connection is bmig.nbdclient.connection's.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from bmig.errors import ConfigError
from bmig.nbd import protocol as p

DEFAULT_PORT = p.DEFAULT_PORT

_SCHEMES = {  # scheme -> (tls, unix)
    "nbd": (False, False), "nbds": (True, False),
    "nbd+unix": (False, True), "nbds+unix": (True, True),
}


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: a Unix socket or a TCP host and port, its name, and TLS or not."""

    unix: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    export: str = ""
    tls: bool = False

    def __post_init__(self) -> None:
        if (self.unix is None) == (self.host is None):
            raise ConfigError("an NBD address needs either a Unix socket path or a host")
        if self.unix == "" or self.host == "":
            raise ConfigError("an NBD address needs a non-empty socket path or host")
        if not 0 < self.port < 65536:
            raise ConfigError(f"NBD port {self.port} is out of range (1-65535)")
        check_name("export name", self.export)

    @property
    def uri(self) -> str:
        """The address as a URI that parse_uri reads back to the same address."""
        path = urllib.parse.quote(self.export, safe="")
        if self.unix is not None:
            scheme = "nbds+unix" if self.tls else "nbd+unix"
            return f"{scheme}:///{path}?socket={urllib.parse.quote(self.unix, safe='/')}"
        host = f"[{self.host}]" if ":" in (self.host or "") else self.host
        return f"{'nbds' if self.tls else 'nbd'}://{host}:{self.port}/{path}"

    def __str__(self) -> str:
        return self.uri


def check_name(what: str, name: str) -> None:
    if not isinstance(name, str):
        raise ConfigError(f"NBD {what} must be a string, not {type(name).__name__}")
    if "\0" in name:
        raise ConfigError(f"NBD {what} {name!r} contains a NUL character")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"NBD {what} {name!r} is not valid Unicode") from None
    if len(encoded) > p.MAX_NAME_LENGTH:
        raise ConfigError(f"NBD {what} is longer than {p.MAX_NAME_LENGTH} bytes")


def parse_uri(uri: str) -> NbdAddress:
    """nbd://HOST[:PORT][/EXPORT], nbd+unix:///[EXPORT]?socket=PATH, and nbds:// and
    nbds+unix:// for TLS. The export name is the path without its leading '/',
    percent-decoded; an empty host means localhost, as in libnbd."""
    if not isinstance(uri, str):
        raise ConfigError(f"an NBD URI must be a string, not {type(uri).__name__}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise ConfigError(f"NBD URI {uri!r} contains control characters")
    scheme, sep, rest = uri.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise ConfigError(f"{uri!r} is not an NBD URI: use nbd://HOST[:PORT]/EXPORT, "
                          "nbd+unix:///EXPORT?socket=PATH, or nbds:// / nbds+unix:// for TLS")
    if not rest.startswith("//"):
        raise ConfigError(f"NBD URI {uri!r} must start with {scheme}://")
    tls, unix = _SCHEMES[scheme]
    if "#" in uri:
        raise ConfigError(f"NBD URI {uri!r} must not have a #fragment (write # as %23)")
    try:
        parts = urllib.parse.urlsplit(uri)
        query = _query(parts.query)
        export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/")
                                      else parts.path, errors="strict")
        port = parts.port
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid NBD URI {uri!r}: {exc}") from None
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"NBD URI {uri!r}: user names are not supported")
    if unix:
        return _unix_address(uri, parts, query, export, tls)
    if query:
        raise ConfigError(f"NBD URI {uri!r} takes no query; socket= belongs to nbd+unix://")
    if port == 0:
        raise ConfigError(f"NBD URI {uri!r}: port 0 is not a port")
    return NbdAddress(host=parts.hostname or "localhost", port=port or DEFAULT_PORT,
                      export=export, tls=tls)


def _query(query: str) -> list[tuple[str, str]]:
    """key=value pairs, percent-decoded; '+' stays '+' (libnbd reads socket paths so)."""
    pairs = []
    for item in query.split("&") if query else ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"query item {item!r} is not key=value")
        pairs.append((urllib.parse.unquote(key, errors="strict"),
                      urllib.parse.unquote(value, errors="strict")))
    return pairs


def _unix_address(uri: str, parts: urllib.parse.SplitResult, query: list[tuple[str, str]],
                  export: str, tls: bool) -> NbdAddress:
    if parts.netloc:
        raise ConfigError(f"NBD URI {uri!r} names a host; a Unix socket URI starts with "
                          f"{parts.scheme}:/// and gives ?socket=PATH")
    unknown = sorted({k for k, _ in query if k != "socket"})
    if unknown:
        raise ConfigError(f"NBD URI {uri!r}: unsupported query parameter {unknown[0]!r}")
    sockets = [v for k, v in query if k == "socket"]
    if len(sockets) != 1 or not sockets[0]:
        raise ConfigError(f"NBD URI {uri!r} needs exactly one ?socket=PATH")
    return NbdAddress(unix=sockets[0], export=export, tls=tls)
