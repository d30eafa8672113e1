"""The sender's side of a target: breceive (bmig.wire's WireTarget) or any NBD server
(``NbdTarget`` over bmig.nbdclient), behind one ``Target`` face, and ``open_target``,
the one way a command reaches either.

A pass hands a target frames with sequence numbers and asks for durability now and
then; the target reports back through ``Acks`` (bmig.wire.client). A pass commits
chunks in breqd only on ``durable`` (invariant 3). What travels on the wire and how a
connection is made and authenticated is bmig.wire's; this module only chooses.
"""

from __future__ import annotations

import threading
from typing import Any, Protocol

from bmig.errors import BmigError, ConfigError, TargetError
from bmig.wire.client import Acks, SourceInfo, WireTarget
from bmig.wire.codec import checksum as xxh3
from bmig.wire.connect import connect
from bmig.wire.options import ConnectOptions
from bmig.wire.transports import client_tls_context
from bmig.wire.urls import TargetUrl


class Target(Protocol):
    description: str
    compresses: bool            # worth compressing for (a breceive) or not (NBD)
    lineage: bool               # keeps a lineage record

    def open(self, source: SourceInfo, discard: bool) -> str: ...
    def begin_pass(self) -> None: ...
    def send_data(self, seq: int, offset: int, codec: int, payload: Any, raw_length: int,
                  digest: int) -> None: ...
    def send_zero(self, seq: int, offset: int, length: int) -> None: ...
    def request_durable(self, seq: int) -> None: ...
    def end_pass(self, complete: bool, consistent: bool | None = None) -> dict: ...
    def hashes(self, offset: int, length: int, chunk: int) -> list[int]: ...
    def status(self) -> dict: ...
    def close(self) -> None: ...


# -- any NBD server ------------------------------------------------------------------------

class NbdTarget:
    """An NBD export as the target: writes pipelined, durable when a FLUSH is answered.
    No lineage and no compression; the sender ships everything at each start."""

    compresses = False
    lineage = False

    def __init__(self, url: TargetUrl, options: ConnectOptions):
        from bmig.nbdclient import NbdClient    # only for an NBD target: a sync's start
        self.description = url.nbd_uri
        context = None
        if url.nbd_uri.startswith("nbds"):
            context = client_tls_context(options.tls_ca, options.tls_cert, options.tls_key)
        self.client = NbdClient.connect(url.nbd_uri, timeout=options.timeout,
                                        tls_context=context)
        # The encoder reads hashes (--checksum) while the sender writes: one client, one
        # call at a time (a second connection would wait forever on qemu-nbd, which
        # serves one client unless started with -e).
        self._lock = threading.Lock()
        self.error = None
        if self.client.read_only:
            raise ConfigError(f"{self.description} is read-only")
        self._cookies: list[tuple[int, int]] = []     # (cookie, seq) not yet waited for
        self._acks: Acks | None = None

    def set_acks(self, acks: Acks) -> None:
        self._acks = acks

    def open(self, source: SourceInfo, discard: bool, mode: str = "pass") -> str:
        if self.client.size < source.size:
            raise TargetError(f"{self.description} has {self.client.size} bytes, the source "
                              f"{source.size}")
        return "none"

    def begin_pass(self) -> None:
        pass

    def send_data(self, seq: int, offset: int, codec: int, payload: Any, raw_length: int,
                  digest: int, flags: int = 0) -> None:
        with self._lock:
            self._cookies.append((self.client.submit_write(payload, offset), seq))

    def send_zero(self, seq: int, offset: int, length: int, flags: int = 0) -> None:
        with self._lock:
            if self.client.can_zero:
                self._cookies.append((self.client.submit_zero(offset, length), seq))
                return
            zeros = bytes(min(length, 1 << 20))
            for start in range(offset, offset + length, len(zeros)):
                n = min(len(zeros), offset + length - start)
                self._cookies.append((self.client.submit_write(zeros[:n], start), seq))

    def request_durable(self, seq: int) -> None:
        from bmig.nbdclient import NbdError
        assert self._acks is not None
        with self._lock:
            cookies, self._cookies = self._cookies, []
            failed = []
            for cookie, frame_seq in cookies:
                try:
                    self.client.wait(cookie)
                except NbdError as exc:
                    failed.append((frame_seq, TargetError(f"{self.description}: "
                                                          f"{exc.message}")))
            try:
                if self.client.can_flush:
                    self.client.flush()
            except BmigError as exc:
                self._acks.fatal(exc)
                raise
        for frame_seq, error in failed:
            self._acks.failed(frame_seq, error)
        self._acks.durable(seq)

    def end_pass(self, complete: bool, consistent: bool | None = None) -> dict:
        return {}

    def hashes(self, offset: int, length: int, chunk: int) -> list[int]:
        out = []
        for start in range(offset, offset + length, chunk):
            with self._lock:
                data = self.client.pread(min(chunk, offset + length - start), start)
            out.append(xxh3(data))
        return out

    def status(self) -> dict:
        return {"targets": [{"export": self.client.export, "size": self.client.size}]}

    def close(self) -> None:
        self.client.close()


# -- opening -------------------------------------------------------------------------------

def open_target(url: TargetUrl, options: ConnectOptions) -> "WireTarget | NbdTarget":
    """Connect and authenticate; the one way a command reaches a target."""
    if url.kind == "nbd":
        return NbdTarget(url, options)
    return connect(url, options)


def target_status(url: TargetUrl, options: ConnectOptions) -> dict:
    """What the target says of itself (STATUS: every record a receiver keeps), over a
    connection of its own, closed again."""
    target = open_target(url, options)
    try:
        return target.status()
    finally:
        target.close()


def export_record(url: TargetUrl, options: ConnectOptions) -> dict | None:
    """The receiver's record of ``url``'s export (from target_status), or None when it
    keeps none. Whatever the receiver answers, only an object found in a list of objects
    is taken: a STATUS of another shape is "no record", never a crash."""
    status = target_status(url, options)
    targets = status.get("targets") if isinstance(status, dict) else None
    if not isinstance(targets, list):
        return None
    for record in targets:
        if isinstance(record, dict) and record.get("export") == url.export:
            return record
    return None
