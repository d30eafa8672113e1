"""One sender's session on the receiver: hello, authentication, open, passes, data.

States and what each allows (anything else is answered ERROR and, where the stream can
no longer be trusted, the session ends):

    hello    HELLO                              (frames capped at MAX_PREAUTH_FRAME)
    auth     AUTH                               (bmig.wire.handshake decides when)
    ready    OPEN, STATUS_REQ, BYE
    open     PASS_BEGIN, HASHES_REQ, STATUS_REQ, FLUSH, PROMOTE, RESYNC_REQ, BYE
    pass     DATA, ZERO, FLUSH, HASHES_REQ, PASS_END, STATUS_REQ, BYE
    replicate DATA, ZERO, FLUSH, STATUS_REQ, BYE   (OPEN with mode "replicate")
    inspect  HASHES_REQ, STATUS_REQ, BYE          (OPEN with mode "inspect": verify reads)

A replication session (bmig-nbd forwarding the application's writes, protocol A/B/C)
has a lock of its own, so it runs beside the pass session that resyncs the same target;
each DATA says which acknowledgement its writer waits for (RECEIVED, WRITTEN, DURABLE).
The frames one read brings (BATCH_FRAMES and BATCH_BYTES at most) are handled as a
batch: their RECEIVED and WRITTEN leave together once no whole frame is left in the
buffer (one write, one wake-up of the sender's reader), and before any ERROR, so
acknowledgements keep the frames' order; a sender that asks for it at OPEN (``acks:
"cumulative"``) gets the last one of each kind only, which covers the frames before it.
The target's record is checked once per batch, under the record lock held from the
batch's first write to its last (LineageWatch.hold).

A DATA or ZERO is checked (offset and length inside the target, codec, size, checksum)
before anything is written; a bad one is answered ERROR with its seq and nothing of it is
written, and the session goes on. FLUSH(seq) is answered DURABLE(seq) once fdatasync has
returned for everything written before it: the syncer thread does that, so receiving goes
on while the disk flushes. The sender commits a chunk only on DURABLE (invariant 3).

The record says at every moment whether the target is a copy of one moment of the
source (invariant 7's record, docs/wire-protocol.md "The target record"): a pass makes it
inconsistent before its first write (passes do not keep the write order), and only a
pass that ends with nothing dirty on the source but what a replication session carries
makes it consistent again, or in-sync while a replication session is connected. A
replication session makes it inconsistent at OPEN (the source may have chunks the target
lacks, and a replicated write into one of them mixes two moments), records its protocol
and window (what a promotion without the source may lose), and turns in-sync back into
consistent when it ends: the target then holds every write up to the last one it got.
Before a session writes the record it reads it again under the record lock and ends if
its lineage changed meanwhile (a promotion on this host); a pass session's writes are
checked against the record like a replication session's once its pass began.

The session is the state machine; its changes of the target's record are
bmig.receiver.sessionrecord's (the session says when), STATUS's records
bmig.receiver.records', what OPEN decides bmig.receiver.opening's, the fdatasync thread
bmig.receiver.syncer's, the watch over a replication session's lineage
bmig.receiver.lineagewatch's. It reads and writes one sender's channel; listeners,
threads and limits are bmig.receiver.service's.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from bmig import __version__
from bmig.chunkmath import chunk_count
from bmig.constants import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE
from bmig.errors import (BmigError, ChecksumMismatch, ProtocolError, TargetError,
                         UnknownExport)
from bmig.framing import ConnectionClosed
from bmig.limits import MAX_HASHES, RESYNC_PAGE
from bmig.lineage import REPLICATION_PROTOCOLS_SEEN, hex_id, load_resync, parse_id
from bmig.receiver.lineagewatch import LineageWatch
from bmig.receiver.opening import MODES, OpenRequest, open_export
from bmig.receiver.policy import Policy, TargetConfig
from bmig.receiver.records import configured_targets
from bmig.receiver.sessionrecord import SessionRecord
from bmig.receiver.syncer import Syncer
from bmig.receiver.target import RecordLock, TargetDevice, TargetLock
from bmig.wire import auth, codec, handshake
from bmig.wire.channel import Channel
from bmig.wire.protocol import (FLAG_ACK_RECEIVED, FLAG_ACK_WRITTEN, FLAG_FUA, KNOWN_FLAGS,
                                WIRE_VERSION, Message, T, decode_json,
                                error_message, pack_hashes, pack_seq, type_of, unpack_data,
                                unpack_seq, unpack_zero)

log = logging.getLogger("breceive")

FEATURES = ["zstd", "xxh3", "hashes", "zero-ranges"]
# A batch (acknowledgements held back, the record checked once and locked to its last
# write) ends when no whole frame is buffered, or after this many DATA and ZERO frames,
# or this many bytes written or zeroed: what a promotion may have to wait for.
BATCH_FRAMES = 256
BATCH_BYTES = 8 * 1024 * 1024
# One ZERO is zeroed in pieces of this size, the record lock let go between them: about
# a second of writing zeros where the device cannot punch or offload, and a few thousand
# pieces for a whole 1 TiB hole.
ZERO_PIECE = 256 * 1024 * 1024


class Session:
    def __init__(self, channel: Channel, policy: Policy, authenticated: bool, peer: str):
        self.channel = channel
        self.policy = policy
        self.authenticated = authenticated     # the transport alone authenticated the
        #                                        sender (SSH; a TLS client certificate
        #                                        where no secret is configured)
        self.peer = peer
        self.state = "hello"
        self.version = WIRE_VERSION
        self.config: TargetConfig | None = None
        self.target: TargetDevice | None = None
        self.lock: TargetLock | None = None
        self.record_lock: RecordLock | None = None
        self._watch: LineageWatch | None = None
        self.source_id = 0
        self.source_generation = 0
        self.source_previous: list[str] = []
        self._previous_ids: list[int] = []
        self.size = 0
        self.mode = "pass"
        self.relation = ""
        self.keeper: SessionRecord | None = None    # its writes of the record, once open
        self._resync: list[tuple[int, int]] | None = None   # a rejoining copy's own changes
        self._syncer: Syncer | None = None
        self._sync_lock = threading.Lock()
        self._acks: list[tuple[bytes, None]] = []     # RECEIVED and WRITTEN held back
        self._last_acks: dict[T, int] = {}    # the same, cumulative: the last seq of each
        self._acks_held = 0                   # acknowledgements held back (both ways)
        self._cumulative = False              # OPEN asked for cumulative acknowledgements
        self._batch_frames = 0                # DATA and ZERO frames of this batch
        self._batch_bytes = 0                 # bytes they write or zero
        self._acks_lock = threading.Lock()
        self._closed = False
        self.bytes_written = 0
        self.on_ready: Callable[[], None] | None = None    # called once authenticated
        self.on_refused: Callable[[BmigError], None] | None = None   # handshake failed

    # -- plumbing ----------------------------------------------------------------------

    def send(self, message: Message) -> None:
        self.channel.send(message.encode())

    def send_seq(self, kind: T, seq: int) -> None:
        self.channel.send(pack_seq(kind, seq))

    def _ack_later(self, kind: T, seq: int) -> None:
        """RECEIVED or WRITTEN, sent with the others of this batch of frames
        (``_send_acks``); a sender that asked for cumulative acknowledgements gets the
        last one of each kind only, which covers every frame before it (frames are
        handled in order, and a refused one is answered ERROR before any later one)."""
        with self._acks_lock:
            if self._cumulative:
                self._last_acks[kind] = seq
            else:
                self._acks.append((pack_seq(kind, seq), None))
            self._acks_held += 1

    def _end_batch(self) -> None:
        """The frames of a batch are written: the record lock goes (LineageWatch.hold),
        then their acknowledgements leave, in one write. The session's thread only."""
        self._batch_frames = self._batch_bytes = 0
        self._let_go_record()
        self._send_acks()

    def _let_go_record(self) -> None:
        """Before anything that may wait on the peer or change the record (the session's
        thread only: the lock is its batch's)."""
        if self._watch is not None:
            self._watch.let_go()

    def _send_acks(self) -> None:
        """The acknowledgements held back, in one write: at the end of a batch (before
        the next read may wait), before an ERROR, and at the end."""
        with self._acks_lock:
            acks, self._acks = self._acks, []
            acks += [(pack_seq(kind, seq), None) for kind, seq in self._last_acks.items()]
            self._last_acks.clear()
            self._acks_held = 0
        if acks:
            self.channel.send_many(acks)

    def fail(self, exc: BmigError, seq: int | None = None, fatal: bool = True) -> None:
        """Tell the sender; a fatal error ends the session."""
        log.log(logging.ERROR if fatal else logging.WARNING, "%s: %s", self.peer, exc.message)
        try:
            self._send_acks()            # what came before the refused frame, first
            self.send(error_message(exc, seq, fatal))
        except BmigError:
            pass
        if fatal:
            self._closed = True
            self.channel.close_after_reason()

    def sync_now(self) -> None:
        with self._sync_lock:
            assert self.target is not None
            self.target.sync()

    # -- the session -------------------------------------------------------------------

    def run(self) -> None:
        try:
            try:
                self._handshake()
            except BmigError as exc:
                self._refuse(exc)
                return
            while not self._closed:
                # A batch: the frames one read brought, within BATCH_FRAMES and BATCH_BYTES.
                if (self._batch_frames or self._acks_held) and (
                        self._batch_frames >= BATCH_FRAMES or self._batch_bytes >= BATCH_BYTES
                        or not self.channel.has_frame()):
                    self._end_batch()
                body = self.channel.read()
                if not self._dispatch(body):
                    break
        except ConnectionClosed:
            log.debug("%s: connection closed", self.peer)
        except BmigError as exc:
            self._let_go_record()
            if not self._closed:
                self.fail(exc)
        finally:
            self._let_go_record()
            self._finish()

    def _handshake(self) -> None:
        """Hello and authentication (bmig.wire.handshake); then ``on_ready`` may still
        refuse the session (too many), with an error the sender reads."""
        agreed = handshake.receiver(self.channel, self.policy.secret, self.authenticated,
                                    f"breceive {__version__}", FEATURES)
        self.version = agreed.version
        self.state = "ready"
        log.info("%s: authenticated (%s%s), %s", self.peer,
                 auth.METHOD if agreed.method == auth.METHOD else "by the transport",
                 ", frames sealed" if agreed.sealed else "", agreed.peer)
        if self.on_ready is not None:
            self.on_ready()

    def _refuse(self, exc: BmigError) -> None:
        """A peer that did not get through the handshake: one line to the log (through
        ``on_refused``, which may hold it back), an ERROR if it still listens, the end."""
        self._closed = True
        if isinstance(exc, ConnectionClosed) and self.state == "hello":
            log.debug("%s: closed before the end of the handshake", self.peer)
        elif self.on_refused is not None:
            self.on_refused(exc)
        else:
            log.warning("%s: %s", self.peer, exc.message)
        try:
            self.send(error_message(exc, fatal=True))
        except BmigError:
            pass

    def _dispatch(self, body: memoryview) -> bool:
        kind = type_of(body)
        if kind == T.DATA or kind == T.ZERO:
            # The batch's first write takes the record lock and checks the record
            # (TargetDevice.before_write, LineageWatch.hold).
            self._batch_frames += 1
            (self._data if kind == T.DATA else self._zero)(body)
            return True
        self._let_go_record()            # the other messages may change the record
        if kind == T.FLUSH:
            self._flush(unpack_seq(body))
        else:
            message = decode_json(body) if kind in _JSON_HANDLERS else None
            if message is None:
                self.fail(ProtocolError(f"{kind.name} is not something a sender sends"),
                          fatal=False)
                return True
            return _JSON_HANDLERS[kind](self, message)
        return True

    def _require(self, *states: str) -> None:
        if self.state not in states:
            raise ProtocolError(f"not allowed now (session is {self.state})")

    # -- control messages --------------------------------------------------------------

    def _open(self, msg: Message) -> bool:
        self._require("ready")
        export = msg.str("export")
        config = self.policy.targets.get(export)
        if config is None:
            self.fail(UnknownExport(f"no target named {export!r} is configured on this "
                                    "receiver"), fatal=False)
            return True
        source_id = parse_id(msg.fields.get("device_id"), "device_id")
        generation = parse_id(msg.fields.get("generation"), "generation")
        previous = [parse_id(g, "previous") for g in msg.list("previous")[:16]]
        size = msg.int("size", low=1, high=1 << 60)
        discard = msg.bool("discard_target_data")
        mode = msg.str("mode", "pass")
        if mode not in MODES:
            raise ProtocolError(f"OPEN: unknown mode {mode!r}")
        request = OpenRequest(source_id, generation, previous, size, discard, mode)
        protocol = msg.fields.get("protocol")
        window = msg.int("window", 0) if request.replicate else 0
        if request.replicate and protocol not in REPLICATION_PROTOCOLS_SEEN:
            protocol = None
        cumulative = request.replicate and msg.fields.get("acks") == "cumulative"
        opened = open_export(self.policy, self.peer, config, request)
        record, target = opened.record, opened.target
        self.config, self.target, self.lock = config, target, opened.lock
        self.record_lock = opened.record_lock
        self.source_id, self.source_generation, self.size = source_id, generation, size
        self.source_previous = [hex_id(g) for g in previous]
        self._previous_ids = previous
        self.mode, self.relation = mode, opened.relation
        self._cumulative = cumulative
        reply_extra: dict = {}
        if opened.relation == "rejoin":
            self._resync = (load_resync(self.policy.state_dir, export)
                            if record.resync == "ranges" else None)
            reply_extra["resync"] = {"all": self._resync is None,
                                     "ranges": len(self._resync or ())}
        if opened.record_lock is not None:          # None when inspecting
            self.keeper = SessionRecord(self.policy.state_dir, export, record,
                                        opened.record_lock, opened.disk, mode, source_id,
                                        generation, previous)
        if request.replicate:
            assert self.keeper is not None
            self.keeper.replication_began(protocol, window)
            self._watch_lineage()
        self._syncer = Syncer(self.sync_now, lambda seq: self.send_seq(T.DURABLE, seq),
                              self.fail)
        self._syncer.start()
        self.state = {"replicate": "replicate", "inspect": "inspect"}.get(mode, "open")
        log.info("%s: opened %s (%s, %d bytes, %s)", self.peer, export, config.path, size,
                 opened.relation)
        reply = {"relation": opened.relation, "target": record.to_json(), **reply_extra}
        if opened.why:
            reply["why"] = f"{config.path} is not the copy its record describes: {opened.why}"
        self.send(Message(T.OPENED, reply))
        return True

    # -- the record (bmig.receiver.sessionrecord) and the lineage watch ---------------

    def _watch_lineage(self) -> None:
        """From now on every write is checked against the record (LineageWatch)."""
        if self._watch is not None:
            return
        assert self.config is not None and self.record_lock is not None
        assert self.target is not None
        self._watch = LineageWatch(self.policy.state_dir, self.config.export,
                                   self.record_lock, self.source_id, self.source_generation,
                                   self._previous_ids, self.fail)
        self.target.before_write = self._watch.hold
        self._watch.start()

    def _pass_begin(self, msg: Message) -> bool:
        self._require("open")
        assert self.keeper is not None and self.target is not None
        self.keeper.pass_began(self.source_previous, self.size, self.target.identity,
                               msg.int("bytes", 0))
        self._resync = None
        self.state = "pass"
        self._watch_lineage()
        return True

    def _resync_request(self, msg: Message) -> bool:
        """A rejoining copy's own changes, a page at a time: the source marks them dirty
        before its pass, so they are overwritten with its data."""
        self._require("open")
        if self.relation != "rejoin" or self._resync is None:
            raise ProtocolError("RESYNC_REQ: this target has no resync set")
        start = msg.int("start", 0)
        page = self._resync[start:start + RESYNC_PAGE]
        end = start + len(page)
        self.send(Message(T.RESYNC, {"ranges": [list(r) for r in page],
                                     "next": end if end < len(self._resync) else None}))
        return True

    def _promote(self, msg: Message) -> bool:
        """Cutover, step 6: the target gets a new generation and becomes the primary;
        the source it came from can never write to it again (invariant 7), and a
        replication session of it ends at its next batch of writes."""
        self._require("open")
        assert self.keeper is not None and self.target is not None
        new = parse_id(msg.fields.get("generation"), "generation")
        record = self.keeper.promote(new, self._settle_for_promotion)
        log.warning("%s: %s promoted: generation %s, primary now; its former source is "
                    "refused from here on", self.peer, record.export, hex_id(new))
        self.send(Message(T.PROMOTED, {"target": record.to_json()}))
        return True

    def _settle_for_promotion(self) -> None:
        """Under the record lock, before a promotion changes the record: this session
        changes the lineage itself (no watch over it), and every replicated write so far
        is durable first."""
        assert self.target is not None
        if self._watch is not None:
            self._watch.stop()
            self._watch = None
            self.target.before_write = None
        self.sync_now()

    def _pass_end(self, msg: Message) -> bool:
        """``complete``: everything the sender checked out was shipped; ``consistent``
        (a sender that does not say: as complete): nothing is dirty on the source but
        what a replication session carries. Only both make the copy consistent."""
        self._require("pass")
        assert self.keeper is not None
        complete = msg.bool("complete", True)
        consistent = complete and msg.bool("consistent", complete)
        self.sync_now()
        if complete:
            self.keeper.pass_ended(consistent)
        record = self.keeper.record
        self.state = "open"
        self.send(Message(T.PASS_DONE, {"target": record.to_json()}))
        return True

    def _hashes(self, msg: Message) -> bool:
        self._require("open", "pass", "inspect")
        assert self.target is not None
        offset = msg.int("offset")
        length = msg.int("length", low=1)
        chunk = msg.int("chunk_size", low=MIN_CHUNK_SIZE, high=MAX_CHUNK_SIZE)
        if chunk & (chunk - 1) or offset % chunk:
            raise ProtocolError("HASHES_REQ: chunk_size must be a power of two and offset "
                                "a multiple of it")
        if chunk_count(length, chunk) > MAX_HASHES or offset + length > self.size:
            raise ProtocolError(f"HASHES_REQ of {length} bytes at {offset} is too large or "
                                "outside the target")
        self.channel.send(pack_hashes(offset, self.target.hashes(offset, length, chunk)))
        return True

    def _status(self, msg: Message) -> bool:
        """Every configured target's record (any state)."""
        targets = configured_targets(self.policy.state_dir, self.policy.targets)
        self.send(Message(T.STATUS, {"targets": targets, "server": f"breceive {__version__}"}))
        return True

    def _bye(self, msg: Message) -> bool:
        return False

    # -- data --------------------------------------------------------------------------

    def _check_range(self, seq: int, offset: int, length: int) -> None:
        if offset + length > self.size:
            raise ProtocolError(f"seq {seq}: {offset}+{length} is outside the target "
                                f"({self.size} bytes)")

    def _data(self, body: memoryview) -> None:
        self._require("pass", "replicate")
        assert self.target is not None
        head, payload = unpack_data(body)
        self._batch_bytes += head.raw_length
        try:
            self._check_flags(head.seq, head.flags)
            self._check_range(head.seq, head.offset, head.raw_length)
            raw = codec.decode(head.codec, payload, head.raw_length)
            if codec.checksum(raw) != head.checksum:
                raise ChecksumMismatch(f"seq {head.seq}: checksum mismatch for "
                                       f"{head.offset}+{head.raw_length}; nothing written")
            if head.flags & FLAG_ACK_RECEIVED:
                self._ack_later(T.RECEIVED, head.seq)
            self.target.write(head.offset, raw)
        except (ProtocolError, TargetError) as exc:
            self._let_go_record()
            self.fail(exc, head.seq, fatal=False)
            return
        self.bytes_written += head.raw_length
        self._acknowledge(head.seq, head.flags)

    def _zero(self, body: memoryview) -> None:
        self._require("pass", "replicate")
        assert self.target is not None
        seq, offset, length, flags = unpack_zero(body)
        self._batch_bytes += length
        try:
            self._check_flags(seq, flags)
            self._check_range(seq, offset, length)
            if flags & FLAG_ACK_RECEIVED:
                self._ack_later(T.RECEIVED, seq)
            # In pieces, letting go of the record lock between them: a long zeroing
            # (BLKZEROOUT of a device that cannot offload it) keeps a change of the
            # record waiting for one piece at most.
            for start in range(offset, offset + length, ZERO_PIECE):
                if start != offset:
                    self._let_go_record()
                self.target.zero(start, min(ZERO_PIECE, offset + length - start))
        except (ProtocolError, TargetError) as exc:
            self._let_go_record()
            self.fail(exc, seq, fatal=False)
            return
        self._acknowledge(seq, flags)

    @staticmethod
    def _check_flags(seq: int, flags: int) -> None:
        if flags & ~KNOWN_FLAGS:
            raise ProtocolError(f"seq {seq}: unknown flags {flags:#x}; nothing written")

    def _acknowledge(self, seq: int, flags: int) -> None:
        """What the writer of a replicated frame waits for, once it is written."""
        if flags & FLAG_FUA:
            self._flush(seq)
        elif flags & FLAG_ACK_WRITTEN:
            self._ack_later(T.WRITTEN, seq)

    def _flush(self, seq: int) -> None:
        self._require("open", "pass", "replicate")
        assert self._syncer is not None
        if self._syncer.failed is not None:
            raise self._syncer.failed
        self._syncer.request(seq)

    def _finish(self) -> None:
        """End the session, in this order. Every step runs even when one before it
        failed: the export's locks and the connection may not outlive the session (the
        export would be refused to every sender until breceive restarts); what failed
        first is raised after the last step."""
        failed: BaseException | None = None
        for step in (self._send_last_acks, self._stop_watch, self._end_replication,
                     self._stop_syncer, self._close_target, self._close_locks,
                     self.channel.close):
            try:
                step()
            except BaseException as exc:       # noqa: BLE001 - raised after the rest
                failed = failed or exc
        if failed is not None:
            raise failed

    def _send_last_acks(self) -> None:
        try:
            self._send_acks()
        except BmigError:
            pass

    def _stop_watch(self) -> None:
        if self._watch is not None:
            self._watch.stop()
            self._watch = None

    def _end_replication(self) -> None:
        if self.mode == "replicate" and self.keeper is not None:
            self.keeper.replication_ended(self.peer)

    def _stop_syncer(self) -> None:
        if self._syncer is not None:
            self._syncer.stop()
            self._syncer = None          # it refers back to us: free the buffers now

    def _close_target(self) -> None:
        if self.target is not None:
            try:
                self.target.sync()
            except BmigError as exc:
                log.error("%s: final sync failed: %s", self.peer, exc.message)
            finally:
                self.target.close()

    def _close_locks(self) -> None:
        try:
            if self.record_lock is not None:
                self.record_lock.close()
        finally:
            if self.lock is not None:
                self.lock.release()


_JSON_HANDLERS = {
    T.OPEN: Session._open, T.PASS_BEGIN: Session._pass_begin, T.PASS_END: Session._pass_end,
    T.HASHES_REQ: Session._hashes, T.STATUS_REQ: Session._status, T.BYE: Session._bye,
    T.PROMOTE: Session._promote, T.RESYNC_REQ: Session._resync_request,
}
