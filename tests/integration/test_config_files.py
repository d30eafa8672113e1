"""Every file kind the product reads, with a value of the wrong type, out of range or
with elements of the wrong type, through the real programs: breqd --config, breceive
--config (with [targets.EXPORT]), bmig-nbd --config (with [[export]]), bmigrate sync and
run --config (migration files), and device definitions in breqd's config directory.

Each bad value is one line on stderr, "PROG: FILE: KEY: expected ..., got ...", exit
status 3, no traceback, and nothing created: no state directory, no socket. A device
definition is not a command's file: breqd logs the same one line, tracks nothing from
it, and keeps serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from tests.daemon import wait_until
from tests.integration.breqd_helpers import client, device_toml, write_atomic
from tests.integration.sync_helpers import (MiB, bmigrate_argv, breceive_argv, make_image,
                                            migrations, receivers, start_background,  # noqa: F401
                                            start_receiver, track)

RUN_TIMEOUT = 30          # a program that takes the file starts serving: the test fails
EXIT_CONFIG = 3


def run(argv: list[str], cwd: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=dict(os.environ, **env), capture_output=True,
                          text=True, timeout=RUN_TIMEOUT, stdin=subprocess.DEVNULL)


def refused(done: subprocess.CompletedProcess, prog: str, path: str, key: str,
            words: str) -> None:
    """Exit 3 and one line naming the program, the file, the key and what it takes."""
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{prog}: {path}: {key}: "), lines[0]
    assert words in lines[0], lines[0]
    assert done.returncode == EXIT_CONFIG, done
    assert done.stdout == ""


def only(directory, *names: str) -> None:
    """Nothing but what the test wrote there: no state directory, socket or record."""
    assert sorted(os.listdir(directory)) == sorted(names)


def write(path, text: str) -> str:
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def cases(table):
    return pytest.mark.parametrize("text,key,words", [c[1:] for c in table],
                                   ids=[c[0] for c in table])


# -- breqd --------------------------------------------------------------------------

BREQD = [
    ("socket-mode-integer", "socket_mode = 600\n", "socket_mode",
     'expected an octal mode from "0000" to "0777", as a string, got 600'),
    ("socket-mode-too-wide", 'socket_mode = "1777"\n', "socket_mode", 'got "1777"'),
    ("socket-mode-not-octal", 'socket_mode = "0689"\n', "socket_mode", 'got "0689"'),
    ("log-level-number", "log_level = 1\n", "log_level", 'expected one of "debug", "info"'),
    ("log-level-unknown", 'log_level = "loud"\n', "log_level", 'got "loud"'),
    ("state-dir-number", "state_dir = 5\n", "state_dir",
     "expected a path (a non-empty string), got 5"),
    ("config-dir-empty", 'config_dir = ""\n', "config_dir", 'expected a path'),
    ("control-array", 'control = ["/run/bmig/breqd.sock"]\n', "control", "got an array"),
    ("control-nul", 'control = "a\\u0000b"\n', "control", r'got "a\u0000b"'),
]


@cases(BREQD)
def test_breqd_refuses_a_bad_value_in_its_config(tmp_path, text, key, words):
    config = write(tmp_path / "breqd.toml", text)
    done = run([sys.executable, "-c", "from bmig.cli.breqd import main; main()",
                "--config", config, "--state-dir", str(tmp_path / "state"),
                "--config-dir", str(tmp_path / "devices.d"),
                "--control", str(tmp_path / "breqd.sock")], str(tmp_path))
    refused(done, "breqd", config, key, words)
    only(tmp_path, "breqd.toml")


# -- breceive -----------------------------------------------------------------------

TARGET = '[targets.vm1]\npath = "/dev/null"\n'
BRECEIVE = [
    ("max-sessions-string", 'max_sessions = "abc"\n', "max_sessions",
     'expected an integer from 1 to 1024, got "abc"'),
    ("max-sessions-zero", "max_sessions = 0\n", "max_sessions", "got 0"),
    ("max-sessions-too-many", "max_sessions = 1025\n", "max_sessions", "got 1025"),
    ("max-sessions-bool", "max_sessions = true\n", "max_sessions", "got true"),
    ("max-sessions-float", "max_sessions = 16.0\n", "max_sessions", "got 16.0"),
    ("listen-string", 'listen = "127.0.0.1:10810"\n', "listen",
     'expected an array of "HOST:PORT" strings'),
    ("listen-no-port", 'listen = ["127.0.0.1"]\n', "listen[0]",
     'expected "HOST:PORT", such as "0.0.0.0:10810", got "127.0.0.1"'),
    ("listen-number", "listen = [10810]\n", "listen[0]", "got 10810"),
    ("listen-second", 'listen = ["127.0.0.1:0", "h:p"]\n', "listen[1]", 'got "h:p"'),
    ("allow-discard-string", TARGET + 'allow_discard = "false"\n', "targets.vm1.allow_discard",
     'expected true or false, got "false"'),
    ("allow-discard-number", TARGET + "allow_discard = 0\n", "targets.vm1.allow_discard",
     "got 0"),
    ("target-path-number", "[targets.vm1]\npath = 5\n", "targets.vm1.path",
     "expected a path (a non-empty string), got 5"),
    ("target-not-a-table", 'targets = { vm1 = "/dev/null" }\n', "targets.vm1",
     'expected a table, got "/dev/null"'),
    ("targets-array", 'targets = ["vm1"]\n', "targets",
     "expected a table of [targets.NAME] tables, got an array"),
    ("target-bad-name", '[targets."a b"]\npath = "/dev/null"\n', "targets",
     'expected names of up to 64 letters'),
    ("target-name-of-a-lock-file", '[targets."vm1.record"]\npath = "/dev/null"\n',
     "targets", 'not ending in ".replica", ".record" or ".record-intent"'),
    ("target-without-path", "[targets.vm1]\nallow_discard = true\n", "targets.vm1",
     "missing key 'path'"),
    ("target-unknown-key", TARGET + "size = 5\n", "targets.vm1", "unknown setting(s): size"),
    ("state-dir-empty", 'state_dir = ""\n', "state_dir", 'got ""'),
    ("state-dir-nul", 'state_dir = "a\\u0000b"\n', "state_dir", r'got "a\u0000b"'),
    ("secret-file-bool", "secret_file = true\n", "secret_file", "got true"),
    ("tls-client-ca-number", "tls_client_ca = 1\n", "tls_client_ca", "got 1"),
    ("log-level-unknown", 'log_level = "loud"\n', "log_level", 'got "loud"'),
]


@cases(BRECEIVE)
def test_breceive_refuses_a_bad_value_in_its_config(tmp_path, text, key, words):
    config = write(tmp_path / "breceive.toml", text)
    done = run(breceive_argv("--config", config, "--state-dir", str(tmp_path / "state"),
                             "--secret-file", str(tmp_path / "secret"),
                             "--target", "t=/dev/null", "--listen", "127.0.0.1:0"),
               str(tmp_path))
    refused(done, "breceive", config, key, words)
    only(tmp_path, "breceive.toml")


def test_breceive_refuses_a_target_flag_named_like_another_exports_lock_file(tmp_path):
    """"vm1.record" would share vm1's record lock (EXPORT.record.lock): refused."""
    done = run(breceive_argv("--state-dir", str(tmp_path / "state"),
                             "--secret-file", str(tmp_path / "secret"),
                             "--target", "vm1.record=/dev/null", "--listen", "127.0.0.1:0"),
               str(tmp_path))
    assert done.returncode != 0
    assert "export name 'vm1.record' is invalid" in done.stderr, done.stderr
    assert ".record-intent" in done.stderr


