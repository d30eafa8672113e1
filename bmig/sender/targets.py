"""The sender's side of a target: breceive over a stream, or any NBD server.

A pass hands a target frames with sequence numbers and asks for durability now and
then; the target reports back through ``Acks``: ``durable(seq)`` (every frame up to seq
is on stable storage, except those reported failed), ``failed(seq, error)`` (nothing of
that frame was written) and ``fatal(error)`` (the target is gone; nothing more will be
made durable). A pass commits chunks in breqd only on ``durable`` (invariant 3).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from bmig.chunkmath import chunk_count
from bmig.errors import (AuthError, BmigError, ConfigError, ProtocolError, TargetError,
                         UnreachableError)
from bmig.framing import ConnectionClosed
from bmig.limits import MAX_HASHES
from bmig.lineage import hex_id
from bmig.sender.urls import TargetUrl
from bmig.wire import handshake
from bmig.wire.channel import Channel
from bmig.wire.codec import checksum as xxh3
from bmig.wire.protocol import (Message, T, decode_json, error_from, pack_data,
                                pack_seq, pack_zero, type_of, unpack_hashes, unpack_seq)
from bmig.wire.transports import (SocketStream, Stream, client_tls_context, connect_tcp,
                                  keepalive)

log = logging.getLogger("bmigrate")

REPLY_TIMEOUT = 300.0      # a control reply (OPENED, PASS_DONE, HASHES) may wait for a sync
REASON_WAIT = 10.0         # for the reader to read why the receiver closed the connection
TLS_HINT = ", or --trust-tls-server to let its verified certificate authenticate it"


@dataclass(frozen=True)
class SourceInfo:
    name: str
    device_id: int
    generation: int
    size: int
    chunk_size: int
    previous: tuple[str, ...] = ()     # older generations of this lineage, newest first


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach and authenticate a target (from flags and the config file)."""

    secret: bytes | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    ssh_command: str = "breceive --stdio"
    ssh_program: str = "paramiko"          # or "openssh"
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    identity: str | None = None
    ssh_cipher: str | None = None
    trust_tls_server: bool = False         # a verified certificate authenticates tls://
    timeout: float = 30.0


class Acks(Protocol):
    def durable(self, seq: int) -> None: ...
    def failed(self, seq: int, error: BmigError) -> None: ...
    def fatal(self, error: BmigError) -> None: ...

    # Replication (bmig.nbd.replica) also hears of frames received and written; a pass
    # does not ask for these, so its Acks need not have them.


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
    def end_pass(self, complete: bool) -> dict: ...
    def hashes(self, offset: int, length: int, chunk: int) -> list[int]: ...
    def status(self) -> dict: ...
    def close(self) -> None: ...


# -- breceive over a stream --------------------------------------------------------------

