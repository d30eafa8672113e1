"""Syslog priorities on stderr only when stderr is the journal stream JOURNAL_STREAM
names (its device and inode), as sd-daemon(3) describes; not merely because the
variable is set (a child with another stderr inherits it)."""

from __future__ import annotations

import logging
import os
import sys

import pytest

from bmig import log as bmig_log
from bmig.log import NOTICE


def stream_id(path) -> str:
    st = os.stat(path)
    return f"{st.st_dev}:{st.st_ino}"


@pytest.fixture
def stderr_file(tmp_path, monkeypatch):
    """A file for sys.stderr (the "journal" when JOURNAL_STREAM says so); ``logged``
    puts it in place (pytest's capture puts its own back for the test's call), and
    logging is put back afterwards."""
    path = tmp_path / "stderr"
    f = open(path, "w")
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    yield path, f
    root.handlers[:], level = saved
    root.setLevel(level)
    f.close()


def setup(f, level: str) -> None:
    saved = sys.stderr
    sys.stderr = f
    try:
        bmig_log.setup(level)
    finally:
        sys.stderr = saved


def logged(path, f) -> list[str]:
    log = logging.getLogger("bmigrate")
    log.debug("a pass")
    log.info("a summary")
    log.log(NOTICE, "caught up")
    log.warning("receiver unreachable\nsecond line")
    log.error("failed")
    f.flush()
    return path.read_text().splitlines()


def test_priorities_when_stderr_is_the_journal_stream(stderr_file, monkeypatch):
    path, f = stderr_file
    monkeypatch.setenv("JOURNAL_STREAM", stream_id(path))
    assert bmig_log.is_journal(f)
    setup(f, "debug")
    assert logged(path, f) == ["<7>a pass", "<6>a summary", "<5>caught up",
                               "<4>receiver unreachable", "<4>second line", "<3>failed"]
    monkeypatch.setattr(sys, "stderr", f)
    assert bmig_log.error_line("bmigrate: no tracked device named 'x'") == \
        "<3>bmigrate: no tracked device named 'x'"


@pytest.mark.parametrize("value", [None, "another", "garbage", "12:", ":34", "1:2:3"])
def test_no_priorities_unless_the_stream_is_stderr(stderr_file, tmp_path, monkeypatch,
                                                   value):
    path, f = stderr_file
    if value is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    elif value == "another":
        other = tmp_path / "other"
        other.write_text("")
        monkeypatch.setenv("JOURNAL_STREAM", stream_id(other))
    else:
        monkeypatch.setenv("JOURNAL_STREAM", value)
    assert not bmig_log.is_journal(f)
    setup(f, "info")
    assert logged(path, f) == ["bmigrate: INFO: a summary", "bmigrate: NOTICE: caught up",
                               "bmigrate: WARNING: receiver unreachable", "second line",
                               "bmigrate: ERROR: failed"]
    monkeypatch.setattr(sys, "stderr", f)
    assert bmig_log.error_line("bmigrate: oops") == "bmigrate: oops"


def test_the_same_inode_on_another_device_is_not_the_journal(stderr_file, monkeypatch):
    path, f = stderr_file
    st = os.stat(path)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev + 1}:{st.st_ino}")
    assert not bmig_log.is_journal(f)
    monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
    assert bmig_log.is_journal(f)


def test_notice_sits_between_info_and_warning(stderr_file, monkeypatch):
    path, f = stderr_file
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    setup(f, "warning")
    assert logged(path, f)[0].startswith("bmigrate: WARNING")   # no notice at warning
    assert bmig_log.priority(NOTICE) == 5 and bmig_log.priority(logging.INFO) == 6
    assert bmig_log.priority(logging.INFO + 1) == 6 and bmig_log.priority(100) == 2