# -- bmig-nbd -----------------------------------------------------------------------

EXPORT = '[[export]]\ndevice = "vm1"\nbacking = "/dev/null"\n'
NBD = [
    ("max-connections-zero", "max_connections = 0\n", "max_connections",
     "expected an integer from 1 to 10000, got 0"),
    ("max-connections-string", 'max_connections = "64"\n', "max_connections", 'got "64"'),
    ("hold-chunks-bool", "hold_chunks = true\n", "hold_chunks", "got true"),
    ("hold-chunks-too-many", "hold_chunks = 1048577\n", "hold_chunks", "got 1048577"),
    ("read-only-string", 'read_only = "false"\n', "read_only",
     'expected true or false, got "false"'),
    ("track-string", 'track = "no"\n', "track", 'got "no"'),
    ("tcp-number", "tcp = 10809\n", "tcp", 'expected "HOST:PORT"'),
    ("tcp-without-port", 'tcp = "localhost"\n', "tcp", 'got "localhost"'),
    ("unix-array", 'unix = ["/run/nbd.sock"]\n', "unix", "got an array"),
    ("tls-unknown", 'tls = "yes"\n', "tls", 'expected one of "require", "on", "off", got "yes"'),
    ("tls-bool", "tls = true\n", "tls", "got true"),
    ("export-table", '[export]\ndevice = "vm1"\nbacking = "/dev/null"\n', "export",
     "expected an array of [[export]] tables, got a table"),
    ("export-element", "export = [5]\n", "export[0]", "expected a table, got 5"),
    ("export-device-number", '[[export]]\ndevice = 5\nbacking = "/dev/null"\n',
     "export[0].device", "expected a device name"),
    ("export-device-name", '[[export]]\ndevice = "a b"\nbacking = "/dev/null"\n',
     "export[0].device", 'got "a b"'),
    ("export-without-backing", '[[export]]\ndevice = "vm1"\n', "export[0]",
     "missing key 'backing'"),
    ("export-read-only-string", EXPORT + 'read_only = "yes"\n', "export[0].read_only",
     'expected true or false, got "yes"'),
    ("export-name-number", EXPORT + "name = 5\n", "export[0].name", "got 5"),
    ("export-description-long", EXPORT + f'description = "{"x" * 4097}"\n',
     "export[0].description", "a string of at most 4096 bytes"),
    ("second-export-backing", EXPORT + '[[export]]\ndevice = "vm2"\nbacking = ""\n',
     "export[1].backing", 'got ""'),
    ("export-unknown-key", EXPORT + "size = 1\n", "export[0]", "unknown setting(s): size"),
    ("log-level-case", 'log_level = "INFO"\n', "log_level", 'got "INFO"'),
]


