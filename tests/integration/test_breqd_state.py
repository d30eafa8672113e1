"""breqd's state directory: one owner, failing writes, a full disk, clean restarts, systemd.

A mark is acknowledged only when it is on disk (invariant 1): while bitmap writes cannot
complete (a frozen file system) no mark that needs one is answered; when they fail, such
a mark is answered `state-write-failed`, never OK, and marks work again once writes do.
A bitmap that cannot be trusted becomes all dirty (invariant 4). These cases run on small
file systems of their own (tmpfs, ext4 on a loop device; skipped where mounting is not
permitted).
"""

from __future__ import annotations

import errno
import glob
import os
import signal
import socket
import subprocess

import pytest

from bmig.errors import BmigError, StateError, StateWriteError
from bmig.tracker.protocol import Op
from bmig.tracker.store import (BITS_PER_PAGE, BLOCK, HEADER_SLOTS, PAGES_OFFSET, Header,
                                Identity, unpack_page)
from tests.daemon import breqd_argv, wait_until
from tests.integration.breqd_helpers import (MiB, add_clean_device, bmigrate, body,
                                             breqd_daemon, chunks_of, client, device_toml,
                                             dirty_chunks, hello, one_line_error, raw_connect,
                                             receive, send, write_atomic)

CHUNK = 4096
PAGE_CHUNKS = BITS_PER_PAGE    # chunks per bitmap page (32512)
SIZE = 256 * MiB               # 65536 chunks: three bitmap pages
START_TIMEOUT = 30


def control_of(daemon) -> str:
    return daemon.argv[daemon.argv.index("--control") + 1]


def run_breqd(argv: list[str]) -> subprocess.CompletedProcess:
    """A breqd expected to refuse to start: its exit status and output."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT,
                          stdin=subprocess.DEVNULL)


def queued_notifications(daemon) -> list[str]:
    """sd_notify datagrams still queued on the daemon's notify socket."""
    sock = daemon._notify
    assert sock is not None
    sock.setblocking(False)
    out = []
    try:
        while True:
            out.append(sock.recv(4096).decode())
    except BlockingIOError:
        pass
    finally:
        sock.setblocking(True)
    return out


# -- one owner per state directory ---------------------------------------------------

def test_a_second_breqd_on_the_same_state_dir_refuses_and_names_the_first(tmp_path, daemons):
    root = str(tmp_path)
    first = daemons.start(breqd_daemon(root))
    state_dir = os.path.join(root, "state")
    second = run_breqd(breqd_argv(state_dir, str(tmp_path / "other.d"),
                                  str(tmp_path / "other.sock")))
    assert second.returncode == 6, second
    lines = second.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in second.stderr, second.stderr
    assert "in use by" in lines[0] and f"pid {first.pid}" in lines[0], lines
    assert control_of(first) in lines[0], lines       # which breqd: its control socket
    assert not os.path.exists(tmp_path / "other.sock")
    with client(control_of(first)) as c:
        add_clean_device(c, "d", 16 * MiB)
        c.mark("d", [(0, 4096)])

    # Another state dir but the same control socket: refused too, and the first keeps it.
    third = run_breqd(breqd_argv(str(tmp_path / "state3"), str(tmp_path / "d3"),
                                 control_of(first)))
    assert third.returncode == 6, third
    assert "in use by another process" in third.stderr and "Traceback" not in third.stderr
    with client(control_of(first)) as c:
        assert c.stats("d")["dirty_bytes"] == 4096

    # Once the first is gone, the state dir is free (a kill -9 leaves no stale lock).
    first.kill9()
    again = daemons.restart(first)
    with client(control_of(again)) as c:
        assert c.stats("d")["dirty_bytes"] == 4096


def test_unusable_state_or_control_paths_exit_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory\n")
    bad_state = run_breqd(breqd_argv(str(blocker / "state"), str(tmp_path / "d.d"),
                                     str(tmp_path / "s.sock")))
    assert bad_state.returncode == 6, bad_state
    assert "cannot create" in bad_state.stderr and "Traceback" not in bad_state.stderr
    bad_control = run_breqd(breqd_argv(str(tmp_path / "state"), str(tmp_path / "d.d"),
                                       str(blocker)))
    assert bad_control.returncode == 3, bad_control
    assert "is not a socket" in bad_control.stderr and "Traceback" not in bad_control.stderr
    assert blocker.read_text() == "not a directory\n"


