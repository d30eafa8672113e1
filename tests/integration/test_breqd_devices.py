"""Devices come and go through breqd's config directory and `bmigrate track`.

One TOML file per device (bmig/tracker/definitions.py); breqd watches the directory. A new
file starts tracking, a removed file stops it (the bitmap stays), a changed size, chunk
size or device id is refused while the old definition stays in force, and bad files are
logged without hurting the daemon or the other devices.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import sys

import pytest

from bmig.errors import BmigError, UnknownDevice, UnreachableError
from bmig.tracker.blocking_client import TrackerClient
from tests.daemon import Daemon, wait_until
from tests.integration.breqd_helpers import (MiB, add_clean_device, bmigrate, client,
                                             device_toml, dirty_chunks, one_line_error,
                                             write_atomic, write_plain)

SIZE = 16 * MiB
CHUNK = 4096
ID_A = "00000000000000a1"
ID_B = "00000000000000b2"


class Log:
    """New lines of a daemon's log since the last mark()."""

    def __init__(self, instance):
        self.instance = instance
        self.start = 0
        self.mark()

    def mark(self) -> None:
        self.start = len(self.instance.daemon.log())

    def new(self) -> str:
        return self.instance.daemon.log()[self.start:]

    def wait_for(self, *words: str, timeout: float = 10.0) -> str:
        wait_until(lambda: all(w in self.new() for w in words), timeout=timeout,
                   what=f"breqd to log {words}")
        return self.new()


def names(breqd) -> list[str]:
    with client(breqd.control) as c:
        return [d["name"] for d in c.list_devices()]


def wait_tracked(breqd, name: str, tracked: bool = True) -> None:
    wait_until(lambda: (name in names(breqd)) == tracked, timeout=10,
               what=f"{name} to be {'tracked' if tracked else 'untracked'}")


def stats(breqd, name: str) -> dict:
    with client(breqd.control) as c:
        return c.stats(name)


def toml_path(breqd, name: str) -> str:
    return os.path.join(breqd.config_dir, name + ".toml")


def bitmap_path(breqd, name: str) -> str:
    return os.path.join(breqd.state_dir, name + ".bitmap")


def alive(breqd) -> None:
    assert breqd.daemon.proc.poll() is None, breqd.daemon.log()


# -- hot add and remove through the directory -----------------------------------------

@pytest.mark.parametrize("write", [write_atomic, write_plain], ids=["atomic", "plain"])
def test_a_new_file_starts_tracking(breqd, write):
    write(toml_path(breqd, "a"), device_toml("a", SIZE, CHUNK, ID_A))
    write(toml_path(breqd, "b"), device_toml("b", "64M", "64K", ID_B))
    wait_tracked(breqd, "a")
    wait_tracked(breqd, "b")
    a, b = stats(breqd, "a"), stats(breqd, "b")
    assert (a["size"], a["chunk_size"], a["device_id"]) == (SIZE, CHUNK, ID_A)
    assert (b["size"], b["chunk_size"], b["device_id"]) == (64 * MiB, 64 * 1024, ID_B)
    for s in (a, b):   # a new device starts all dirty (invariant 4), never empty
        assert s["dirty_bytes"] == s["size"] and s["recovered"] == "no saved bitmap"
        assert os.path.exists(s["state_file"])
    assert names(breqd) == ["a", "b"]
    with client(breqd.control) as c:
        c.clear_all("a", force=True)
        c.mark("a", [(SIZE - 4096, 4096)])
        assert c.stats("a")["dirty_bytes"] == 4096
    # Atomic saves leave dot files behind for a moment; they are never read.
    assert not [n for n in names(breqd) if n.startswith(".")]


def test_a_default_chunk_size_applies_when_the_file_has_none(breqd):
    write_atomic(toml_path(breqd, "d"), device_toml("d", "1G", None, ID_A))
    wait_tracked(breqd, "d")
    assert stats(breqd, "d")["chunk_size"] == 65536


