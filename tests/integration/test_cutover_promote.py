"""bmigrate cutover when PROMOTE gets no answer (DESIGN.md, invariant 7).

The target may be the primary already when the answer is lost, so the source must not
become writable on a guess. breceive runs with a fault (tests/integration/
breceive_faults.py) that loses the answer, or the request, or every STATUS:

- PROMOTED lost: the cutover asks the receiver (STATUS, a new connection), finds the
  target primary with its generation, and completes the handover (exit 0); the source
  is read-only and handed over.
- PROMOTE lost before the receiver acted on it: the receiver's record says so, and no
  session holds the target any more: the source is primary and writable again.
- PROMOTE lost, and the session that got it still holds the target when the cutover
  asks (and promotes it after): "not promoted" is not believed while a session may still
  change the record; the cutover asks again and completes the handover.
- PROMOTED lost and the receiver cannot be asked: exit 16, the outcome unknown; the source
  stays read-only and is recorded as handed over until the operator has looked.
- The cutover killed while it waits for PROMOTE's answer: the handover was recorded in
  breqd before PROMOTE went out, so a bmig-nbd started again serves the source read-only.
"""

from __future__ import annotations

import pytest

import os
import subprocess

from bmig.errors import EXIT_HANDOVER_UNKNOWN, EXIT_UNREACHABLE
from bmig.nbdclient import NbdClient, NbdError
from tests.daemon import Daemon, wait_until
from tests.integration import breceive_faults
from tests.integration.nbd_helpers import start_nbd
from tests.integration.sync_helpers import (MiB, bmigrate_argv, error_lines,  # noqa: F401
                                            receivers, same_bytes, start_receiver)
from tests.integration.test_cutover import (assert_still_primary_and_writable, cutover,
                                            final, prefill, replication_status,
                                            source_status, stats)

SIZE = 4 * MiB


@pytest.fixture
def faulty(breqd, tmp_path, receivers):
    """bmig-nbd serving d1, and a breceive with the FAULTS the test names."""
    started = []

    def make(faults: str):
        server = start_nbd(breqd, tmp_path, SIZE)
        started.append(server)
        prefill(server.backing, SIZE)
        target = str(tmp_path / "tgt.img")
        r = start_receiver(tmp_path, {"d1": target}, program=breceive_faults.argv(faults))
        receivers.append(r)
        return server, r, target

    yield make
    for server in started:
        server.daemon.stop()


def assert_read_only_and_handed_over(breqd, server, generation: str) -> None:
    status = replication_status(breqd, server)
    assert status["read_only"] and not status["replicating"] and not status["frozen"]
    mine = stats(breqd, "d1")
    assert mine["role"] == "handed-over" and mine["successor"] == generation, mine


def test_a_lost_promoted_answer_is_found_out_and_the_handover_completes(breqd, faulty,
                                                                        tmp_path):
    server, r, target = faulty("promoted-lost")
    done, events = cutover(breqd, server, r, str(tmp_path / "records"))
    summary = final(done, events)
    generation = summary["generation"]
    assert summary["handed_over"] is True
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert any("not answered" in n and "the handover goes on" in n for n in notes), notes
    record = r.record("d1")                          # it really is the primary
    assert record["role"] == "primary" and record["generation"] == generation
    assert_read_only_and_handed_over(breqd, server, generation)
    assert same_bytes(server.backing, target)


def test_a_promote_that_never_arrived_leaves_the_source_primary(breqd, faulty, tmp_path):
    server, r, target = faulty("promote-lost")
    done, events = cutover(breqd, server, r, str(tmp_path / "records"))
    assert done.returncode == EXIT_UNREACHABLE, done.stderr
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert any("was not promoted" in n for n in notes), notes
    assert any("stays primary and writable" in n for n in notes), notes
    assert r.record("d1")["role"] == "secondary"
    assert_still_primary_and_writable(breqd, server, r)


def test_a_record_still_held_by_the_session_that_got_promote_is_not_taken_for_an_answer(
        breqd, faulty, tmp_path):
    """The first STATUS finds the target secondary with the source's generation, but
    busy: the session that received PROMOTE promotes it right after. Taking that first
    answer for "not promoted" would make the source writable beside a new primary."""
    server, r, target = faulty("promote-held,status-answered")
    done, events = cutover(breqd, server, r, str(tmp_path / "records"))
    summary = final(done, events)
    generation = summary["generation"]
    assert summary["handed_over"] is True
    record = r.record("d1")
    assert record["role"] == "primary" and record["generation"] == generation
    assert_read_only_and_handed_over(breqd, server, generation)


def test_an_unknown_outcome_keeps_the_source_read_only(breqd, faulty, tmp_path):
    server, r, target = faulty("promoted-lost,status-lost")
    done, events = cutover(breqd, server, r, str(tmp_path / "records"))
    assert done.returncode == EXIT_HANDOVER_UNKNOWN, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1, done.stderr
    line = lines[0]
    assert "outcome is unknown" in line and "read-only" in line, line
    assert "bmigrate status d1" in line and "set-role d1 primary" in line, line
    assert not [e for e in events if e["event"] == "cutover"]
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert not any("writable" in n for n in notes), notes
    record = r.record("d1")                          # the target did become primary
    assert record["role"] == "primary"
    assert_read_only_and_handed_over(breqd, server, record["generation"])
    mine = source_status(breqd)
    assert mine["role"] == "handed-over"


def test_a_cutover_killed_while_promote_is_unanswered_leaves_the_source_read_only(
        breqd, faulty, tmp_path):
    """kill -9 of bmigrate cutover once PROMOTE is sent: the target may be the primary.
    bmig-nbd, started again, must not serve the source writable: breqd already records it
    as handed over (the operator then asks the target, and sets the role back if it was
    not promoted)."""
    server, r, target = faulty("promote-stuck")
    args = ["cutover", "d1", "--source", server.backing, "--to", r.url("d1"),
            "--secret-file", r.secret_file, "--manage-dir", server.manage_dir,
            "--record-dir", str(tmp_path / "records"), "--json"]
    proc = subprocess.Popen(bmigrate_argv(*args), env=dict(os.environ,
                            BMIG_CONTROL=breqd.control), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: "fault: PROMOTE stuck" in r.daemon.log() or proc.poll() is not None,
                   timeout=120, what="the cutover to send PROMOTE")
        assert proc.poll() is None, "the cutover ended before PROMOTE"
    finally:
        proc.kill()
        proc.wait(timeout=30)
    mine = stats(breqd, "d1")
    assert mine["role"] == "handed-over", mine
    server.daemon.stop()
    server.daemon = Daemon(server.daemon.argv, server.daemon.log_path).start()
    with NbdClient.connect(server.uri, timeout=60) as client:
        try:
            client.pwrite(b"must not land", 0)
        except NbdError as exc:
            assert exc.from_server
        else:
            raise AssertionError("the source took a write after a cutover that may have "
                                 "promoted the target")