@cases(NBD)
def test_bmig_nbd_refuses_a_bad_value_in_its_config(tmp_path, text, key, words):
    config = write(tmp_path / "nbd.toml", text)
    done = run([sys.executable, "-c", "from bmig.cli.nbd import main; main()",
                "--config", config, "--device", "vm9", "--backing", "/dev/null",
                "--unix", str(tmp_path / "nbd.sock"), "--control", str(tmp_path / "none.sock"),
                "--manage-dir", str(tmp_path / "manage")], str(tmp_path))
    refused(done, "bmig-nbd", config, key, words)
    only(tmp_path, "nbd.toml")


# -- migration files (bmigrate sync and run) ----------------------------------------

BASE = {"name": '"vm1"', "source": '"/dev/null"', "to": '"tcp://127.0.0.1:9/vm1"'}
MIGRATION = [
    ("level-string", 'level = "1"\n', "level", 'expected an integer from 0 to 22, got "1"'),
    ("level-too-high", "level = 23\n", "level", "got 23"),
    ("level-bool", "level = true\n", "level", "got true"),
    ("compress-unknown", 'compress = "never"\n', "compress", 'got "never"'),
    ("compress-bool", "compress = true\n", "compress", "got true"),
    ("window-too-small", 'window = "1M"\n', "window", 'a size of at least 4M in bytes'),
    ("window-float", "window = 8.5\n", "window", "got 8.5"),
    ("window-bool", "window = true\n", "window", "got true"),
    ("direct-string", 'direct = "false"\n', "direct", 'expected true or false, got "false"'),
    ("checksum-number", "checksum = 1\n", "checksum", "got 1"),
    ("accept-new-host-key-string", 'accept_new_host_key = "no"\n', "accept_new_host_key",
     'got "no"'),
    ("threshold-negative", "threshold = -5\n", "threshold", "got -5"),
    ("threshold-bool", "threshold = true\n", "threshold", "got true"),
    ("threshold-not-ascii-seconds", 'threshold = "²s"\n', "threshold", 'got "²s"'),
    ("bwlimit-negative", "bwlimit = -1\n", "bwlimit", "got -1"),
    ("bwlimit-array", 'bwlimit = ["100M"]\n', "bwlimit", "got an array"),
    ("bwlimit-float", "bwlimit = 1.5\n", "bwlimit", "got 1.5"),
    ("name-number", "name = 5\n", "name", "expected a device name"),
    ("name-invalid", 'name = "a b"\n', "name", 'got "a b"'),
    ("to-number", "to = 5\n", "to", "expected a target URL, got 5"),
    ("to-not-a-url", 'to = "backup"\n', "to", "is not a URL"),
    ("ssh-program-unknown", 'ssh_program = "putty"\n', "ssh_program",
     'expected one of "paramiko", "openssh", got "putty"'),
    ("source-empty", 'source = ""\n', "source", 'got ""'),
    ("control-number", "control = 5\n", "control", "got 5"),
    ("log-level-unknown", 'log_level = "loud"\n', "log_level", 'got "loud"'),
]
INTERVAL = [
    ("interval-zero", "interval = 0\n", "interval", "expected a number from 0.05 to 3600, got 0"),
    ("interval-string", 'interval = "1"\n', "interval", 'got "1"'),
    ("interval-bool", "interval = true\n", "interval", "got true"),
    ("interval-too-long", "interval = 3601\n", "interval", "got 3601"),
]


