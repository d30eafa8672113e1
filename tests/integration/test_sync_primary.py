"""A promoted target (a primary) and the sessions around it (DESIGN.md, invariant 7).

- A source that meets a primary is told so and pointed to fail-back, never offered to
  discard it; ``--discard-target-data`` against a primary is refused unless the receiver
  allows exactly that (``allow_discard_primary``; ``allow_discard`` is not enough).
"""

from __future__ import annotations

from bmig.wire.protocol import Message, T, decode_json
from tests.integration.sync_helpers import (MiB, error_lines, make_image,  # noqa: F401
                                            receivers, same_bytes, start_receiver,
                                            summary_of, sync, track)
from tests.integration.test_sync_bad_input import Raw, authenticated_with

SIZE = 4 * MiB


def opened(raw: Raw, lineage: tuple[str, str], mode: str = "pass",
           **fields) -> Message:
    device_id, generation = lineage
    raw.send(Message(T.OPEN, {"export": "d", "device_id": device_id,
                              "generation": generation, "size": SIZE, "mode": mode,
                              **fields}))
    return decode_json(raw.read())


def pass_then_promote(r, lineage: tuple[str, str], new: str = "00000000000000ee") -> dict:
    """A complete (empty) pass of ``lineage``, then PROMOTE: the target is primary."""
    raw = authenticated_with(r)
    assert opened(raw, lineage).type == T.OPENED
    raw.send(Message(T.PASS_BEGIN, {}))
    raw.send(Message(T.PASS_END, {}))
    assert decode_json(raw.read()).type == T.PASS_DONE
    raw.send(Message(T.PROMOTE, {"generation": new}))
    reply = decode_json(raw.read())
    assert reply.type == T.PROMOTED, reply
    raw.close()
    return reply.fields["target"]


def lineage_of(breqd, name: str = "d") -> tuple[str, str]:
    stats = breqd.client().stats(name)
    return stats["device_id"], stats["generation"]


def test_a_source_that_meets_a_primary_is_pointed_to_fail_back(breqd, tmp_path, receivers):
    source = make_image(str(tmp_path / "src.img"), SIZE, "random")
    target = str(tmp_path / "tgt.img")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target}, "--allow-discard")
    receivers.append(r)
    pass_then_promote(r, lineage_of(breqd))
    args = ["d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file]

    refused = sync(breqd, *args, check=False)
    assert refused.returncode == 9, refused.stderr
    (line,) = error_lines(refused.stderr)
    assert "is the primary" in line and "--adopt" in line and "fail back" in line, line
    assert "discard" not in refused.stderr

    # allow_discard is not enough for a primary.
    refused = sync(breqd, *args, "--discard-target-data", "d", check=False)
    assert refused.returncode == 9, refused.stderr
    (line,) = error_lines(refused.stderr)
    assert "allow_discard_primary" in line, line
    assert r.record("d")["role"] == "primary"
    assert not same_bytes(source, target)

    r.daemon.stop()
    receivers.remove(r)
    config = tmp_path / "breceive.toml"
    config.write_text(f'[targets.d]\npath = "{target}"\nallow_discard_primary = true\n')
    r = start_receiver(tmp_path, {}, "--config", str(config))
    receivers.append(r)
    args = ["d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file]
    refused = sync(breqd, *args, check=False)            # asked to discard, or nothing
    assert refused.returncode == 9 and "discard" not in refused.stderr, refused.stderr
    done = sync(breqd, *args, "--discard-target-data", "d", "--json")
    assert summary_of(done)["relation"] == "new"
    assert same_bytes(source, target)
    record = r.record("d")
    assert record["role"] == "secondary" and record["generation"] == lineage_of(breqd)[1]