class WireTarget:
    """breceive at the other end of a Stream: handshake, then a reader thread that sorts
    acknowledgements from replies."""

    compresses = True
    lineage = True

    def __init__(self, stream: Stream, url: TargetUrl, options: ConnectOptions,
                 receiver_verified: bool, hint: str = ""):
        self.description = str(url)
        self.export = url.export
        self.channel = Channel(stream)
        self._replies: queue.Queue[Message | memoryview | BmigError] = queue.Queue()
        self._acks: Acks | None = None
        self._reader: threading.Thread | None = None
        self._closed = False
        self.error: BmigError | None = None     # why the connection ended, once it has
        agreed = handshake.sender(self.channel, options.secret, receiver_verified, hint)
        self.server = agreed.peer
        self.sealed = agreed.sealed
        self._reader = threading.Thread(target=self._read_loop, name="acks", daemon=True)
        self._reader.start()

    # -- control -----------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        self._frame(message.encode())

    def _frame(self, head: bytes, payload: Any = None) -> None:
        """Send one frame. When the connection broke, the receiver's own reason (an ERROR
        it sent before closing, read by the reader thread) wins over the broken pipe."""
        try:
            self.channel.send(head, payload)
        except UnreachableError:
            reader = self._reader
            if reader is not None and reader is not threading.current_thread():
                reader.join(timeout=REASON_WAIT)
            if self.error is not None and not isinstance(self.error, UnreachableError):
                raise self.error from None
            raise

    def _request(self, message: Message, expect: T) -> Message | memoryview:
        self._send(message)
        try:
            reply = self._replies.get(timeout=REPLY_TIMEOUT)
        except queue.Empty:
            raise UnreachableError(f"{self.description} did not answer {message.type.name} "
                                   f"in {REPLY_TIMEOUT:.0f} s") from None
        if isinstance(reply, BmigError):
            raise reply
        kind = type_of(reply) if isinstance(reply, memoryview) else reply.type
        if kind != expect:
            raise ProtocolError(f"{self.description}: expected {expect.name}, got {kind.name}")
        return reply

    def set_acks(self, acks: Acks) -> None:
        """Who hears the acknowledgements from now on; told at once if the connection
        has already ended (between passes, say, behind a proxy that kept our side open)."""
        self._acks = acks
        if self.error is not None:
            acks.fatal(self.error)

    def open(self, source: SourceInfo, discard: bool, mode: str = "pass") -> str:
        """Choose the target; ``mode`` "replicate" opens a replication session,
        "inspect" a read-only one (verify)."""
        reply = self._request(Message(T.OPEN, {
            "export": self.export, "device": source.name, "device_id": hex_id(source.device_id),
            "generation": hex_id(source.generation), "size": source.size,
            "chunk_size": source.chunk_size, "discard_target_data": discard,
            "mode": mode, "previous": list(source.previous)}), T.OPENED)
        assert isinstance(reply, Message)
        self.opened = reply.fields.get("target", {})
        self.why = reply.str("why", "")      # why a target with a record is "new" now
        return reply.str("relation")

    def begin_pass(self) -> None:
        self._send(Message(T.PASS_BEGIN, {}))

    def send_data(self, seq: int, offset: int, codec: int, payload: Any, raw_length: int,
                  digest: int, flags: int = 0) -> None:
        self._frame(pack_data(codec, flags, raw_length, seq, offset, digest), payload)

    def send_zero(self, seq: int, offset: int, length: int, flags: int = 0) -> None:
        self._frame(pack_zero(seq, offset, length, flags))

    def request_durable(self, seq: int) -> None:
        self._frame(pack_seq(T.FLUSH, seq))

    def end_pass(self, complete: bool) -> dict:
        reply = self._request(Message(T.PASS_END, {"complete": complete}), T.PASS_DONE)
        assert isinstance(reply, Message)
        return dict(reply.fields.get("target", {}))

    def hashes(self, offset: int, length: int, chunk: int) -> list[int]:
        out: list[int] = []
        step = MAX_HASHES * chunk
        for start in range(offset, offset + length, step):
            n = min(step, offset + length - start)
            reply = self._request(Message(T.HASHES_REQ, {"offset": start, "length": n,
                                                         "chunk_size": chunk}), T.HASHES)
            assert isinstance(reply, memoryview)
            got_offset, values = unpack_hashes(reply)
            if got_offset != start or len(values) != chunk_count(n, chunk):
                raise ProtocolError(f"{self.description} answered hashes for another range")
            out.extend(values)
        return out

    def promote(self, generation: int) -> dict:
        """Cutover: the target takes ``generation`` and becomes the primary."""
        reply = self._request(Message(T.PROMOTE, {"generation": hex_id(generation)}),
                              T.PROMOTED)
        assert isinstance(reply, Message)
        return dict(reply.fields.get("target", {}))

    def status(self) -> dict:
        reply = self._request(Message(T.STATUS_REQ, {}), T.STATUS)
        assert isinstance(reply, Message)
        return dict(reply.fields)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._send(Message(T.BYE, {}))
        except BmigError:
            pass
        self.channel.close()
        if self._reader is not None:
            self._reader.join(timeout=10)

    # -- the reader thread ---------------------------------------------------------------

    def _read_loop(self) -> None:
        why: BmigError = UnreachableError(f"lost {self.description}")
        try:
            while True:
                body = self.channel.read()
                kind = type_of(body)
                if kind == T.DURABLE:
                    if self._acks is not None:
                        self._acks.durable(unpack_seq(body))
                elif kind in (T.RECEIVED, T.WRITTEN):
                    hook = getattr(self._acks, "received" if kind == T.RECEIVED else "written",
                                   None)
                    if hook is not None:
                        hook(unpack_seq(body))
                elif kind == T.HASHES:
                    self._replies.put(memoryview(bytes(body)))   # outlives the buffer
                elif kind == T.ERROR:
                    self._error(decode_json(body))
                else:
                    self._replies.put(decode_json(body))
        except ConnectionClosed:
            why = UnreachableError(f"{self.description} closed the connection")
        except BmigError as exc:
            why = exc
        finally:
            if not self._closed:
                log.debug("%s: reader stops: %s", self.description, why.message)
                why = self.error = self.error or why
                if self._acks is not None:
                    self._acks.fatal(why)
                self._replies.put(why)

    def _error(self, message: Message) -> None:
        error = error_from(message)
        seq = message.fields.get("seq")
        if isinstance(seq, int) and not message.fields.get("fatal") and self._acks is not None:
            self._acks.failed(seq, error)
        elif message.fields.get("fatal"):
            if self.error is None:
                self.error = error           # the reason, not the close that follows
            if self._acks is not None:
                self._acks.fatal(error)
            self._replies.put(error)
        else:
            self._replies.put(error)