def migration_file(tmp_path, text: str, key: str) -> str:
    base = "".join(f"{k} = {v}\n" for k, v in BASE.items() if k != key)
    return write(tmp_path / "vm1.toml", base + text)


@cases(MIGRATION)
def test_bmigrate_sync_refuses_a_bad_value_in_a_migration_file(tmp_path, text, key, words):
    config = migration_file(tmp_path, text, key)
    done = run(bmigrate_argv("sync", "--config", config), str(tmp_path),
               BMIG_CONTROL=str(tmp_path / "none.sock"))
    refused(done, "bmigrate", config, key, words)
    only(tmp_path, "vm1.toml")


@cases(INTERVAL + MIGRATION[:2])
def test_bmigrate_run_refuses_a_bad_value_in_a_migration_file(tmp_path, text, key, words):
    config = migration_file(tmp_path, text, key)
    done = run(bmigrate_argv("run", "--config", config), str(tmp_path),
               BMIG_CONTROL=str(tmp_path / "none.sock"))
    refused(done, "bmigrate", config, key, words)
    only(tmp_path, "vm1.toml")


def test_flags_override_good_values_of_the_file(tmp_path):
    """A file that is right is taken, and a flag still wins over it: the level the
    file gives is replaced by --level's, then the missing breqd is what stops sync."""
    config = write(tmp_path / "vm1.toml", "".join(f"{k} = {v}\n" for k, v in BASE.items()) +
                   'level = 3\nwindow = "8M"\nthreshold = "2s"\ndirect = false\n')
    done = run(bmigrate_argv("sync", "--config", config, "--level", "99"), str(tmp_path),
               BMIG_CONTROL=str(tmp_path / "none.sock"))
    assert done.returncode == 2 and "--level" in done.stderr, done     # click's own check
    done = run(bmigrate_argv("sync", "--config", config, "--level", "5"), str(tmp_path),
               BMIG_CONTROL=str(tmp_path / "none.sock"))
    assert done.returncode == 4, done                       # unreachable breqd: file taken
    assert "none.sock" in done.stderr and "Traceback" not in done.stderr


