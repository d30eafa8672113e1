"""Where a sync goes: the target URL forms and their one-line errors.

Parsing only: nothing here connects (bmig.wire.connect reaches tcp, tls and ssh
targets; bmig.sender.targets sends the nbd forms to bmig.nbdclient).

    tcp://HOST:PORT/EXPORT          breceive over TCP (HMAC authentication)
    tls://HOST:PORT/EXPORT          breceive over TLS
    ssh://[USER@]HOST[:PORT]/EXPORT breceive --stdio on HOST, run over SSH
    nbd://HOST[:PORT]/EXPORT        any NBD server (no compression, no lineage)
    nbd+unix:///EXPORT?socket=PATH  the same on a Unix socket (also nbds://, nbds+unix://)
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from bmig.errors import ConfigError

DEFAULT_PORT = 10810
KINDS = ("tcp", "tls", "ssh")
NBD_SCHEMES = ("nbd", "nbds", "nbd+unix", "nbds+unix")

EXAMPLES = ("tcp://HOST:10810/EXPORT, tls://HOST:10810/EXPORT, ssh://USER@HOST/EXPORT, "
            "nbd://HOST:10809/EXPORT or nbd+unix:///EXPORT?socket=PATH")


@dataclass(frozen=True)
class TargetUrl:
    kind: str                 # tcp, tls, ssh or nbd
    host: str = ""
    port: int = 0
    user: str | None = None
    export: str = ""
    nbd_uri: str = ""         # the whole URL, for nbd targets

    def __str__(self) -> str:
        if self.kind == "nbd":
            return self.nbd_uri
        user = f"{self.user}@" if self.user else ""
        return f"{self.kind}://{user}{self.host}:{self.port}/{self.export}"


def parse_target_url(text: str) -> TargetUrl:
    if not isinstance(text, str) or "://" not in text:
        raise ConfigError(f"target {text!r} is not a URL; use {EXAMPLES}")
    parts = urllib.parse.urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in NBD_SCHEMES:
        return TargetUrl("nbd", nbd_uri=text)
    if scheme not in KINDS:
        raise ConfigError(f"target {text!r}: unknown scheme {scheme!r}; use {EXAMPLES}")
    export = urllib.parse.unquote(parts.path.lstrip("/"))
    if not export or "/" in export:
        raise ConfigError(f"target {text!r} names no export: add /EXPORT, the target's name "
                          "in the receiver's configuration")
    if parts.query or parts.fragment:
        raise ConfigError(f"target {text!r}: a {scheme} URL takes no query or fragment")
    host = parts.hostname or ""
    if not host:
        raise ConfigError(f"target {text!r} names no host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"target {text!r}: the port is not a number from 1 to 65535") from None
    if scheme == "ssh":
        return TargetUrl("ssh", host, port or 22, parts.username, export)
    if parts.username:
        raise ConfigError(f"target {text!r}: only ssh:// URLs take a user name")
    return TargetUrl(scheme, host, port or DEFAULT_PORT, None, export)