# -- any NBD server ------------------------------------------------------------------------

class NbdTarget:
    """An NBD export as the target: writes pipelined, durable when a FLUSH is answered.
    No lineage and no compression; the sender ships everything at each start."""

    compresses = False
    lineage = False

    def __init__(self, url: TargetUrl, options: ConnectOptions):
        from bmig.nbd.client import NbdClient

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
        from bmig.nbd.client import NbdError

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

    def end_pass(self, complete: bool) -> dict:
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
    if url.kind == "ssh":
        return _open_ssh(url, options)
    # The sender alone decides what it requires of the receiver: the shared secret,
    # unless the transport authenticated the receiver (tls:// with --trust-tls-server).
    verified = url.kind == "tls" and options.trust_tls_server
    hint = TLS_HINT if url.kind == "tls" and not verified else ""
    if not verified and options.secret is None:
        raise AuthError(f"{url}: only the shared secret can authenticate the receiver here: "
                        f"give --secret-file FILE{hint}")
    sock = connect_tcp(url.host, url.port, options.timeout)
    try:
        if url.kind == "tls":
            context = client_tls_context(options.tls_ca, options.tls_cert, options.tls_key)
            try:
                sock = context.wrap_socket(sock, server_hostname=url.host)
            except ssl.SSLCertVerificationError as exc:
                raise AuthError(f"the certificate of {url.host}:{url.port} is not trusted: "
                                f"{exc.verify_message}; give its CA with --tls-ca") from None
            except (ssl.SSLError, OSError) as exc:
                raise UnreachableError(f"TLS with {url.host}:{url.port} failed: {exc}") from None
        sock.settimeout(options.timeout)
        stream = SocketStream(sock, str(url))
        target = WireTarget(stream, url, options, verified, hint)
        sock.settimeout(None)
        keepalive(sock)
        return target
    except BaseException:
        sock.close()
        raise


def _open_ssh(url: TargetUrl, options: ConnectOptions) -> WireTarget:
    from bmig.wire import ssh

    target = ssh.SshTarget(host=url.host, port=url.port, user=url.user,
                           command=options.ssh_command, known_hosts=options.known_hosts,
                           accept_new_host_key=options.accept_new_host_key,
                           identity=options.identity, cipher=options.ssh_cipher,
                           connect_timeout=options.timeout)
    command = options.ssh_command
    opener: Callable[..., Stream] = (ssh.open_openssh if options.ssh_program == "openssh"
                                     else ssh.open_paramiko)
    stream = opener(target, command)
    try:
        return WireTarget(stream, url, options, receiver_verified=True)
    except (UnreachableError, ProtocolError) as exc:
        hint = ssh.failure_hint(stream)
        stream.close()
        if hint:
            raise UnreachableError(hint) from None
        raise exc
    except BaseException:
        stream.close()
        raise
