"""bmigrate sync over SSH to a real sshd on 127.0.0.1, which runs ``breceive --stdio``:
with paramiko inside bmigrate and with the system ssh(1) as a child.

A mixed image arrives byte-identical and the target's lineage record says consistent;
host keys are checked (a changed key is refused, an unknown one too unless
--accept-new-host-key, which saves it); a remote command that does not exist is one line
with a hint; a sync killed with -9 in the middle of a pass resumes over SSH.
"""

from __future__ import annotations

import json
import os
import shlex

import pytest

from tests import sshd as sshd_fixture
from tests.daemon import wait_until
from tests.integration.sync_helpers import (MiB, breceive_argv,  # noqa: F401
                                            make_image, migrations, same_bytes,
                                            start_background, summary_of, sync, track)
from tests.sshd import Sshd, descendants, make_key, write_known_hosts

sshd = sshd_fixture.sshd      # the fixture: a real sshd per test

PROGRAMS = ["paramiko", "openssh"]
EXPORT = "vm1"
SIZE = 16 * MiB


@pytest.fixture(params=PROGRAMS)
def program(request) -> str:
    return request.param


def remote_command(target: str, state_dir: str, *extra: str) -> str:
    """breceive --stdio as the remote command, by the venv's python, quoted for sh."""
    return shlex.join(breceive_argv("--stdio", "--target", f"{EXPORT}={target}",
                                    "--state-dir", state_dir, *extra))


def ssh_args(sshd: Sshd, program: str, target: str, state_dir: str,
             known_hosts: str | None = None, command: str | None = None) -> list[str]:
    return ["--to", f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/{EXPORT}",
            "--ssh-command", command or remote_command(target, state_dir),
            "--ssh-program", program, "--known-hosts", known_hosts or sshd.known_hosts,
            "--identity", sshd.identity]


def sessions_gone(sshd: Sshd) -> None:
    """Every session sshd ran has ended (its breceive with it): the target's lock is
    free for the next one."""
    wait_until(lambda: not descendants(sshd.proc.pid), timeout=20,
               what="the SSH sessions (and their breceive) to end")


def nothing_written(target: str, state_dir: str) -> None:
    assert not os.path.exists(target)
    assert not os.path.exists(os.path.join(state_dir, EXPORT + ".target"))


def test_sync_over_ssh_is_byte_identical(breqd, tmp_path, sshd, program):
    source = make_image(str(tmp_path / "src.img"), SIZE, "mixed")
    target, state = str(tmp_path / "tgt.img"), str(tmp_path / "targets")
    track(breqd, "d", source)
    done = sync(breqd, "d", "--source", source, *ssh_args(sshd, program, target, state),
                "--json")
    summary = summary_of(done)
    assert summary["converged"] and summary["relation"] == "new"
    assert summary["dirty_bytes"] == 0 and summary["bytes_zero"] > 0
    assert summary["target"] == f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/{EXPORT}"
    assert same_bytes(source, target) and os.path.getsize(target) == SIZE
    with open(os.path.join(state, EXPORT + ".target")) as f:
        record = json.load(f)
    stats = breqd.client().stats("d")
    assert record["state"] == "consistent" and record["passes"] == 1
    assert record["generation"] == stats["generation"]
    assert record["source_device_id"] == stats["device_id"]
    assert record["size"] == SIZE and record["export"] == EXPORT
    assert stats["dirty_bytes"] == 0 and stats["inflight_bytes"] == 0
    # Once more: the same lineage, nothing to ship.
    again = summary_of(sync(breqd, "d", "--source", source,
                            *ssh_args(sshd, program, target, state), "--json"))
    assert again["relation"] == "same" and again["passes"] == 0 and again["bytes_sent"] == 0
    sessions_gone(sshd)


def test_a_changed_host_key_is_refused(breqd, tmp_path, sshd, program):
    source = make_image(str(tmp_path / "src.img"), MiB, "random")
    target, state = str(tmp_path / "tgt.img"), str(tmp_path / "targets")
    track(breqd, "d", source)
    other = make_key(str(tmp_path / "other_host_key"), "an impostor")
    wrong = write_known_hosts(str(tmp_path / "known_hosts"), "127.0.0.1", sshd.port,
                              other.public_line)
    with open(wrong) as f:
        before = f.read()
    done = sync(breqd, "d", "--source", source,
                *ssh_args(sshd, program, target, state, known_hosts=wrong), check=False)
    # bmig gives 4 (UnreachableError) for a host key it refuses; bmigrate(1) says 8 (see
    # test_a_refused_host_key_exits_with_the_authentication_status below).
    assert done.returncode in (4, 8), done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bmigrate: "), done.stderr
    assert "HOST KEY OF 127.0.0.1:%d HAS CHANGED" % sshd.port in lines[0]
    assert wrong in lines[0] and "Traceback" not in done.stderr
    with open(wrong) as f:
        assert f.read() == before                     # never rewritten
    nothing_written(target, state)
    assert breqd.client().stats("d")["inflight_bytes"] == 0


