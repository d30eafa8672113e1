"""kill -9 of one component at a random moment, under a journaled writer, many times.

One rig: breqd, bmig-nbd in front of a source file, breceive with a target file, and a
writer that writes through bmig-nbd and keeps a journal of what it was told was written.
Each iteration: the writer writes, a sender ships (``bmigrate run``, or ``sync`` when the
sender is the victim), the victim is killed with SIGKILL at a random moment and started
again, the writer stops, and a last ``bmigrate sync --threshold 0`` must leave:

- every write the writer saw acknowledged in the source (or a later one whose outcome it
  could not know, never an older one), each 4 KiB block whole;
- the target byte for byte equal to the source, and nothing dirty in breqd.

The cutover is a victim too: ``bmigrate cutover`` killed at a random moment of its
drain, freeze or handover. Then the rig does what bmigrate(1) tells an operator to do
after a cutover that did not finish: ask breqd, and the target when breqd records the
source as handed over; a target that is primary with the generation breqd names means
the handover happened (the source must then be read-only and the target equal to it,
with every acknowledged write); otherwise the source is made primary again (``track
set-role``, bmig-nbd started again) and the last sync must converge as above. A
completed handover ends the rig's life: the next iteration starts a fresh one.

The same code runs a few seeded iterations in the test suite
(tests/integration/test_crashloop.py) and many in bench/crashloop.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from bmig.nbdclient import NbdClient
from tests.daemon import Daemon, breqd_argv

MiB = 1 << 20
BLOCK = 4096
CHUNK = 64 << 10
MAGIC = b"bmigjrnl"
HEAD = struct.Struct("<8sQQ")          # magic, block number, write id
COMPONENTS = ("sync", "run", "breqd", "bmig-nbd", "breceive", "cutover")
STEP_TIMEOUT = 120
# what bmigrate cutover logs as it starts each step (bmig.sender.cutover)
CUTOVER_STEPS = ("step 1: replicate", "step 2: drain", "step 3: freeze", "step 4: flush",
                 "step 6: hand over")


def block_image(block: int, write: int) -> bytes:
    """What write ``write`` puts in ``block``: a header and a filler only it makes."""
    head = HEAD.pack(MAGIC, block, write)
    fill = struct.pack("<QQ", write * 0x9E3779B97F4A7C15 % (1 << 64), block)
    return head + (fill * (BLOCK // len(fill)))[:BLOCK - len(head)]


def _python(module_main: str, *args: str) -> list[str]:
    return [sys.executable, "-c", f"from {module_main} import main; main()", *args]


@dataclass
class Journal:
    """Per 4 KiB block: the last write acknowledged, and the writes whose outcome the
    writer could not learn (the connection broke, or the server answered an error)."""

    blocks: int
    acked: dict[int, int] = field(default_factory=dict)
    unknown: dict[int, set[int]] = field(default_factory=dict)
    next_id: int = 1

    def check(self, path: str) -> list[str]:
        """What in ``path`` contradicts the journal (empty when all is well)."""
        problems: list[str] = []
        with open(path, "rb") as f:
            for block in range(self.blocks):
                data = f.read(BLOCK)
                acked = self.acked.get(block, 0)
                unknown = self.unknown.get(block, set())
                if len(data) < BLOCK or data.count(0) == BLOCK:
                    if acked:
                        problems.append(f"block {block}: zeros, write {acked} was acknowledged")
                    continue
                magic, number, write = HEAD.unpack_from(data)
                if magic != MAGIC or number != block:
                    problems.append(f"block {block}: not a block image")
                elif data != block_image(block, write):
                    problems.append(f"block {block}: write {write} torn")
                elif write != acked and not (write in unknown and write > acked):
                    problems.append(f"block {block}: holds write {write}, acknowledged "
                                    f"{acked or 'none'}")
        return problems


class JournaledWriter(threading.Thread):
    """Writes through bmig-nbd, one request at a time, into ``journal``; reconnects
    until stopped."""

    def __init__(self, uri: str, journal: Journal, seed: int, per_second: int = 600):
        super().__init__(daemon=True, name="journaled writer")
        self.uri, self.journal, self.per_second = uri, journal, per_second
        self.blocks = journal.blocks
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.writes = 0
        self.failures = 0
        self.error: BaseException | None = None

    def _one(self, client: NbdClient) -> None:
        if self.rng.random() < 0.85:
            first, count = self.rng.randrange(self.blocks), 1
        else:                                   # across chunk boundaries: the slow path
            count = self.rng.randrange(2, 49)
            first = self.rng.randrange(self.blocks - count)
        journal = self.journal
        write, journal.next_id = journal.next_id, journal.next_id + 1
        data = b"".join(block_image(b, write) for b in range(first, first + count))
        try:
            client.pwrite(data, first * BLOCK)
        except BaseException:
            for b in range(first, first + count):
                journal.unknown.setdefault(b, set()).add(write)
            raise
        for b in range(first, first + count):
            journal.acked[b] = write
        self.writes += 1

    def run(self) -> None:
        started = time.monotonic()
        try:
            while not self.stop.is_set():
                try:
                    client = NbdClient.connect(self.uri, timeout=10)
                except (OSError, Exception):     # bmig-nbd is down: try again soon
                    self.stop.wait(0.05)
                    continue
                try:
                    while not self.stop.is_set():
                        self._one(client)
                        ahead = self.writes / self.per_second - (time.monotonic() - started)
                        if ahead > 0:             # pacing the workload
                            self.stop.wait(ahead)
                    client.flush()
                except Exception:
                    self.failures += 1
                    self.stop.wait(0.02)
                finally:
                    try:
                        client.close()
                    except Exception:
                        pass
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=STEP_TIMEOUT)
        assert not self.is_alive(), "the writer did not stop"
        assert self.error is None, repr(self.error)


def digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(8 * MiB)
            if not block:
                return h.hexdigest()
            h.update(block)


def differing_chunks(a: str, b: str) -> list[int]:
    out = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        index = 0
        while True:
            x, y = fa.read(CHUNK), fb.read(CHUNK)
            if not x and not y:
                return out
            if x != y:
                out.append(index)
            index += 1


@dataclass
class Outcome:
    component: str
    iteration: int
    writes: int
    problems: list[str] = field(default_factory=list)
    handed_over: bool = False        # a cutover's handover happened (cutover only)
    recovery: str = ""               # what the operator's recovery found (cutover only)


class Rig:
    """The daemons of one crash loop, on directories under ``root``."""

    def __init__(self, root: str, size: int = 32 * MiB):
        self.root, self.size = root, size
        self.backing = os.path.join(root, "source.img")
        self.target = os.path.join(root, "target.img")
        self.control = os.path.join(root, "breqd.sock")
        self.nbd_socket = os.path.join(root, "nbd.sock")
        self.secret = os.path.join(root, "secret")
        self.port = 0
        self.breqd: Daemon | None = None
        self.nbd: Daemon | None = None
        self.receiver: Daemon | None = None
        self.sender: subprocess.Popen | None = None
        self.journal = Journal(size // BLOCK)

    @property
    def uri(self) -> str:
        return f"nbd+unix:///d1?socket={self.nbd_socket}"

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    # -- daemons -----------------------------------------------------------------------

    def start(self) -> "Rig":
        with open(self.backing, "wb") as f:
            f.truncate(self.size)
        with open(self.secret, "w") as f:
            f.write("a shared secret of thirty-two bytes!")
        os.chmod(self.secret, 0o600)
        self.start_breqd()
        from bmig.tracker.blocking_client import TrackerClient
        client = TrackerClient(self.control, timeout=30)
        client.add_device("d1", self.size, chunk_size=CHUNK)
        client.close()
        self.start_nbd()
        self.start_receiver()
        return self

    def start_breqd(self) -> None:
        self.breqd = Daemon(breqd_argv(self.path("state"), self.path("devices.d"),
                                       self.control), self.path("breqd.log")).start()

    def start_nbd(self) -> None:
        self.nbd = Daemon(_python("bmig.cli.nbd", "--device", "d1", "--backing", self.backing,
                                  "--unix", self.nbd_socket, "--control", self.control,
                                  "--manage-dir", self.path("manage"), "--log-level", "info"),
                          self.path("nbd.log")).start()

    def start_receiver(self) -> None:
        self.receiver = Daemon(_python("bmig.cli.breceive", "--listen",
                                       f"127.0.0.1:{self.port}", "--state-dir",
                                       self.path("receiver"), "--secret-file", self.secret,
                                       "--target", f"d1={self.target}", "--log-level", "info"),
                               self.path("breceive.log")).start()
        if not self.port:
            for note in self.receiver.notifications:
                match = re.search(r"STATUS=listening on 127\.0\.0\.1:(\d+)", note)
                if match:
                    self.port = int(match.group(1))
            assert self.port, self.receiver.notifications

    def stop(self) -> None:
        self.stop_sender()
        for daemon in (self.nbd, self.receiver, self.breqd):
            if daemon is not None:
                daemon.stop()

    def fresh(self) -> None:
        """Everything stopped and removed, and started again: a new source, target and
        breqd (after a handover the old pair has served its purpose)."""
        self.stop()
        import shutil
        for name in os.listdir(self.root):
            path = os.path.join(self.root, name)
            if name.endswith(".log"):
                continue
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        self.port = 0
        self.journal = Journal(self.size // BLOCK)
        self.start()

    def tracker_stats(self) -> dict:
        from bmig.tracker.blocking_client import TrackerClient
        client = TrackerClient(self.control, timeout=30)
        try:
            return client.stats("d1")
        finally:
            client.close()

    def target_record(self) -> dict:
        """The target's record as breceive gives it, once no session holds the target
        (until then the record may still change)."""
        from bmig.sender.targets import export_record
        from bmig.wire.options import ConnectOptions
        from bmig.wire.urls import parse_target_url
        url = parse_target_url(f"tcp://127.0.0.1:{self.port}/d1")
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            record = export_record(url, ConnectOptions.from_dict({"secret_file": self.secret}))
            assert record is not None, "breceive keeps no record of d1"
            if not record.get("busy") or time.monotonic() > deadline:
                return record
            time.sleep(0.05)

    # -- the sender ----------------------------------------------------------------------

    def bmigrate(self, command: str, *extra: str) -> list[str]:
        return _python("bmig.cli.main", command, "d1", "--source", self.backing, "--to",
                       f"tcp://127.0.0.1:{self.port}/d1", "--secret-file", self.secret,
                       "--control", self.control, "--manage-dir", self.path("manage"), *extra)

    def start_sender(self, command: str) -> None:
        log = open(self.path(f"bmigrate-{command}.log"), "ab")
        self.sender = subprocess.Popen(self.bmigrate(command, "--log-level", "info"),
                                       stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       start_new_session=True)
        log.close()

    def stop_sender(self, kill: bool = False) -> None:
        if self.sender is None:
            return
        if self.sender.poll() is None:
            os.killpg(self.sender.pid, signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.sender.wait(timeout=STEP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.sender.pid, signal.SIGKILL)
                self.sender.wait(timeout=STEP_TIMEOUT)
        self.sender = None

    def final_sync(self) -> subprocess.CompletedProcess:
        return subprocess.run(self.bmigrate("sync", "--threshold", "0", "--json"),
                              capture_output=True, text=True, timeout=STEP_TIMEOUT * 3,
                              stdin=subprocess.DEVNULL)

    # -- one iteration -------------------------------------------------------------------

    def kill(self, component: str) -> None:
        """SIGKILL ``component`` and start it again (a sender is not restarted)."""
        if component in ("sync", "run"):
            self.stop_sender(kill=True)
        elif component == "breqd":
            assert self.breqd is not None
            self.breqd.kill9()
            self.start_breqd()
        elif component == "bmig-nbd":
            assert self.nbd is not None
            self.nbd.kill9()
            self.start_nbd()
        elif component == "breceive":
            assert self.receiver is not None
            self.receiver.kill9()
            self.start_receiver()
        else:
            raise ValueError(component)

    def iteration(self, component: str, number: int, seed: int) -> Outcome:
        if component == "cutover":
            return self.cutover_iteration(number, seed)
        rng = random.Random(seed)
        writer = JournaledWriter(self.uri, self.journal, seed)
        writer.start()
        try:
            self.start_sender("sync" if component == "sync" else "run")
            time.sleep(rng.uniform(0.3, 2.0))            # the random moment of the kill
            self.kill(component)
            time.sleep(rng.uniform(0.1, 0.8))            # writes go on after the restart
        finally:
            writer.finish()
            self.stop_sender()
        outcome = Outcome(component, number, writer.writes)
        return self.check_converged(outcome)

    def check_converged(self, outcome: Outcome) -> Outcome:
        """The last sync, then the source against the journal, the target against the
        source, and breqd: nothing dirty."""
        done = self.final_sync()
        if done.returncode != 0:
            outcome.problems.append(f"last sync exited {done.returncode}: "
                                    f"{done.stderr.strip()[-500:]}")
        outcome.problems += [f"source: {p}" for p in self.journal.check(self.backing)[:20]]
        if digest(self.backing) != digest(self.target):
            chunks = differing_chunks(self.backing, self.target)
            outcome.problems.append(f"target differs from the source in chunks {chunks[:20]}")
        stats = self.tracker_stats()
        if stats["dirty_bytes"] or stats["inflight_bytes"]:
            outcome.problems.append(f"breqd: {stats['dirty_bytes']} bytes dirty, "
                                    f"{stats['inflight_bytes']} in flight after the last sync")
        return outcome

    def cutover_iteration(self, number: int, seed: int) -> Outcome:
        """``bmigrate cutover`` killed at a random moment, then an operator's recovery."""
        rng = random.Random(seed)
        writer = JournaledWriter(self.uri, self.journal, seed)
        writer.start()
        try:
            log = self.path("bmigrate-cutover.log")
            seen = os.path.getsize(log) if os.path.exists(log) else 0
            self.start_sender("cutover")
            assert self.sender is not None
            # The random moment: a step of the cutover chosen at random, then up to 50 ms
            # into it (the steps take milliseconds to a fraction of a second each).
            step = rng.choice(CUTOVER_STEPS).encode()
            deadline = time.monotonic() + STEP_TIMEOUT
            while self.sender.poll() is None and time.monotonic() < deadline:
                with open(log, "rb") as f:
                    f.seek(seen)
                    if step in f.read():
                        break
                time.sleep(0.002)
            try:
                self.sender.wait(timeout=rng.uniform(0.0, 0.05))
            except subprocess.TimeoutExpired:
                pass
            finished = self.sender.poll()
            self.stop_sender(kill=True)
            time.sleep(rng.uniform(0.1, 0.5))            # writes go on, or are refused
        finally:
            writer.finish()
        outcome = Outcome("cutover", number, writer.writes)
        mine = self.tracker_stats()
        if mine["role"] == "handed-over":
            record = self.target_record()
            if record.get("role") == "primary" and record.get("generation") == mine["successor"]:
                outcome.handed_over = True
                outcome.recovery = "handed over" if finished == 0 else "promoted, then killed"
                outcome.problems += [f"source: {p}" for p in self.journal.check(self.backing)[:20]]
                if digest(self.backing) != digest(self.target):
                    chunks = differing_chunks(self.backing, self.target)
                    outcome.problems.append("handed over, but the target differs from the "
                                            f"source in chunks {chunks[:20]}")
                try:
                    with NbdClient.connect(self.uri, timeout=30) as client:
                        client.pwrite(b"x" * BLOCK, 0)
                    outcome.problems.append("the source took a write after the handover")
                except Exception:
                    pass
                self.fresh()
                return outcome
            # Not promoted: the source is the primary again, as bmigrate(1) says.
            outcome.recovery = "recorded as handed over, not promoted: set-role primary"
            subprocess.run(_python("bmig.cli.main", "track", "set-role", "d1", "primary",
                                   "--control", self.control),
                           check=True, capture_output=True, timeout=STEP_TIMEOUT,
                           stdin=subprocess.DEVNULL)
        else:
            outcome.recovery = "not handed over"
            if finished == 0:
                outcome.problems.append("the cutover exited 0 but breqd does not record "
                                        f"the handover: {mine}")
            from bmig.sender.status import nbd_status
            nbd = nbd_status(self.path("manage"), "d1") or {}
            if nbd.get("read_only") or nbd.get("frozen"):
                outcome.problems.append("a cutover killed before the handover left the "
                                        f"source {'read-only' if nbd.get('read_only') else 'frozen'}")
        assert self.nbd is not None
        self.nbd.stop()                                  # a read-only left behind goes
        self.start_nbd()
        return self.check_converged(outcome)