def test_removing_the_file_stops_tracking_and_keeps_the_bitmap(breqd):
    write_atomic(toml_path(breqd, "a"), device_toml("a", SIZE, CHUNK, ID_A))
    write_atomic(toml_path(breqd, "b"), device_toml("b", SIZE, CHUNK, ID_B))
    wait_tracked(breqd, "a")
    wait_tracked(breqd, "b")
    log = Log(breqd)
    os.unlink(toml_path(breqd, "a"))
    wait_tracked(breqd, "a", tracked=False)
    assert names(breqd) == ["b"]
    assert os.path.exists(bitmap_path(breqd, "a"))
    log.wait_for("a: no longer tracked", bitmap_path(breqd, "a"))
    with client(breqd.control) as c:
        with pytest.raises(UnknownDevice):
            c.mark("a", [(0, 4096)])
        c.mark("b", [(0, 4096)])   # the same connection goes on
    alive(breqd)


@pytest.mark.parametrize("change", ["size", "chunk_size", "device_id"])
@pytest.mark.parametrize("write", [write_atomic, write_plain], ids=["atomic", "plain"])
def test_a_changed_definition_is_refused_and_the_old_one_stays(breqd, change, write):
    path = toml_path(breqd, "a")
    write_atomic(path, device_toml("a", SIZE, CHUNK, ID_A))
    wait_tracked(breqd, "a")
    with client(breqd.control) as c:
        c.clear_all("a", force=True)
        c.mark("a", [(0, 4096), (SIZE - 4096, 4096)])
        before = c.stats("a")
    new = {"size": SIZE, "chunk_size": CHUNK, "device_id": ID_A}
    new[change] = {"size": 2 * SIZE, "chunk_size": 65536, "device_id": ID_B}[change]
    log = Log(breqd)
    write(path, device_toml("a", new["size"], new["chunk_size"], new["device_id"]))
    text = log.wait_for("change refused")
    assert f"a.toml: change refused ({change} " in text, text
    assert "previous definition stays in force" in text
    after = stats(breqd, "a")
    for key in ("size", "chunk_size", "device_id", "dirty_bytes", "state_file"):
        assert after[key] == before[key], key
    with client(breqd.control) as c:
        c.mark("a", [(4096, 4096)])   # still tracked under the old definition
        assert c.stats("a")["dirty_bytes"] == before["dirty_bytes"] + 4096
    # Only once: an unrelated change in the directory does not repeat the complaint.
    log.mark()
    write_atomic(toml_path(breqd, "b"), device_toml("b", SIZE, CHUNK, ID_B))
    wait_tracked(breqd, "b")
    assert "change refused" not in log.new()
    # At the next start the file rules, and the bitmap no longer matches it: everything
    # is dirty (invariant 4), the old bitmap is kept aside.
    breqd.stop()
    breqd.restart()
    s = stats(breqd, "a")
    assert s[change] == new[change]
    assert s["dirty_bytes"] == s["size"]
    assert s["recovered"] and s["recovered"] != "no saved bitmap"
    assert glob.glob(bitmap_path(breqd, "a") + ".bad-*")


BAD_FILES = [
    ("not-toml", 'name = "x\nsize = [', "not valid TOML"),
    ("missing-size", 'name = "x"\ndevice_id = "00000000000000a1"\n', "missing key 'size'"),
    ("missing-id", 'name = "x"\nsize = 4096\n', "missing key 'device_id'"),
    ("bad-id", 'name = "x"\nsize = 4096\ndevice_id = "xyz"\n', "device_id"),
    ("zero-id", 'name = "x"\nsize = 4096\ndevice_id = "0000000000000000"\n', "device_id"),
    ("bad-size", 'name = "x"\nsize = "ten"\ndevice_id = "00000000000000a1"\n',
     "size: expected a size"),
    ("zero-size", 'name = "x"\nsize = 0\ndevice_id = "00000000000000a1"\n',
     "size: expected a size from 1 "),
    ("bad-chunk", 'name = "x"\nsize = 4096\nchunk_size = 3000\n'
                  'device_id = "00000000000000a1"\n', "power of two"),
    ("bad-name", 'name = "x y"\nsize = 4096\ndevice_id = "00000000000000a1"\n',
     "name: expected a device name"),
    ("binary", "\udcff\udcfe", "cannot be read"),
    ("empty", "", "missing key 'name'"),
]


