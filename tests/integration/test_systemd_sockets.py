"""Sockets from systemd replace breceive's `listen` addresses, and the log says so.

The shipped example (daemons/examples/breceive.toml) has listen = ["0.0.0.0:10810"] and
breceive.socket has ListenStream=10810: breceive used to bind the port the socket unit
already held, exit 3, and be restarted in a loop. The test plays systemd as
test_socket_activation.py does (the socket at fd 3, LISTEN_FDS and LISTEN_PID set).
"""

from __future__ import annotations

import socket

from tests.integration.sync_helpers import MiB, make_image, same_bytes, sync, track, \
    write_secret
from tests.integration.test_socket_activation import activated, start


def test_sockets_from_systemd_replace_the_listen_addresses(breqd, tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    secret = write_secret(str(tmp_path / "secret"))
    target = str(tmp_path / "tgt.img")
    config = tmp_path / "breceive.toml"
    config.write_text(f'listen = ["127.0.0.1:{port}"]\n'
                      f'state_dir = "{tmp_path / "state"}"\n'
                      f'secret_file = "{secret}"\n'
                      f'[targets.d]\npath = "{target}"\n')
    daemon = start(activated("breceive", listener, "--config", str(config)),
                   str(tmp_path / "breceive.log"), listener)
    listener.close()
    try:
        source = make_image(str(tmp_path / "src.img"), 2 * MiB, "mixed")
        track(breqd, "d", source)
        sync(breqd, "d", "--source", source, "--to", f"tcp://127.0.0.1:{port}/d",
             "--secret-file", secret)
        assert same_bytes(source, target)
        log = daemon.log()
        assert (f"serving the socket(s) systemd passed (127.0.0.1:{port}), not listen = "
                f"127.0.0.1:{port}") in log, log
    finally:
        assert daemon.stop() == 0
