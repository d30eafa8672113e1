"""bmigrate sync into a real breceive: byte-identical targets, whatever the data.

Zeros, random and compressible data, and a mix with holes; sizes that are not a multiple
of the chunk size; TCP with the shared secret and TLS with certificates. Then the same
device again (nothing to do), and after changes (only what changed travels).
"""

from __future__ import annotations

import json
import os

import pytest

from tests.certs import make_certificates
from tests.integration.sync_helpers import (CHUNK, MiB, make_image, receivers,  # noqa: F401
                                            same_bytes, start_receiver, sync, track)

SIZES = [16 * MiB + 12345, 3 * CHUNK + 1, 8 * MiB]


@pytest.mark.parametrize("kind,size", [("zeros", SIZES[0]), ("random", SIZES[0]),
                                       ("text", SIZES[1]), ("mixed", SIZES[2]),
                                       ("mixed", SIZES[0])])
def test_sync_makes_an_identical_target(breqd, tmp_path, receivers, kind, size):
    source = make_image(str(tmp_path / "src.img"), size, kind)
    target = str(tmp_path / "tgt.img")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    # text: every frame compressed (by default only as much as pays in time, which on
    # loopback is next to nothing)
    compress = ["--compress", "always"] if kind == "text" else []
    done = sync(breqd, "d", "--source", source, "--to", r.url("d"), "--secret-file",
                r.secret_file, "--json", *compress)
    assert same_bytes(source, target)
    assert os.path.getsize(target) == size
    events = [json.loads(line) for line in done.stdout.splitlines()]
    summary = events[-1]
    assert summary["event"] == "summary" and summary["converged"] and summary["relation"] == "new"
    assert summary["dirty_bytes"] == 0
    if kind == "zeros":
        assert summary["bytes_sent"] == 0           # zeros travel as ranges
    if kind == "text":
        assert summary["compression_ratio"] > 3
    record = r.record("d")
    assert record["state"] == "consistent" and record["passes"] == 1
    stats = breqd.client().stats("d")
    assert record["generation"] == stats["generation"]
    assert record["source_device_id"] == stats["device_id"]


def test_a_second_sync_ships_only_what_changed(breqd, tmp_path, receivers):
    source = make_image(str(tmp_path / "src.img"), 32 * MiB, "random")
    target = str(tmp_path / "tgt.img")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    args = ["d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file,
            "--json"]
    sync(breqd, *args)
    again = json.loads(sync(breqd, *args).stdout.splitlines()[-1])
    assert again["relation"] == "same" and again["passes"] == 0 and again["bytes_sent"] == 0
    # Change three chunks behind breqd's back and mark them, as bmig-nbd would.
    client = breqd.client()
    with open(source, "r+b") as f:
        for chunk in (0, 100, 511):
            client.mark("d", [(chunk * CHUNK + 10, 5)])
            f.seek(chunk * CHUNK + 10)
            f.write(b"CHANGED")
    third = json.loads(sync(breqd, *args).stdout.splitlines()[-1])
    assert third["bytes_committed"] == 3 * CHUNK
    assert third["bytes_sent"] <= 3 * CHUNK + 1024
    assert same_bytes(source, target)


def test_sync_over_tls_with_client_certificates(breqd, tmp_path, receivers):
    certs = make_certificates(str(tmp_path / "certs"))
    source = make_image(str(tmp_path / "src.img"), 4 * MiB + 7, "mixed")
    target = str(tmp_path / "tgt.img")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target}, "--tls-cert", certs.server_cert,
                       "--tls-key", certs.server_key, "--tls-client-ca", certs.ca)
    receivers.append(r)
    sync(breqd, "d", "--source", source, "--to", r.url("d", "tls"), "--tls-ca", certs.ca,
         "--tls-cert", certs.client_cert, "--tls-key", certs.client_key,
         "--secret-file", r.secret_file)
    assert same_bytes(source, target)


def test_tls_with_an_untrusted_certificate_is_refused(breqd, tmp_path, receivers):
    certs = make_certificates(str(tmp_path / "certs"))
    other = make_certificates(str(tmp_path / "other"), ca_name="another CA")
    source = make_image(str(tmp_path / "src.img"), MiB, "random")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")}, "--tls-cert",
                       certs.server_cert, "--tls-key", certs.server_key)
    receivers.append(r)
    done = sync(breqd, "d", "--source", source, "--to", r.url("d", "tls"), "--tls-ca",
                other.ca, "--secret-file", r.secret_file, check=False)
    assert done.returncode == 8, done.stderr
    assert "not trusted" in done.stderr and len(done.stderr.splitlines()) == 1
    assert not os.path.exists(tmp_path / "tgt.img") or os.path.getsize(tmp_path / "tgt.img") == 0


def test_checksum_mode_sends_only_what_differs_from_an_older_copy(breqd, tmp_path,
                                                                  receivers):
    source = make_image(str(tmp_path / "src.img"), 16 * MiB, "random")
    target = str(tmp_path / "tgt.img")
    with open(source, "rb") as a, open(target, "wb") as b:
        b.write(a.read())                           # an older copy: equal but for 2 chunks
    with open(target, "r+b") as b:
        for chunk in (3, 200):
            b.seek(chunk * CHUNK)
            b.write(b"\xff" * 100)
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    done = sync(breqd, "d", "--source", source, "--to", r.url("d"), "--secret-file",
                r.secret_file, "--checksum", "--json")
    summary = json.loads(done.stdout.splitlines()[-1])
    assert same_bytes(source, target)
    assert summary["bytes_same"] == 16 * MiB - 2 * CHUNK
    assert summary["bytes_sent"] <= 2 * CHUNK + 1024