def test_an_unknown_host_is_refused_then_accepted_with_the_flag(breqd, tmp_path, sshd,
                                                                program):
    source = make_image(str(tmp_path / "src.img"), 2 * MiB + 3, "mixed")
    target, state = str(tmp_path / "tgt.img"), str(tmp_path / "targets")
    track(breqd, "d", source)
    known = str(tmp_path / "known_hosts")              # does not exist yet
    args = ssh_args(sshd, program, target, state, known_hosts=known)
    refused = sync(breqd, "d", "--source", source, *args, check=False)
    assert refused.returncode in (4, 8), refused.stderr
    lines = refused.stderr.splitlines()
    assert len(lines) == 1 and "host key of 127.0.0.1:%d is not known" % sshd.port in lines[0]
    assert "--accept-new-host-key" in lines[0]
    nothing_written(target, state)
    assert not os.path.exists(known) or sshd.host_key.public_line.split()[1] not in open(
        known).read()

    accepted = sync(breqd, "d", "--source", source, *args, "--accept-new-host-key", "--json")
    assert summary_of(accepted)["converged"]
    assert same_bytes(source, target)
    import paramiko
    saved = paramiko.HostKeys(known).lookup(f"[127.0.0.1]:{sshd.port}")
    assert saved is not None and saved["ssh-ed25519"].get_base64() == \
        sshd.host_key.public_line.split()[1]
    # Known now: the next sync needs no flag.
    again = sync(breqd, "d", "--source", source, *args, "--json")
    assert summary_of(again)["relation"] == "same"
    sessions_gone(sshd)


@pytest.mark.parametrize("program", ["paramiko", "openssh"])
def test_an_accepted_host_key_is_saved_in_a_new_directory(breqd, tmp_path, sshd, program):
    source = make_image(str(tmp_path / "src.img"), MiB, "random")
    target, state = str(tmp_path / "tgt.img"), str(tmp_path / "targets")
    track(breqd, "d", source)
    known = str(tmp_path / "dot-ssh" / "known_hosts")     # neither file nor directory yet
    args = ssh_args(sshd, program, target, state, known_hosts=known)
    sync(breqd, "d", "--source", source, *args, "--accept-new-host-key")
    assert same_bytes(source, target)
    again = sync(breqd, "d", "--source", source, *args, check=False)
    assert again.returncode == 0, again.stderr
    sessions_gone(sshd)


def test_a_remote_command_that_does_not_exist(breqd, tmp_path, sshd, program):
    source = make_image(str(tmp_path / "src.img"), MiB, "random")
    target, state = str(tmp_path / "tgt.img"), str(tmp_path / "targets")
    track(breqd, "d", source)
    missing = "/nonexistent/bin/breceive --stdio"
    done = sync(breqd, "d", "--source", source,
                *ssh_args(sshd, program, target, state, command=missing), check=False)
    assert done.returncode == 4, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bmigrate: "), done.stderr
    assert "exited with status 127" in lines[0] and repr(missing) in lines[0]
    assert "install bmig on the remote host or set the remote command" in lines[0]
    nothing_written(target, state)
    assert breqd.client().stats("d")["dirty_bytes"] == MiB      # nothing committed


def test_kill9_of_bmigrate_over_ssh_then_resume(breqd, tmp_path, sshd, program,
                                                migrations):
    size, window = 32 * MiB, 4 * MiB
    source = make_image(str(tmp_path / "src.img"), size, "random")
    target, state = str(tmp_path / "tgt.img"), str(tmp_path / "targets")
    track(breqd, "d", source)
    args = ["d", "--source", source, *ssh_args(sshd, program, target, state),
            "--window", str(window), "--level", "0", "--json"]
    m = start_background(migrations, breqd, "sync", *args, "--bwlimit", "8M")
    client = breqd.client()

    def midway():
        s = client.stats("d")
        done = size - s["dirty_bytes"] - s["inflight_bytes"]
        return s if done >= window and s["dirty_bytes"] >= 2 * window else None

    before = wait_until(midway, timeout=30, what="the pass to be half way")
    m.kill9()                                   # and ssh(1) is gone with it
    assert m.proc.returncode == -9
    wait_until(lambda: client.stats("d")["inflight_bytes"] == 0, timeout=30,
               what="breqd to abort the dead sender's checkouts")
    sessions_gone(sshd)                         # breceive saw the end and let go
    with open(os.path.join(state, EXPORT + ".target")) as f:
        assert json.load(f)["state"] == "inconsistent"
    stats = client.stats("d")
    assert stats["dirty_bytes"] - before["dirty_bytes"] <= window   # at most a window again
    assert stats["dirty_bytes"] < size
    resumed = summary_of(sync(breqd, *args))
    assert resumed["relation"] == "same" and resumed["converged"]
    assert resumed["bytes_committed"] == stats["dirty_bytes"]
    assert same_bytes(source, target)
    with open(os.path.join(state, EXPORT + ".target")) as f:
        assert json.load(f)["state"] == "consistent"
    sessions_gone(sshd)


