"""kill -9 breqd while clients mark, check out, commit and abort: no acknowledged mark is lost.

Invariant 1 (mark before write): a MARK reply means the chunks are durable, so after
kill -9 and a restart every chunk of an acknowledged mark is dirty, unless a sender took
it *after* that mark and committed it. Invariant 3 (dirty ∪ in flight survives): chunks
checked out and not committed are dirty after the restart.

The clients are separate processes (forked), as writers and senders are, and log what
they do to line-buffered files. A marker logs an acknowledged mark only after its reply,
so a lost line can only remove an expectation; the sender logs a commit before it sends
it, so every commit breqd may have applied has its line. Time stamps come from
CLOCK_MONOTONIC, which all processes share, and are taken on the side that makes the
check conservative:

- a marker logs the time it *sent* the mark (breqd applied it later than that);
- the sender logs, before it sends a commit, the time it *received* the checkout reply
  of those chunks (breqd took them earlier than that). Aborted or held chunks get no line.

A chunk may legitimately be clean after the crash only if a commit was sent for a
checkout of it received after its last acknowledged mark was sent: otherwise breqd
applied that mark after every committed checkout of the chunk, so the chunk is dirty,
re-marked or in flight, and must be set on disk. The reverse check keeps the test
honest: nothing is dirty that no client tried to mark (an all-dirty fallback would pass
the first check vacuously).

BMIG_CRASH_ITERATIONS (default 30) sets the number of crashes and BMIG_CRASH_SEED the
seed of the random kill moments and workloads.
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import os
import random
import time

import pytest

from bmig.errors import BmigError
from bmig.tracker.write_path_client import AsyncTrackerClient
from bmig.tracker.blocking_client import TrackerClient
from tests.daemon import wait_until
from tests.integration.breqd_helpers import (MiB, breqd_daemon, chunks_of, client,
                                             dirty_chunks)

ITERATIONS = int(os.environ.get("BMIG_CRASH_ITERATIONS", "30"))
SEED = int(os.environ.get("BMIG_CRASH_SEED", "20240611"))

DEVICE = "crash"
SIZE = 512 * MiB          # 131072 chunks: five bitmap pages
CHUNK = 4096
HOT = 256 * 1024          # half the marks land in these 64 chunks: re-marked in flight
MARKERS = 3               # blocking clients, one mark at a time
ASYNC_TASKS = 8           # concurrent marks batched by one AsyncTrackerClient
WORKER_DEADLINE = 30.0    # a worker that never sees the crash gives up after this
MIN_ACKED = 8             # acknowledged marks before the kill moment is drawn
MAX_KILL_DELAY = 0.5

_fork = multiprocessing.get_context("fork")


# -- workers (forked processes) --------------------------------------------------------

def _random_ranges(rng: random.Random) -> list[tuple[int, int]]:
    ranges = []
    for _ in range(rng.randint(1, 4)):
        limit = HOT if rng.random() < 0.5 else SIZE
        offset = rng.randrange(0, (limit - 4096) // 512 + 1) * 512   # sector aligned
        ranges.append((offset, 4096))
    return ranges


def _fmt(ranges) -> str:
    return " ".join(f"{o}:{n}" for o, n in ranges)


def _marker(control: str, seed: int, log_path: str, acked, stop_at: float) -> None:
    """Mark (log before: attempted; after the reply: acknowledged), then mark again."""
    rng = random.Random(seed)
    with open(log_path, "w", buffering=1) as log:
        try:
            c = TrackerClient(control, timeout=10)
        except BmigError:
            return
        with c:
            while time.monotonic() < stop_at:
                ranges = _random_ranges(rng)
                log.write(f"A {_fmt(ranges)}\n")
                sent = time.monotonic()
                try:
                    c.mark(DEVICE, ranges)
                except BmigError:
                    return
                log.write(f"M {sent!r} {_fmt(ranges)}\n")
                with acked.get_lock():
                    acked.value += 1
                try:
                    c.mark_completed(DEVICE, ranges)
                except BmigError:
                    return


def _async_marker(control: str, seed: int, log_path: str, acked, stop_at: float) -> None:
    """Many marks in flight at once through the write path's batching client."""

    async def main(log) -> None:
        c = AsyncTrackerClient(control)
        lost = asyncio.Event()

        async def one(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while not lost.is_set() and time.monotonic() < stop_at:
                ranges = _random_ranges(rng)
                log.write(f"A {_fmt(ranges)}\n")
                sent = time.monotonic()
                try:
                    await c.mark(DEVICE, ranges)
                except BmigError:
                    lost.set()
                    return
                log.write(f"M {sent!r} {_fmt(ranges)}\n")
                with acked.get_lock():
                    acked.value += 1
                try:
                    await c.mark_completed(DEVICE, ranges)
                except BmigError:
                    lost.set()
                    return

        try:
            await asyncio.gather(*(one(k) for k in range(ASYNC_TASKS)))
        finally:
            await c.close()

    with open(log_path, "w", buffering=1) as log:
        asyncio.run(main(log))


def _sender(control: str, seed: int, log_path: str, acked, stop_at: float) -> None:
    """Check out a few chunks at a time (a real sender ships them, so it lags the
    writers); commit most, abort some, and hold some across the next checkout so that
    chunks are in flight when breqd dies. Only a commit can make a chunk clean: its
    line (with the time its checkout was received) is written before it is sent."""
    rng = random.Random(seed)
    held: list[tuple[float, list[tuple[int, int]]]] = []
    with open(log_path, "w", buffering=1) as log:
        try:
            c = TrackerClient(control, timeout=10)
        except BmigError:
            return
        with c:
            while time.monotonic() < stop_at:
                try:
                    runs = c.checkout(DEVICE, rng.choice([4096, 8192, 16384]))
                    received = time.monotonic()
                    if runs:
                        held.append((received, runs))
                    if len(held) >= rng.randint(1, 4):   # ship a few checkouts at once
                        for got, hold in held:
                            split = len(hold) if rng.random() < 0.8 else \
                                rng.randrange(len(hold) + 1)
                            if hold[:split]:
                                log.write(f"C {got!r} {_fmt(hold[:split])}\n")
                                c.commit(DEVICE, hold[:split])
                            if hold[split:]:
                                c.abort(DEVICE, hold[split:])
                        held.clear()
                except BmigError:
                    return


# -- reading the logs ------------------------------------------------------------------

def _parse_ranges(words: list[str]) -> list[tuple[int, int]]:
    return [(int(o), int(n)) for o, n in (w.split(":") for w in words)]


def _read_logs(paths: list[str]) -> tuple[dict[int, float], dict[int, float], set[int]]:
    """last acknowledged mark (sent time) and last committed checkout (received time)
    per chunk; every chunk a client tried to mark."""
    last_mark: dict[int, float] = {}
    last_commit: dict[int, float] = {}
    attempted: set[int] = set()
    for path in paths:
        with open(path) as f:
            lines = f.read().split("\n")
        for line in lines[:-1]:   # the last piece has no newline: written or not, skip it
            kind, *rest = line.split(" ")
            if kind == "A":
                attempted |= chunks_of(_parse_ranges(rest), CHUNK)
                continue
            at = float(rest[0])
            table = last_mark if kind == "M" else last_commit
            for chunk in chunks_of(_parse_ranges(rest[1:]), CHUNK):
                table[chunk] = max(table.get(chunk, -math.inf), at)
    return last_mark, last_commit, attempted


# -- the test --------------------------------------------------------------------------

def _run_until_killed(daemon, tmp: str, iteration: int, rng: random.Random) -> list[str]:
    acked = _fork.Value("l", 0)
    stop_at = time.monotonic() + WORKER_DEADLINE
    logs = []
    procs = []
    workers = [_marker] * MARKERS + [_async_marker, _sender]
    for k, target in enumerate(workers):
        path = os.path.join(tmp, f"it{iteration:03d}-{k}-{target.__name__.strip('_')}.log")
        logs.append(path)
        procs.append(_fork.Process(target=target, daemon=True,
                                   args=(daemon_control(daemon), rng.randrange(1 << 30),
                                         path, acked, stop_at)))
    try:
        for p in procs:
            p.start()
        wait_until(lambda: acked.value >= MIN_ACKED, timeout=20,
                   what=f"{MIN_ACKED} acknowledged marks")
        time.sleep(rng.uniform(0, MAX_KILL_DELAY))  # the random kill moment, not a wait
        assert daemon.proc.poll() is None, daemon.log()
        daemon.kill9()
        for p in procs:
            p.join(timeout=20)
            assert p.exitcode == 0, f"worker {p.name} ended with {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return logs


def daemon_control(daemon) -> str:
    return daemon.argv[daemon.argv.index("--control") + 1]


@pytest.mark.timeout(120 + 6 * ITERATIONS)
def test_kill9_loses_no_acknowledged_mark_and_no_checked_out_chunk(tmp_path, daemons):
    root = str(tmp_path)
    daemon = daemons.start(breqd_daemon(root))
    control = daemon_control(daemon)
    with client(control) as c:
        c.add_device(DEVICE, SIZE, CHUNK)
    asserted = 0
    for iteration in range(ITERATIONS):
        rng = random.Random(f"{SEED}:{iteration}")
        with client(control) as c:
            c.clear_all(DEVICE, force=True)          # every mark below is a first-time mark
            stats = c.stats(DEVICE)
            assert stats["dirty_bytes"] == 0 and stats["inflight_bytes"] == 0, stats

        logs = _run_until_killed(daemon, root, iteration, rng)
        daemon = daemons.restart(daemon)

        last_mark, last_commit, attempted = _read_logs(logs)
        with client(control) as c:
            stats = c.stats(DEVICE)
            dirty = dirty_chunks(c, DEVICE)
        where = f"iteration {iteration} (seed {SEED}; logs in {root})"
        assert stats["recovered"] is None, f"{where}: bitmap not trusted: {stats}"
        assert stats["inflight_bytes"] == 0 and stats["dirty_bytes"] == len(dirty) * CHUNK
        must = {chunk for chunk, sent in last_mark.items()
                if last_commit.get(chunk, -math.inf) <= sent}
        lost = sorted(must - dirty)
        assert not lost, (f"{where}: {len(lost)} chunk(s) of acknowledged marks are clean "
                          f"after kill -9, e.g. {lost[:10]}")
        stray = sorted(dirty - attempted)
        assert not stray, f"{where}: chunks nobody marked are dirty: {stray[:10]}"
        asserted += len(must)
    assert asserted >= ITERATIONS * MIN_ACKED
    assert "Traceback" not in daemon.log()


def test_kill9_keeps_in_flight_and_re_marked_chunks(tmp_path, daemons):
    """The deterministic core of the random test above, one step at a time."""
    daemon = daemons.start(breqd_daemon(str(tmp_path)))
    control = daemon_control(daemon)
    a, b, c_, d, e = (k * MiB for k in (1, 2, 3, 4, 300))   # e: another bitmap page
    with client(control) as c:
        c.add_device(DEVICE, SIZE, CHUNK)
        c.clear_all(DEVICE, force=True)
        c.mark(DEVICE, [(a, 4096), (b, 4096), (c_, 4096), (e, 4096)])
    sender = client(control)
    try:
        runs = sender.checkout(DEVICE, 1 << 40)
        assert chunks_of(runs, CHUNK) == chunks_of([(a, 1), (b, 1), (c_, 1), (e, 1)], CHUNK)
        with client(control) as writer:
            writer.mark(DEVICE, [(b, 4096)])          # written while in flight: re-marked
            sender.commit(DEVICE, [(a, 4096), (b, 4096), (e, 4096)])   # c_ stays held
            writer.mark(DEVICE, [(e, 4096)])          # written after its commit
            writer.mark(DEVICE, [(d, 4096)])          # never checked out
            stats = writer.stats(DEVICE)
        assert stats["dirty_bytes"] == 3 * CHUNK and stats["inflight_bytes"] == CHUNK
        mark = len(daemon.log())
        daemon.kill9()
    finally:
        sender.close()
    daemon = daemons.restart(daemon)
    assert "recovered after an unclean stop" in daemon.log()[mark:]
    with client(control) as c:
        dirty = dirty_chunks(c, DEVICE)
    must = chunks_of([(b, 1), (c_, 1), (d, 1), (e, 1)], CHUNK)
    assert must <= dirty, sorted(must - dirty)
    assert dirty <= must | chunks_of([(a, 1)], CHUNK)   # a: committed, cleared lazily


def test_kill9_after_a_mark_answered_from_the_activity_log_keeps_the_chunk(tmp_path,
                                                                         daemons):
    """A chunk marked, shipped and committed stays dirty on disk (breqd's activity log),
    so marking it again costs no bitmap write; after a kill -9 it is dirty all the same,
    and the chunk that was only shipped, never marked again, is dirty too (the log's
    cost: it ships once more)."""
    daemon = daemons.start(breqd_daemon(str(tmp_path)))
    control = daemon_control(daemon)
    a, b = 1 * MiB, 2 * MiB
    with client(control) as c:
        c.add_device(DEVICE, SIZE, CHUNK)
        c.clear_all(DEVICE, force=True)
        c.mark(DEVICE, [(a, 4096), (b, 4096)])
        runs = c.checkout(DEVICE, 1 << 40)
        assert chunks_of(runs, CHUNK) == chunks_of([(a, 1), (b, 1)], CHUNK)
        flushes = c.stats(DEVICE)["flushes"]
        c.commit(DEVICE, runs)
        assert c.stats(DEVICE)["dirty_bytes"] == 0
        wait_until(lambda: c.stats(DEVICE)["flushes"] > flushes, 10.0,
                   "the commit's lazy bitmap write")
        flushes = c.stats(DEVICE)["flushes"]
        c.mark(DEVICE, [(a, 4096)])                  # answered from memory: logged
        stats = c.stats(DEVICE)
    assert stats["flushes"] == flushes and stats["dirty_bytes"] == CHUNK, stats
    daemon.kill9()
    daemon = daemons.restart(daemon)
    with client(control) as c:
        dirty = dirty_chunks(c, DEVICE)
    assert dirty == chunks_of([(a, 1), (b, 1)], CHUNK), sorted(dirty)
