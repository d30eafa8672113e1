"""sd_notify never blocks the daemon that calls it.

A unix datagram socket whose reader does not read fills up (the kernel queues about ten
messages); a blocking send then waits forever. breqd sends STATUS every ten seconds from
its event loop: with a manager that stopped reading, every client of breqd hung.
"""

from __future__ import annotations

import os
import socket
import threading

from bmig import systemd


def test_notify_does_not_wait_for_a_manager_that_does_not_read(tmp_path, monkeypatch):
    path = str(tmp_path / "notify")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)                                   # bound, never read
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    sent: list[bool] = []
    worker = threading.Thread(
        target=lambda: sent.extend(systemd.notify(f"STATUS={i}") for i in range(200)),
        daemon=True)
    worker.start()
    worker.join(timeout=10)
    try:
        assert not worker.is_alive(), "notify blocked on a full socket"
        assert sent[0] and not all(sent)              # the first went, later ones dropped
        assert sink.recv(4096) == b"STATUS=0"
    finally:
        sink.close()


def test_notify_without_a_manager_does_nothing(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    assert os.environ.get("NOTIFY_SOCKET") is None