def test_a_bad_value_on_reload_is_refused_and_the_old_settings_stay(breqd, tmp_path,
                                                                   receivers, migrations):
    """SIGHUP with a bad value in the file: one line naming file and key, and bmigrate
    run goes on with what it had (bwlimit = -1 used to be taken as a rate)."""
    source = make_image(str(tmp_path / "src.img"), MiB, "random")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")})
    receivers.append(r)
    good = (f'name = "d"\nsource = "{source}"\nto = "{r.url("d")}"\n'
            f'secret_file = "{r.secret_file}"\ninterval = 0.2\n')
    config = str(tmp_path / "d.toml")
    write_atomic(config, good + 'bwlimit = "100M"\n')
    m = start_background(migrations, breqd, "run", "--config", config, "--json")
    m.wait_event(lambda e: e["event"] == "pass", timeout=30, what="the initial copy")
    write_atomic(config, good + "bwlimit = -1\n")
    m.signal(signal.SIGHUP)
    wait_until(lambda: any("reload refused" in line for line in m.stderr_lines), timeout=10,
               what="the reload to be refused")
    line, = [line for line in m.stderr_lines if "reload refused" in line]
    assert f"{config}: bwlimit: expected a rate" in line and "got -1" in line, line
    assert not [e for e in m.events if e["event"] == "note" and "reloaded" in e["message"]]
    write_atomic(config, good + 'bwlimit = "0"\n')       # a good file is taken again
    m.signal(signal.SIGHUP)
    m.wait_event(lambda e: e["event"] == "note" and "reloaded" in e["message"], timeout=10,
                 what="the reload note")
    assert m.stop() == 0, m.stderr
    assert "Traceback" not in m.stderr


# -- device definitions in breqd's config directory ----------------------------------

ID = "00000000000000a1"
DEVICES = [
    ("size-float", "size = 4096.0\n", "size", "expected a size from 1 to 1024P in bytes"),
    ("size-bool", "size = true\n", "size", "got true"),
    ("size-negative", "size = -4096\n", "size", "got -4096"),
    ("size-too-big", 'size = "2000P"\n', "size", 'got "2000P"'),
    ("size-array", "size = [4096]\n", "size", "got an array"),
    ("chunk-not-a-power-of-two", 'chunk_size = "3K"\n', "chunk_size",
     "expected a size from 4K to 16M, a power of two,"),
    ("chunk-too-small", "chunk_size = 1024\n", "chunk_size", "got 1024"),
    ("chunk-bool", "chunk_size = true\n", "chunk_size", "got true"),
    ("device-id-number", "device_id = 161\n", "device_id",
     "expected 16 hex digits, not all zero, as a string, got 161"),
    ("device-id-zero", 'device_id = "0000000000000000"\n', "device_id", 'got "0000000000000000"'),
    ("name-number", "name = 5\n", "name", "expected a device name"),
    ("name-array", 'name = ["x"]\n', "name", "got an array"),
]
DEVICE_BASE = {"name": '"{name}"', "size": "16777216", "device_id": f'"{ID}"'}


def test_a_device_definition_with_a_bad_value_is_one_line_in_the_log(breqd):
    """Every bad definition at once in one breqd: each is logged as one line naming its
    file and key, none is tracked, and the good one beside them is."""
    files = {}
    for i, (case, text, key, words) in enumerate(DEVICES):
        name = f"bad{i}"
        base = "".join(f"{k} = {v.format(name=name)}\n" for k, v in DEVICE_BASE.items()
                       if k != key)
        path = os.path.join(breqd.config_dir, name + ".toml")
        write_atomic(path, base + text)
        files[path] = (case, key, words)
    unknown = os.path.join(breqd.config_dir, "typo.toml")
    write_atomic(unknown, device_toml("typo", 16 * MiB, 4096, ID) + "chunksize = 4096\n")
    good = os.path.join(breqd.config_dir, "good.toml")
    write_atomic(good, device_toml("good", 16 * MiB, 4096, ID))
    os.kill(breqd.daemon.proc.pid, signal.SIGHUP)

    def logged() -> bool:
        log = breqd.daemon.log()
        return all(f"{path}: " in log for path in [*files, unknown])
    wait_until(logged, timeout=20, what="breqd to log every bad file")
    log = breqd.daemon.log()
    assert "Traceback" not in log
    for path, (case, key, words) in files.items():
        line, = [line for line in log.splitlines() if f"{path}: " in line]
        assert f"{path}: {key}: expected" in line and words in line, (case, line)
    line, = [line for line in log.splitlines() if f"{unknown}: " in line]
    assert "unknown setting(s): chunksize" in line, line
    wait_until(lambda: _names(breqd) == ["good"], timeout=20, what="good to be tracked")
    assert breqd.daemon.proc.poll() is None


def _names(breqd) -> list[str]:
    with client(breqd.control) as c:
        return [d["name"] for d in c.list_devices()]
