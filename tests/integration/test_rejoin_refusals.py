"""``bmigrate rejoin`` checks everything that can refuse before it changes anything: a
sender with chunks in flight, a backing of another size, a bmig-nbd whose replication
its peer still accepts (the live primary, rejoined by mistake). Each refusal leaves the
device writable and breqd's role primary. A failure after the first change says what
state it left and how to go on.
"""

from __future__ import annotations

import os

import pytest

from bmig.nbdclient import NbdClient
from tests.integration.nbd_helpers import start_nbd
from tests.integration.sync_helpers import (MiB, bmigrate, receivers,  # noqa: F401
                                            start_receiver)

SIZE = 4 * MiB


@pytest.fixture
def primary(breqd, tmp_path):
    server = start_nbd(breqd, tmp_path, SIZE)
    yield server
    server.daemon.stop()


def rejoin(breqd, server, tmp_path, backing: str | None = None):
    return bmigrate(breqd, "rejoin", "d1", "--backing", backing or server.backing,
                    "--receiver-state-dir", str(tmp_path / "rejoin-state"),
                    "--manage-dir", server.manage_dir, check=False)


def role(breqd) -> str:
    client = breqd.client()
    try:
        return client.stats("d1")["role"]
    finally:
        client.close()


def assert_untouched(breqd, server, tmp_path) -> None:
    assert role(breqd) == "primary"
    with NbdClient.connect(server.uri) as client:      # still writable
        client.pwrite(b"w" * 4096, 0)
        client.flush()
    assert not os.path.exists(tmp_path / "rejoin-state" / "d1.target")


def test_chunks_in_flight_are_refused_before_anything_changes(breqd, primary, tmp_path):
    with NbdClient.connect(primary.uri) as client:
        client.pwrite(b"x" * 4096, 0)
        client.flush()
    sender = breqd.client()
    try:
        assert sender.checkout("d1", SIZE)            # a sender ships these now
        refused = rejoin(breqd, primary, tmp_path)
        assert refused.returncode == 17, refused.stderr
        assert "in flight" in refused.stderr and "nothing was changed" in refused.stderr
        assert_untouched(breqd, primary, tmp_path)
    finally:
        sender.close()


def test_a_backing_of_another_size_is_refused_before_anything_changes(breqd, primary,
                                                                      tmp_path):
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * (SIZE // 2))
    refused = rejoin(breqd, primary, tmp_path, str(other))
    assert refused.returncode == 3, refused.stderr
    assert "nothing was changed" in refused.stderr
    assert_untouched(breqd, primary, tmp_path)


def test_the_live_primary_replicating_is_refused(breqd, primary, tmp_path, receivers):
    r = start_receiver(tmp_path, {"d1": str(tmp_path / "target.img")})
    receivers.append(r)
    bmigrate(breqd, "replicate", "d1", "--to", r.url("d1"), "--secret-file", r.secret_file,
             "--manage-dir", primary.manage_dir)
    refused = rejoin(breqd, primary, tmp_path)
    assert refused.returncode == 17, refused.stderr
    assert "this is the primary" in refused.stderr
    assert_untouched(breqd, primary, tmp_path)


def test_a_failure_after_the_first_change_says_what_it_left(breqd, primary, tmp_path):
    state = tmp_path / "rejoin-state"
    (state / "d1.target").mkdir(parents=True)     # the record cannot be written
    failed = rejoin(breqd, primary, tmp_path)
    assert failed.returncode == 6, failed.stderr
    assert "records d1 as handed over" in failed.stderr
    assert "read-only" in failed.stderr
    assert f"bmigrate track set-role d1 primary --manage-dir {primary.manage_dir}" \
        in failed.stderr
    assert role(breqd) == "handed-over"
