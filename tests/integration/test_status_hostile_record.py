"""``bmigrate status NAME --to URL --watch`` against a receiver whose record is hostile:
a number JSON does not have (1e999, Infinity) is refused by the wire protocol's parser
and shown as the target's error, control characters are shown escaped, never sent to
the terminal raw, a STATUS of another shape is "no record", and --watch goes on looking
after each.

The receiver is a scripted one: the real handshake and sealed frames, then a STATUS
the test chose, one per connection, in turn.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading

from bmig.wire import handshake
from bmig.wire.channel import Channel
from bmig.wire.protocol import JSON_HEAD, T, decode_json
from bmig.wire.transports import SocketStream
from tests.daemon import wait_until
from tests.integration.sync_helpers import MiB, bmigrate_argv, write_secret
from tests.integration.wire_helpers import SECRET

ESCAPE = "\x1b]0;pwned\x07x"
RECORDS = [
    b'{"targets": [{"export": "d", "state": "consistent", "size_x_bytes": 1e999}]}',
    b'{"targets": [{"export": "d", "state": "consistent", "lag_seconds": Infinity}]}',
    ('{"targets": [{"export": "d", "state": "%s", "note": "a\\nforged: line"}]}'
     % ESCAPE.encode("unicode_escape").decode().replace("\\x", "\\u00")).encode(),
    b'{"targets": "x"}',                             # not a list
    b'{"targets": [1, "d", null]}',                  # a list of anything but objects
]


class StatusReceiver:
    """Answers each connection's STATUS_REQ with the next of RECORDS, round and round."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.served = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return                      # stopped
            sock.settimeout(30)
            channel = Channel(SocketStream(sock, "status"))
            try:
                handshake.receiver(channel, SECRET, False, "breceive scripted", [])
                asked = decode_json(channel.read())
                assert asked.type == T.STATUS_REQ, asked
                channel.send(JSON_HEAD.pack(T.STATUS, 0, 0)
                             + RECORDS[self.served % len(RECORDS)])
                self.served += 1
                channel.read()              # BYE, or the end
            except Exception:
                pass
            finally:
                channel.close()

    def stop(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self.thread.join(timeout=30)


def test_status_watch_shows_a_hostile_record_safely_and_goes_on(breqd, tmp_path):
    client = breqd.client()
    client.add_device("d", 4 * MiB)
    client.close()
    secret = write_secret(str(tmp_path / "secret"), SECRET.decode())
    receiver = StatusReceiver()
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = dict(os.environ, BMIG_CONTROL=breqd.control)
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        watch = subprocess.Popen(
            bmigrate_argv("status", "d", "--to", f"tcp://127.0.0.1:{receiver.port}/d",
                          "--secret-file", secret, "--status-dir", str(tmp_path / "none"),
                          "--manage-dir", str(tmp_path / "none"), "--watch",
                          "--interval", "0.1"),
            stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL, env=env)
    try:
        wait_until(lambda: receiver.served >= len(RECORDS) + 1
                   and out.read_bytes().count(b"pwned") >= 1, timeout=60,
                   what="every record shown once")
        assert watch.poll() is None, err.read_text()
    finally:
        watch.send_signal(signal.SIGINT)
        code = watch.wait(timeout=30)
        receiver.stop()
    text, errors = out.read_text(), err.read_text()
    assert code == 0, errors
    assert "Traceback" not in errors and "Traceback" not in text, errors + text
    assert "\x1b" not in text and "\x07" not in text
    assert "\\x1b]0;pwned\\x07x" in text, text
    assert "not valid JSON" in text and "finite" in text and "Infinity" in text, text
    assert not [line for line in text.splitlines() if line.startswith("forged")], text
