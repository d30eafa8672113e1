"""Listening sockets handed over by systemd (LISTEN_FDS): breceive and bmig-nbd.

systemd passes the sockets as fds 3, 4, ... with LISTEN_FDS set; the daemons serve them
instead of (or beside) their own. Here the test plays systemd: it makes the socket, puts
it at fd 3 in the child, and sets the variables.
"""

from __future__ import annotations

import json
import socket
import sys

from tests.daemon import Daemon
from tests.integration.nbd_helpers import require, tool
from tests.integration.sync_helpers import (MiB, make_image, same_bytes, sync, track,
                                            write_secret)

AT_FD_3 = ("import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
           "os.environ['LISTEN_FDS'] = '1'; os.environ['LISTEN_PID'] = str(os.getpid()); "
           "os.execv(sys.executable, [sys.executable, '-c', sys.argv[2], *sys.argv[3:]])")


def activated(program: str, sock: socket.socket, *args: str) -> list[str]:
    return [sys.executable, "-c", AT_FD_3, str(sock.fileno()),
            f"from bmig.cli.{program} import main; main()", *args]


def start(argv: list[str], log: str, sock: socket.socket) -> Daemon:
    return Daemon(argv, log, pass_fds=(sock.fileno(),)).start()


def test_breceive_serves_a_socket_from_systemd(breqd, tmp_path):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    secret = write_secret(str(tmp_path / "secret"))
    target = str(tmp_path / "tgt.img")
    daemon = start(activated("breceive", listener, "--target", f"d={target}", "--secret-file",
                             secret, "--state-dir", str(tmp_path / "state")),
                   str(tmp_path / "breceive.log"), listener)
    listener.close()
    try:
        source = make_image(str(tmp_path / "src.img"), 4 * MiB + 3, "mixed")
        track(breqd, "d", source)
        sync(breqd, "d", "--source", source, "--to", f"tcp://127.0.0.1:{port}/d",
             "--secret-file", secret)
        assert same_bytes(source, target)
        assert f"127.0.0.1:{port}" in daemon.log()
    finally:
        assert daemon.stop() == 0


def test_bmig_nbd_serves_a_socket_from_systemd(breqd, tmp_path):
    require("nbdinfo")
    path = str(tmp_path / "nbd.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(16)
    backing = str(tmp_path / "backing.img")
    with open(backing, "wb") as f:
        f.truncate(2 * MiB)
    breqd.client().add_device("d1", 2 * MiB)
    daemon = start(activated("nbd", listener, "--device", "d1", "--backing", backing,
                             "--control", breqd.control, "--manage-dir",
                             str(tmp_path / "manage")),
                   str(tmp_path / "nbd.log"), listener)
    listener.close()
    try:
        info = json.loads(tool("nbdinfo", "--json", f"nbd+unix:///d1?socket={path}").stdout)
        assert info["exports"][0]["export-size"] == 2 * MiB
    finally:
        assert daemon.stop() == 0