def test_a_refused_host_key_exits_with_the_authentication_status(breqd, tmp_path, sshd,
                                                                 migrations):
    source = make_image(str(tmp_path / "src.img"), MiB, "random")
    target, state = str(tmp_path / "tgt.img"), str(tmp_path / "targets")
    track(breqd, "d", source)
    other = make_key(str(tmp_path / "other_host_key"), "an impostor")
    wrong = write_known_hosts(str(tmp_path / "known_hosts"), "127.0.0.1", sshd.port,
                              other.public_line)
    m = start_background(migrations, breqd, "run", "d", "--source", source,
                         *ssh_args(sshd, "paramiko", target, state, known_hosts=wrong),
                         "--json", "--interval", "0.2")
    wait_until(lambda: m.proc.poll() is not None or any(
        e.get("retry_in") is not None for e in m.of("note")), timeout=20,
        what="run to end or to plan a retry")
    retried = m.proc.poll() is None
    m.stop()
    nothing_written(target, state)
    assert not retried, f"run retries a changed host key: {m.of('note')}"
    assert m.proc.returncode == 8


def connect_over_ssh(tmp_path, sshd: Sshd, program: str):
    """A WireTarget to breceive --stdio over SSH, handshake done."""
    from bmig.wire.connect import connect
    from bmig.wire.options import ConnectOptions
    from bmig.wire.urls import parse_target_url

    target, state = str(tmp_path / "tgt.img"), str(tmp_path / "targets")
    url = parse_target_url(f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/{EXPORT}")
    return connect(url, ConnectOptions(ssh_command=remote_command(target, state),
                                       ssh_program=program, known_hosts=sshd.known_hosts,
                                       identity=sshd.identity))


def test_breceive_stdio_reads_through_a_one_mib_pipe(tmp_path, sshd, program):
    """sshd's pipe into breceive --stdio holds 1 MiB, not 64 KiB: sshd writes, and
    wakes breceive, in larger pieces and stalls less while breceive writes the target.
    Looked at once the handshake is done (breceive sized it before reading anything)."""
    import fcntl

    wire = connect_over_ssh(tmp_path, sshd, program)
    try:
        receivers = [pid for pid in descendants(sshd.proc.pid)
                     if "bmig.cli.breceive" in open(f"/proc/{pid}/cmdline").read()]
        assert len(receivers) == 1
        fd = os.open(f"/proc/{receivers[0]}/fd/0", os.O_RDONLY | os.O_NONBLOCK)
        try:
            assert fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ) == MiB
        finally:
            os.close(fd)
    finally:
        wire.close()
    sessions_gone(sshd)


def test_frames_over_ssh_are_not_sealed_again(tmp_path, sshd, program):
    """SSH authenticated breceive (its host key) and encrypts: no second AEAD."""
    wire = connect_over_ssh(tmp_path, sshd, program)
    try:
        assert not wire.sealed and not wire.channel.sealed
    finally:
        wire.close()
    sessions_gone(sshd)


def test_the_ssh_child_path_never_imports_paramiko(tmp_path, sshd):
    """paramiko costs 0.13 s of CPU to import: a sync through the system ssh connects,
    authenticates and closes without it."""
    import subprocess
    import sys

    target, state = str(tmp_path / "tgt.img"), str(tmp_path / "targets")
    script = (
        "import sys\n"
        "from bmig.wire.connect import connect\n"
        "from bmig.wire.options import ConnectOptions\n"
        "from bmig.wire.urls import parse_target_url\n"
        "url, command, known, identity = sys.argv[1:]\n"
        "wire = connect(parse_target_url(url), ConnectOptions(ssh_command=command, "
        "ssh_program='openssh', known_hosts=known, identity=identity))\n"
        "wire.close()\n"
        "print(sorted(m for m in sys.modules if m.startswith('paramiko')))\n")
    done = subprocess.run([sys.executable, "-c", script,
                           f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/{EXPORT}",
                           remote_command(target, state), sshd.known_hosts, sshd.identity],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    sessions_gone(sshd)
