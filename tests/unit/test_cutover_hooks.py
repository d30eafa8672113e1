"""The cutover's hooks (bmig/sender/hooks.py), run for real with /bin/sh.

- Every line of the hook's stdout and stderr reaches the callback, none reaches our
  stdout; a line longer than MAX_HOOK_LINE comes in pieces of that size.
- A failing hook says its exit status; one that outlives its timeout is killed with
  everything it started.
- A hook that leaves a process running in the background with our pipes open does not
  hold the cutover up.
- ``problem`` finds a syntax error, a command that does not exist and a file that is
  not executable, and runs nothing.
"""

from __future__ import annotations

import os
import time

import pytest

from bmig.errors import HookFailed
from bmig.limits import MAX_HOOK_LINE
from bmig.sender.hooks import OUTPUT_GRACE, problem, run_hook
from tests.daemon import alive, wait_until

ENV = dict(os.environ)


def collect(command: str, timeout: float = 30.0) -> list[tuple[str, str]]:
    lines: list[tuple[str, str]] = []
    run_hook(command, ENV, timeout, lambda stream, line: lines.append((stream, line)))
    return lines


def test_every_line_of_both_streams_goes_to_the_callback(capfd):
    lines = collect("echo one; echo two >&2; printf 'three'; echo; printf 'no newline'")
    assert [l for s, l in lines if s == "stdout"] == ["one", "three", "no newline"]
    assert [l for s, l in lines if s == "stderr"] == ["two"]
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_a_long_line_comes_in_pieces():
    lines = collect(f"head -c {2 * MAX_HOOK_LINE + 10} /dev/zero | tr '\\\\0' x; echo")
    assert [len(l) for _, l in lines] == [MAX_HOOK_LINE, MAX_HOOK_LINE, 10]


def test_a_failing_hook_says_its_exit_status():
    with pytest.raises(HookFailed, match="failed with exit status 7"):
        collect("echo trying; exit 7")


def test_a_hook_past_its_timeout_is_killed_with_its_children(tmp_path):
    pids = tmp_path / "pids"
    started = time.monotonic()
    with pytest.raises(HookFailed, match="did not finish within 1 s"):
        collect(f"sleep 300 & echo $! > {pids}; sleep 300", timeout=1)
    assert time.monotonic() - started < 10
    child = int(pids.read_text())
    wait_until(lambda: not alive(child), timeout=10,
               what="the hook's background child to be killed with its group")


def test_a_background_process_holding_the_pipes_does_not_hold_the_cutover_up(tmp_path):
    pids = tmp_path / "pids"
    started = time.monotonic()
    try:
        lines = collect(f"sleep 60 & echo $! > {pids}; echo started")
        assert lines == [("stdout", "started")]
        assert time.monotonic() - started < OUTPUT_GRACE + 5
    finally:
        if pids.exists():
            try:
                os.kill(int(pids.read_text()), 9)
            except ProcessLookupError:
                pass


def test_problem_finds_what_would_not_run(tmp_path):
    ran = tmp_path / "ran"
    script = tmp_path / "stop-vm"
    script.write_text(f"#!/bin/sh\ntouch {ran}\n")
    assert problem(f"touch {ran}") is None
    assert problem(f"FOO=1 {script}") == f"{script} is not executable"
    script.chmod(0o755)
    assert problem(f"FOO=1 {script} --now") is None
    assert problem("virsh-that-is-not-here shutdown vm1") == \
        "virsh-that-is-not-here: command not found"
    assert problem(str(tmp_path / "missing")) == f"{tmp_path / 'missing'}: no such file"
    assert problem("if then fi (").startswith("shell syntax error")
    assert problem("echo 'unclosed").startswith("cannot be parsed")
    assert problem("cd /tmp && true") is None                  # builtins count
    assert problem("  ") == "the hook is empty"
    assert not ran.exists()
