"""A receiver session's end lets go of the export whatever fails on the way.

The end of a session runs several steps (the last acknowledgements, the record's
"replication ended", the syncer, the target's final sync and close, the record lock,
the export's lock, the connection). One that raised used to skip the ones after it: the
export stayed locked, refused to every sender until breceive restarted. Now each step
runs and the first failure is raised after the last. The session runs in-process.
"""

from __future__ import annotations

import pytest

from bmig.framing import ConnectionClosed
from bmig.receiver.sessionrecord import SessionRecord
from bmig.receiver.target import TargetLock, is_locked
from bmig.wire.protocol import Message, T
from tests.integration.wire_helpers import WAIT, replicating_in_process


def test_a_step_of_the_end_that_fails_leaves_the_export_free(tmp_path, monkeypatch):
    def broken(self, peer):
        raise RuntimeError("the record could not be updated")

    monkeypatch.setattr(SessionRecord, "replication_ended", broken)
    sender, thread = replicating_in_process(tmp_path)
    export_lock = TargetLock(str(tmp_path), "t", "replica").path   # the session's
    assert is_locked(export_lock)
    try:
        sender.send(Message(T.BYE, {}).encode())
        thread.join(WAIT)
        assert not thread.is_alive()
        with pytest.raises(ConnectionClosed):        # the connection was closed too
            sender.read()
    finally:
        sender.close()
    assert [str(exc) for exc in thread.raised] == ["the record could not be updated"]
    assert not is_locked(export_lock)
