"""bmig.nbd.layers.mirror: what a replicated write leaves in its holds (invariant 6).

The tracking layer's tests (test_nbd_track.py, test_nbd_replica.py) hold most of the
rule; these add the steady state, when the replication generation has been seen already.
"""

from __future__ import annotations

import asyncio

from tests.unit.test_nbd_track import CHUNK, make_replicated


def test_a_write_that_misses_the_target_while_replication_runs_is_let_go_at_once():
    """Replication runs and the layer has seen its generation (chunk 0 was replicated);
    the next write does not reach the target. Its chunk is dirty for good, so it is let
    go plain at once, for the resync beside to ship, not kept until an idle sweep."""
    events: list[str] = []
    layer, inner, _ = make_replicated(events)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)             # seq 1, not durable yet
        inner.reaches_target = False
        await layer.write(memoryview(b"b"), CHUNK, False)
        await asyncio.sleep(0)                                    # the release is sent
        assert set(layer.held) == {0}
        await layer.close()

    asyncio.run(main())
    assert [e for e in events if e.startswith("release")] == [f"release [({CHUNK}, {CHUNK})]"]