# -- a state directory that stops taking writes --------------------------------------

@pytest.fixture
def on_tmpfs(tmp_path, mounts, daemons):
    """breqd whose state dir is a small tmpfs of its own."""
    root = str(tmp_path)
    state_dir = mounts.tmpfs(os.path.join(root, "state"), "1m")
    daemon = daemons.start(breqd_daemon(root, state_dir=state_dir))
    return daemon, state_dir


def _newest_slot(path: str, page: int) -> int:
    """Which of the two slots of ``page`` holds its newest valid copy."""
    with open(path, "rb") as f:
        copies = []
        for slot in range(HEADER_SLOTS):
            f.seek(PAGES_OFFSET + (page * HEADER_SLOTS + slot) * BLOCK)
            copy = unpack_page(f.read(BLOCK), page)
            assert copy is not None, f"page {page} slot {slot} is not valid"
            copies.append((copy[0], slot))
    return max(copies)[1]


def _fill(path: str) -> None:
    """Write zeros to ``path`` until the file system is full."""
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                f.write(bytes(4096))
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return


def test_bitmap_writes_that_fail_fail_their_marks_until_they_work_again(on_tmpfs, daemons):
    """The brief's `mount -o remount,ro` cannot be done under a running breqd: Linux
    refuses it (EBUSY) while files are open for writing, and breqd keeps its lock file
    and bitmaps open. So the writes are made to fail from under it another way: the slot
    of each bitmap page that breqd writes next is punched out of the file and the tmpfs
    is filled up, so that rewriting it fails with ENOSPC; deleting the filler lets writes
    succeed again. The durable copy of every page stays intact throughout."""
    daemon, state_dir = on_tmpfs
    control = control_of(daemon)
    bitmap = os.path.join(state_dir, "d.bitmap")
    page1 = PAGE_CHUNKS * CHUNK + 10 * CHUNK              # a chunk on the second page
    filler = os.path.join(state_dir, "filler")
    with client(control) as c:
        add_clean_device(c, "d", SIZE, CHUNK)
        c.mark("d", [(0, 4096)])
        acked = {0}
        for page in (0, 1):
            spare = 1 - _newest_slot(bitmap, page)
            offset = PAGES_OFFSET + (page * HEADER_SLOTS + spare) * BLOCK
            subprocess.run(["fallocate", "--punch-hole", "--offset", str(offset),
                            "--length", str(BLOCK), bitmap], check=True, timeout=30)
        _fill(filler)
        try:
            for attempt in range(3):   # the bit set in memory must not make a retry OK
                with pytest.raises(StateWriteError) as failed:
                    c.mark("d", [(page1, 4096)])
                assert failed.value.wire_code == "state-write-failed"
            with pytest.raises(StateWriteError):
                c.mark_completed("d", [(page1, 4096)])
            # Chunk 0 is on disk and its page holds no unwritten change: no I/O, so OK.
            c.mark("d", [(0, 4096)])
            with pytest.raises(StateWriteError):   # a first-time mark on that page
                c.mark("d", [(CHUNK, 4096)])
            s = c.stats("d")
            assert s["failed_flushes"] >= 5, s
            with client(control) as other:   # the daemon is fine; so are other clients
                assert other.stats("d")["name"] == "d"
        finally:
            os.unlink(filler)
        c.mark("d", [(page1, 4096)])
        c.mark("d", [(CHUNK, 4096)])
        acked |= {page1 // CHUNK, 1}
    assert "marks fail until it can be written" in daemon.log()
    assert "No space left on device" in daemon.log()
    daemon.kill9()
    daemon = daemons.restart(daemon)
    with client(control) as c:
        assert c.stats("d")["recovered"] is None   # both copies of every page valid again
        assert dirty_chunks(c, "d") == acked


def _first_reply(s) -> int:
    reply = receive(s)
    assert reply.op == Op.REPLY_OK, reply
    return reply.request_id


def test_no_mark_is_acknowledged_before_its_bit_is_on_disk(tmp_path, mounts, daemons):
    """Invariant 1, without a crash: on a frozen file system (fsfreeze) no bitmap write
    can complete, so no mark that needs one may be answered; breqd itself stays
    responsive. Each MARK is followed on its connection by a STATS: breqd handles the
    MARK first, so a MARK acknowledged at once would be answered before the STATS."""
    root = str(tmp_path)
    state_dir = mounts.ext4_loop(os.path.join(root, "state"), os.path.join(root, "fs.img"), 64)
    daemon = daemons.start(breqd_daemon(root, state_dir=state_dir))
    control = control_of(daemon)
    x = 5 * CHUNK                                        # page 0, clean
    durable = 2 * PAGE_CHUNKS * CHUNK + 7 * CHUNK        # page 2, already on disk
    with client(control) as c:
        add_clean_device(c, "d", SIZE, CHUNK)
        c.mark("d", [(0, 4096), (durable, 4096)])
    a, b, fast = raw_connect(control), raw_connect(control), raw_connect(control)
    try:
        for s in (a, b, fast):
            hello(s)
        mounts.freeze(state_dir)
        try:
            send(a, body(Op.MARK, 10, {"device": "d"}, [(x, 4096)]))      # first-time mark
            send(a, body(Op.STATS, 11, {"device": "d"}))
            assert _first_reply(a) == 11, "a first-time mark was acknowledged while the " \
                                          "bitmap could not be written"
            # The same chunk from another writer: dirty in memory, but not yet on disk.
            send(b, body(Op.MARK_COMPLETED, 20, {"device": "d"}, [(x, 4096)]))
            send(b, body(Op.STATS, 21, {"device": "d"}))
            assert _first_reply(b) == 21, "a mark of a chunk whose bit is only in memory " \
                                          "was acknowledged"
            # A chunk whose bit is on disk, on a page with nothing unwritten: at once.
            send(fast, body(Op.MARK, 30, {"device": "d"}, [(durable, 4096)]))
            assert _first_reply(fast) == 30
            with client(control) as c:                   # the daemon is not blocked
                assert c.stats("d")["dirty_bytes"] == 3 * CHUNK
            for s, rid in ((a, 12), (b, 22)):            # and still nothing acknowledged
                send(s, body(Op.STATS, rid, {"device": "d"}))
                assert _first_reply(s) == rid
        finally:
            mounts.thaw(state_dir)
        assert _first_reply(a) == 10                     # durable now: acknowledged
        assert _first_reply(b) == 20
    finally:
        for s in (a, b, fast):
            s.close()
    daemon.kill9()
    daemon = daemons.restart(daemon)
    with client(control) as c:
        assert dirty_chunks(c, "d") == {0, x // CHUNK, durable // CHUNK}


def test_a_read_only_state_dir_stops_breqd_from_starting(tmp_path, mounts):
    state_dir = mounts.tmpfs(str(tmp_path / "state"), "1m")
    mounts.remount(state_dir, "ro")
    done = run_breqd(breqd_argv(state_dir, str(tmp_path / "devices.d"),
                                str(tmp_path / "breqd.sock")))
    assert done.returncode == 6, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "Read-only file system" in lines[0] and "breqd.lock" in lines[0], lines


def test_no_room_for_a_new_bitmap_is_a_clear_error_and_breqd_carries_on(on_tmpfs):
    daemon, state_dir = on_tmpfs
    control = control_of(daemon)
    config_dir = daemon.argv[daemon.argv.index("--config-dir") + 1]
    with client(control) as c:
        add_clean_device(c, "small", 16 * MiB, CHUNK)
        with pytest.raises(StateError) as full:           # a 4 MiB bitmap on a 1 MiB tmpfs
            c.add_device("big", 64 << 30, CHUNK)
        assert full.value.wire_code == "state", full.value
        assert "big" in full.value.message and state_dir in full.value.message
        assert [d["name"] for d in c.list_devices()] == ["small"]
        c.mark("small", [(8 * MiB, 4096)])                # first-time mark: a real write
        assert c.stats("small")["dirty_bytes"] == 4096
    assert "No space left on device" in daemon.log()
    assert sorted(os.listdir(state_dir)) == ["breqd.lock", "small.bitmap",   # no leftovers
                                             "small.lineage"]
    assert not os.path.exists(os.path.join(config_dir, "big.toml"))

    cli = bmigrate(control, "track", "add", "big", "--size", "64G", "--chunk-size", "4K")
    assert cli.returncode == 6, cli
    assert "cannot create its bitmap" in one_line_error(cli)

    # The same through the config directory: logged, retried on the next change, harmless.
    mark = len(daemon.log())
    write_atomic(os.path.join(config_dir, "big.toml"),
                 device_toml("big", "64G", "4K", "00000000000000b1"))
    wait_until(lambda: "big: cannot track" in daemon.log()[mark:], timeout=10,
               what="breqd to log that it cannot track big")
    assert "No space left on device" in daemon.log()[mark:]
    with client(control) as c:
        assert [d["name"] for d in c.list_devices()] == ["small"]
        c.mark("small", [(0, 4096)])
    assert sorted(os.listdir(state_dir)) == ["breqd.lock", "small.bitmap", "small.lineage"]
    assert daemon.proc.poll() is None


# -- clean stop and restart ----------------------------------------------------------

def test_a_clean_stop_keeps_exactly_the_dirty_and_in_flight_chunks(tmp_path, daemons):
    daemon = daemons.start(breqd_daemon(str(tmp_path)))
    control = control_of(daemon)
    marked = [(k * 3 * MiB + 512, 4096) for k in range(SIZE // (3 * MiB))]
    with client(control) as c:
        add_clean_device(c, "d", SIZE, CHUNK)
        c.mark("d", marked)
        shipped = c.checkout("d", 16 * CHUNK)       # committed: clean, written lazily
        c.commit("d", shipped)
    holder = client(control)
    held = holder.checkout("d", 8 * CHUNK)          # still held when breqd stops
    assert held
    expected = chunks_of(marked, CHUNK) - chunks_of(shipped, CHUNK)
    assert chunks_of(held, CHUNK) <= expected
    try:
        assert daemon.stop() == 0   # (its log: see the test below)
    finally:
        holder.close()
    assert not os.path.exists(control)              # the socket goes with it
    mark = len(daemon.log())
    daemon = daemons.restart(daemon)
    assert "unclean" not in daemon.log()[mark:]
    with client(control) as c:
        s = c.stats("d")
        assert s["recovered"] is None and s["inflight_bytes"] == 0
        assert dirty_chunks(c, "d") == expected


def test_a_clean_stop_with_clients_connected_logs_no_traceback(tmp_path, daemons):
    daemon = daemons.start(breqd_daemon(str(tmp_path)))
    connected = client(control_of(daemon))
    try:
        assert connected.list_devices() == []
        mark = len(daemon.log())
        assert daemon.stop() == 0
    finally:
        connected.close()
    stopped = daemon.log()[mark:]
    assert "breqd stopped" in stopped
    assert "Traceback" not in stopped and "ERROR" not in stopped, stopped


# -- bitmaps that cannot be trusted (invariant 4) -------------------------------------

def _stopped_with_marks(tmp_path, daemons):
    """A stopped breqd whose device 'd' has a few dirty chunks on pages 0 and 2."""
    daemon = daemons.start(breqd_daemon(str(tmp_path)))
    marked = [(0, 4096), (3 * MiB, 4096), (SIZE - 4096, 4096)]
    with client(control_of(daemon)) as c:
        add_clean_device(c, "d", SIZE, CHUNK)
        c.mark("d", marked)
    assert daemon.stop() == 0
    return daemon, os.path.join(str(tmp_path), "state", "d.bitmap"), chunks_of(marked, CHUNK)


def _truncate(path: str) -> None:
    os.truncate(path, 10000)


def _scribble_headers(path: str) -> None:
    with open(path, "r+b") as f:
        f.write(b"\xa5" * (2 * BLOCK))


def _other_identity(path: str) -> None:
    """A valid bitmap of the same geometry, but of another device id."""
    with open(path, "r+b") as f:
        for slot in range(HEADER_SLOTS):
            f.seek(slot * BLOCK)
            header = Header.unpack(f.read(BLOCK))
            if header is not None:
                header.identity = Identity(header.identity.device_id ^ 1, header.identity.size,
                                           header.identity.chunk_size)
                f.seek(slot * BLOCK)
                f.write(header.pack())


@pytest.mark.parametrize("damage,words", [
    (_truncate, "truncated"), (_scribble_headers, "header is corrupt"),
    (_other_identity, "belongs to device id"), (os.unlink, "no saved bitmap"),
], ids=["truncated", "headers", "other-device", "deleted"])
def test_an_untrusted_bitmap_is_replaced_by_an_all_dirty_one(tmp_path, daemons, damage, words):
    daemon, bitmap, _ = _stopped_with_marks(tmp_path, daemons)
    damage(bitmap)
    mark = len(daemon.log())
    daemon = daemons.restart(daemon)
    with client(control_of(daemon)) as c:
        s = c.stats("d")
        assert s["dirty_bytes"] == SIZE, s          # loudly all dirty, never empty
        assert words in s["recovered"], s
        assert len(dirty_chunks(c, "d")) == SIZE // CHUNK
    log = daemon.log()[mark:]
    if damage is os.unlink:
        assert "new bitmap" in log
    else:
        assert "WARNING" in log and "not trusted" in log and words in log, log
        assert len(glob.glob(bitmap + ".bad-*")) == 1   # kept aside for inspection
    # And the new bitmap is trusted from then on.
    daemon = daemons.restart(daemon)
    with client(control_of(daemon)) as c:
        assert c.stats("d")["recovered"] is None


def test_a_damaged_page_makes_only_its_own_chunks_dirty(tmp_path, daemons):
    daemon, bitmap, marked = _stopped_with_marks(tmp_path, daemons)
    with open(bitmap, "r+b") as f:   # one byte of one copy of page 1 (which had no marks)
        f.seek(PAGES_OFFSET + (1 * HEADER_SLOTS + 0) * BLOCK + 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    daemon = daemons.restart(daemon)
    with client(control_of(daemon)) as c:
        s = c.stats("d")
        assert "page(s) 1 damaged" in s["recovered"], s
        page1 = set(range(PAGE_CHUNKS, 2 * PAGE_CHUNKS))
        assert dirty_chunks(c, "d") == marked | page1
    daemon = daemons.restart(daemon)   # repaired: both copies valid again
    with client(control_of(daemon)) as c:
        assert c.stats("d")["recovered"] is None


# -- systemd notifications -----------------------------------------------------------

def test_ready_status_watchdog_and_stopping_are_notified(tmp_path, daemons):
    daemon = daemons.start(breqd_daemon(str(tmp_path), env={"WATCHDOG_USEC": "200000"}))
    ready = [n for n in daemon.notifications if "READY=1" in n.split("\n")]
    assert ready and "STATUS=tracking 0 device(s), 0 bytes dirty" in ready[0].split("\n")
    # Every half interval (0.1 s): count five fresh pings within a generous bound.
    for _ in range(5):
        daemon.notifications.clear()
        daemon.wait_for("WATCHDOG=1", timeout=5)
    assert os.path.exists(control_of(daemon))
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(timeout=START_TIMEOUT) == 0
    assert any("STOPPING=1" in n.split("\n") for n in queued_notifications(daemon))


def test_a_notify_socket_nobody_listens_on_does_not_matter(tmp_path):
    """A NOTIFY_SOCKET whose reader is gone (a service manager restarting) is ignored."""
    gone = str(tmp_path / "gone.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(gone)
    control = str(tmp_path / "breqd.sock")
    argv = breqd_argv(str(tmp_path / "state"), str(tmp_path / "devices.d"), control)
    env = dict(os.environ, NOTIFY_SOCKET=gone, WATCHDOG_USEC="100000")
    log_path = tmp_path / "breqd.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env,
                                stdin=subprocess.DEVNULL)
    try:
        def answers() -> bool:
            assert proc.poll() is None, log_path.read_text()
            try:
                with client(control) as c:
                    return c.list_devices() == []
            except BmigError:   # not listening yet
                return False
        wait_until(answers, timeout=START_TIMEOUT, what="breqd to answer")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=START_TIMEOUT)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert code == 0, log_path.read_text()
    assert "Traceback" not in log_path.read_text()