@pytest.mark.parametrize("text,words", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_a_bad_file_is_reported_and_hurts_nothing(breqd, text, words):
    write_atomic(toml_path(breqd, "good"), device_toml("good", SIZE, CHUNK, ID_A))
    wait_tracked(breqd, "good")
    log = Log(breqd)
    path = toml_path(breqd, "x")
    with open(path, "w", errors="surrogateescape") as f:
        f.write(text)
    logged = log.wait_for(path, words)
    assert "Traceback" not in logged
    alive(breqd)
    assert names(breqd) == ["good"]
    with client(breqd.control) as c:
        c.mark("good", [(0, 4096)])
    # Fixed, it is picked up.
    write_atomic(path, device_toml("x", SIZE, CHUNK, ID_B))
    wait_tracked(breqd, "x")
    assert names(breqd) == ["good", "x"]


def test_a_tracked_device_whose_file_turns_bad_stays_tracked(breqd):
    path = toml_path(breqd, "a")
    write_atomic(path, device_toml("a", SIZE, CHUNK, ID_A))
    wait_tracked(breqd, "a")
    log = Log(breqd)
    write_plain(path, "name = [\n")
    text = log.wait_for("not valid TOML", "(the previous definition stays in force)")
    assert "Traceback" not in text
    assert names(breqd) == ["a"]
    assert stats(breqd, "a")["size"] == SIZE
    # Repaired with the same definition: nothing to refuse, nothing to log.
    log.mark()
    write_atomic(path, device_toml("a", SIZE, CHUNK, ID_A))
    write_atomic(toml_path(breqd, "b"), device_toml("b", SIZE, CHUNK, ID_B))
    wait_tracked(breqd, "b")
    assert "refused" not in log.new() and "ERROR" not in log.new()
    assert stats(breqd, "a")["recovered"] == "no saved bitmap"   # the same device object


def test_a_file_whose_name_does_not_match_is_refused(breqd):
    log = Log(breqd)
    path = toml_path(breqd, "left")
    write_atomic(path, device_toml("right", SIZE, CHUNK, ID_A))
    text = log.wait_for(path, "does not match the file name")
    assert "'right'" in text
    assert names(breqd) == []
    # Files that are not *.toml, and dot files, are not definitions at all.
    log.mark()
    write_atomic(os.path.join(breqd.config_dir, "notes.txt"), "hello\n")
    write_atomic(os.path.join(breqd.config_dir, ".c.toml"), device_toml(".c", SIZE))
    write_atomic(toml_path(breqd, "ok"), device_toml("ok", SIZE, CHUNK, ID_B))
    wait_tracked(breqd, "ok")
    assert names(breqd) == ["ok"]
    assert "notes.txt" not in log.new() and ".c.toml" not in log.new()


def test_sighup_reads_the_directory_again(breqd):
    write_atomic(toml_path(breqd, "a"), device_toml("a", SIZE, CHUNK, ID_A))
    wait_tracked(breqd, "a")
    log = Log(breqd)
    breqd.daemon.proc.send_signal(signal.SIGHUP)
    write_atomic(toml_path(breqd, "b"), device_toml("b", SIZE, CHUNK, ID_B))
    wait_tracked(breqd, "b")
    alive(breqd)
    assert "Traceback" not in log.new()


# -- removed and restored: the saved bitmap comes back ---------------------------------

def test_restoring_a_removed_file_keeps_its_bitmap(breqd):
    path = toml_path(breqd, "a")
    text = device_toml("a", SIZE, CHUNK, ID_A)
    write_atomic(path, text)
    wait_tracked(breqd, "a")
    marked = [(0, 4096), (5 * MiB + 100, 4096), (SIZE - 4096, 4096)]
    with client(breqd.control) as c:
        c.clear_all("a", force=True)
        c.mark("a", marked)
        dirty_before = c.stats("a")["dirty_bytes"]
        sender = client(breqd.control)
        held = sender.checkout("a", 4096)   # in flight when the device goes
        assert held
    try:
        os.unlink(path)
        wait_tracked(breqd, "a", tracked=False)
        with pytest.raises(UnknownDevice):
            sender.commit("a", held)        # its checkouts went with the device
    finally:
        sender.close()
    write_plain(path, text)
    wait_tracked(breqd, "a")
    s = stats(breqd, "a")
    assert s["recovered"] is None, s
    assert s["dirty_bytes"] == dirty_before and s["inflight_bytes"] == 0
    with client(breqd.control) as c:
        assert dirty_chunks(c, "a") == {0, (5 * MiB + 100) // CHUNK,
                                        (5 * MiB + 100 + 4095) // CHUNK, SIZE // CHUNK - 1}


def test_restoring_with_another_device_id_starts_all_dirty(breqd):
    path = toml_path(breqd, "a")
    write_atomic(path, device_toml("a", SIZE, CHUNK, ID_A))
    wait_tracked(breqd, "a")
    with client(breqd.control) as c:
        c.clear_all("a", force=True)
    os.unlink(path)
    wait_tracked(breqd, "a", tracked=False)
    log = Log(breqd)
    write_atomic(path, device_toml("a", SIZE, CHUNK, ID_B))
    wait_tracked(breqd, "a")
    s = stats(breqd, "a")
    assert s["dirty_bytes"] == SIZE, s           # never the other device's empty bitmap
    assert "device id" in s["recovered"], s
    assert glob.glob(bitmap_path(breqd, "a") + ".bad-*")
    assert "not trusted" in log.wait_for("a: saved bitmap not trusted")


# -- bmigrate track ------------------------------------------------------------------

def test_track_add_list_status_remove_through_the_cli(breqd):
    ctl = breqd.control
    added = bmigrate(ctl, "track", "add", "vm1", "--size", "16M", "--chunk-size", "4K",
                     "--json")
    assert added.returncode == 0, added
    assert added.stderr == ""
    doc = json.loads(added.stdout)
    assert doc["name"] == "vm1" and doc["size"] == SIZE and doc["chunk_size"] == CHUNK
    assert doc["dirty_bytes"] == SIZE and len(doc["device_id"]) == 16
    with open(toml_path(breqd, "vm1"), "rb") as f:
        assert doc["device_id"] in f.read().decode()
    human = bmigrate(ctl, "track", "add", "vm2", "--size", "1G")
    assert human.returncode == 0, human
    assert human.stdout.startswith("tracking vm2: 1.0 GiB in 64.0 KiB chunks, device id ")

    listed = bmigrate(ctl, "track", "list", "--json")
    assert listed.returncode == 0 and json.loads(listed.stdout) == ["vm1", "vm2"]
    assert bmigrate(ctl, "track", "list").stdout.split() == ["vm1", "vm2"]

    one = bmigrate(ctl, "track", "status", "vm1", "--json")
    assert one.returncode == 0, one
    shown = json.loads(one.stdout)
    assert shown.pop("intercept") is None         # tracked through bmig-nbd, no dm-era
    assert shown == stats(breqd, "vm1")
    every = bmigrate(ctl, "track", "status", "--json")
    assert [d["name"] for d in json.loads(every.stdout)] == ["vm1", "vm2"]
    table = bmigrate(ctl, "track", "status")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split()[:2] == ["NAME", "SIZE"]

    removed = bmigrate(ctl, "track", "remove", "vm1")
    assert removed.returncode == 0, removed
    assert removed.stdout.strip() == \
        f"stopped tracking vm1; bitmap kept in {bitmap_path(breqd, 'vm1')}"
    assert not os.path.exists(toml_path(breqd, "vm1"))
    assert os.path.exists(bitmap_path(breqd, "vm1"))
    assert json.loads(bmigrate(ctl, "track", "list", "--json").stdout) == ["vm2"]


def test_track_add_size_of_a_file(breqd, tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(10 * MiB + 4096)
    done = bmigrate(breqd.control, "track", "add", "img", "--size-of", str(image), "--json")
    assert done.returncode == 0, done
    assert json.loads(done.stdout)["size"] == 10 * MiB + 4096


@pytest.mark.parametrize("args,code,words", [
    (["track", "add", "dup", "--size", "16M"], 5, "already defined"),
    (["track", "status", "nope"], 5, "no tracked device named 'nope'"),
    (["track", "remove", "nope"], 5, "no tracked device named 'nope'"),
    (["track", "add", "bad name", "--size", "16M"], 3, "invalid"),
    (["track", "add", "new", "--size", "16M", "--chunk-size", "3000"], 3, "power of two"),
    (["track", "add", "new"], 3, "--size"),
    (["track", "add", "new", "--size-of", "/nonexistent/disk"], 3, "cannot open"),
    (["track", "clear", "dup"], 5, "force"),
], ids=["duplicate", "status-unknown", "remove-unknown", "bad-name", "bad-chunk", "no-size",
        "size-of-missing", "clear-without-force"])
def test_cli_errors_are_one_line_with_their_exit_code(breqd, args, code, words):
    first = bmigrate(breqd.control, "track", "add", "dup", "--size", "16M")
    assert first.returncode == 0, first
    result = bmigrate(breqd.control, *args)
    assert result.returncode == code, result
    assert words in one_line_error(result)
    assert result.stdout == ""
    assert names(breqd) == ["dup"]
    alive(breqd)


def test_cli_without_breqd_exits_4_with_one_line(tmp_path, breqd):
    missing = bmigrate(str(tmp_path / "no.sock"), "track", "list")
    assert missing.returncode == 4, missing
    assert "cannot reach breqd" in one_line_error(missing)
    # A socket file left behind by a breqd that died: nobody answers.
    breqd.daemon.kill9()
    stale = bmigrate(breqd.control, "track", "status", "--json")
    assert stale.returncode == 4, stale
    assert "cannot reach breqd" in one_line_error(stale)
    error, = [json.loads(line) for line in stale.stdout.splitlines()]   # --json: an event
    assert error["event"] == "error" and error["exit_code"] == 4, error
    assert "cannot reach breqd" in error["message"] and error["time"] > 0


def test_cli_remove_then_restore_the_file_keeps_the_bitmap(breqd):
    assert bmigrate(breqd.control, "track", "add", "vm", "--size", "16M",
                    "--chunk-size", "4K").returncode == 0
    with open(toml_path(breqd, "vm")) as f:
        text = f.read()
    with client(breqd.control) as c:
        c.clear_all("vm", force=True)
        c.mark("vm", [(8 * MiB, 4096)])
    assert bmigrate(breqd.control, "track", "remove", "vm").returncode == 0
    assert names(breqd) == []
    write_atomic(toml_path(breqd, "vm"), text)
    wait_tracked(breqd, "vm")
    with client(breqd.control) as c:
        assert c.stats("vm")["recovered"] is None
        assert dirty_chunks(c, "vm") == {8 * MiB // CHUNK}


# -- bugs ----------------------------------------------------------------------------

def test_track_remove_has_json_output(breqd):
    assert bmigrate(breqd.control, "track", "add", "vm", "--size", "16M").returncode == 0
    removed = bmigrate(breqd.control, "track", "remove", "vm", "--json")
    assert removed.returncode == 0, removed
    doc = json.loads(removed.stdout)
    assert doc["state_file"] == bitmap_path(breqd, "vm")


def test_a_name_with_a_trailing_newline_is_refused(breqd):
    with client(breqd.control) as c:
        with pytest.raises(BmigError) as refused:
            c.add_device("x\n", SIZE, CHUNK)
        assert refused.value.wire_code == "config"
        assert c.list_devices() == []   # the connection goes on
    assert os.listdir(breqd.config_dir) == []


def test_a_fifo_in_the_config_dir_does_not_block_breqd(breqd):
    fifo = toml_path(breqd, "fifo")
    os.mkfifo(fifo)
    try:
        write_atomic(toml_path(breqd, "b"), device_toml("b", SIZE, CHUNK, ID_B))

        def tracked() -> bool:
            with TrackerClient(breqd.control, timeout=3) as c:   # a hang fails the test
                return "b" in [d["name"] for d in c.list_devices()]
        wait_until(tracked, timeout=10, what="b to be tracked")
        alive(breqd)
    finally:
        try:   # let a breqd blocked in open() go on
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def _limited_breqd(root: str, config_dir: str) -> Daemon:
    """breqd with 8 GiB of address space, so a bitmap that cannot exist fails at once."""
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30)); "
            "from bmig.cli.breqd import main; main()")
    return Daemon([sys.executable, "-c", code, "--state-dir", os.path.join(root, "state"),
                   "--config-dir", config_dir, "--control", os.path.join(root, "breqd.sock"),
                   "--log-level", "debug"], os.path.join(root, "breqd.log"))


def test_a_device_too_big_for_memory_is_refused_and_breqd_still_starts(tmp_path, daemons):
    root = str(tmp_path)
    config_dir = os.path.join(root, "devices.d")
    daemon = daemons.start(_limited_breqd(root, config_dir))
    control = os.path.join(root, "breqd.sock")
    with client(control) as c:
        add_clean_device(c, "small", SIZE, CHUNK)
        with pytest.raises(BmigError) as refused:
            c.add_device("huge", 1 << 60, 4096)      # 2^48 bits: 32 TiB of bitmap
    error = refused.value
    daemon = daemons.restart(daemon)                 # breqd must come back
    with client(control) as c:
        assert [d["name"] for d in c.list_devices()] == ["small"]
    assert not isinstance(error, UnreachableError), error   # an answer, not a hang-up
    assert error.wire_code in ("config", "state"), error
    assert not os.path.exists(os.path.join(config_dir, "huge.toml"))


def test_a_definition_too_big_for_memory_does_not_stop_breqd(tmp_path, daemons):
    root = str(tmp_path)
    config_dir = os.path.join(root, "devices.d")
    os.makedirs(config_dir)
    write_atomic(os.path.join(config_dir, "huge.toml"), device_toml("huge", "1P", "4K", ID_A))
    write_atomic(os.path.join(config_dir, "small.toml"), device_toml("small", SIZE, CHUNK, ID_B))
    daemons.start(_limited_breqd(root, config_dir))
    with client(os.path.join(root, "breqd.sock")) as c:
        assert [d["name"] for d in c.list_devices()] == ["small"]


def test_an_adopted_clean_device_does_not_claim_its_bitmap_was_missing(breqd):
    """``track add --adopt`` starts clean on purpose: ``recovered`` stays null (it says
    why chunks were set dirty, and none were); a plain new device says why it is dirty."""
    with client(breqd.control) as c:
        adopted = c.add_device("adopted", SIZE, chunk_size=CHUNK,
                               lineage={"generation": "00000000000000a1", "previous": []},
                               clean=True)
        assert adopted["dirty_bytes"] == 0 and adopted["recovered"] is None, adopted
        assert c.stats("adopted")["recovered"] is None
        fresh = c.add_device("fresh", SIZE, chunk_size=CHUNK)
        assert fresh["dirty_bytes"] == SIZE and fresh["recovered"] == "no saved bitmap"
