"""The cutover's hooks: shell commands that stop and start the application.

A hook runs as ``sh -c CMD`` in a process group of its own, with no standard input. Its
standard output and error never reach bmigrate's standard output (which carries only
results, or only JSON with --json): every line of either is handed to ``output`` (the
cutover reports it as a ``hook-output`` event; the text report writes it to stderr).
Lines longer than MAX_HOOK_LINE are cut into pieces of that size, so what a hook prints
costs a bounded amount of memory however it prints it. A hook that outlives its timeout
is killed with its whole process group. When the shell has exited, output still coming
from a process the hook left running in the background is read for OUTPUT_GRACE seconds
more, then no longer waited for.

``problem`` tells, without running anything, why a hook could not run (for
``cutover --check``): a shell syntax error, or a first word that is neither a shell
builtin nor an executable file.
"""

from __future__ import annotations

import os
import re
import selectors
import shlex
import signal
import subprocess
import time
from typing import Callable

from bmig.errors import HookFailed
from bmig.limits import MAX_HOOK_LINE

OUTPUT_GRACE = 1.0          # seconds to read the pipes after the shell has exited
POLL = 0.1                  # seconds between looks at the shell while it prints nothing
CHECK_TIMEOUT = 10.0        # sh -n and command -v
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def run_hook(command: str, env: dict[str, str], timeout: float,
             output: Callable[[str, str], None]) -> None:
    """Run ``command``; ``output(stream, line)`` for each line it prints ("stdout" or
    "stderr"). HookFailed if it fails or does not finish within ``timeout`` seconds."""
    proc = subprocess.Popen(["/bin/sh", "-c", command], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _pump(proc, time.monotonic() + timeout, output)
    except HookFailed:
        _kill(proc)
        raise HookFailed(f"hook {command!r} did not finish within {timeout:g} s") from None
    except BaseException:
        _kill(proc)
        raise
    finally:
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
    if proc.returncode != 0:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"failed with exit status {proc.returncode}")
        raise HookFailed(f"hook {command!r} {how}")


def _pump(proc: subprocess.Popen, deadline: float,
          output: Callable[[str, str], None]) -> None:
    """Read both pipes line by line until the shell has exited and they are done (or
    OUTPUT_GRACE has passed since); HookFailed (with no message) at ``deadline``."""
    selector = selectors.DefaultSelector()
    pending: dict[str, bytearray] = {}
    for pipe, name in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
        assert pipe is not None
        os.set_blocking(pipe.fileno(), False)
        selector.register(pipe, selectors.EVENT_READ, name)
        pending[name] = bytearray()
    exited: float | None = None
    try:
        while selector.get_map():
            now = time.monotonic()
            if exited is None and proc.poll() is not None:
                exited = now
            if exited is not None and now - exited > OUTPUT_GRACE:
                break
            if now >= deadline:
                raise HookFailed()
            for key, _ in selector.select(min(POLL, deadline - now)):
                name = key.data
                try:
                    chunk = os.read(key.fd, 65536)
                except BlockingIOError:
                    continue
                if not chunk:
                    selector.unregister(key.fileobj)
                    continue
                _lines(pending[name], chunk, lambda line: output(name, line))
    finally:
        selector.close()
    for name, rest in pending.items():
        if rest:
            output(name, rest.decode(errors="replace"))
    left = deadline - time.monotonic()
    try:
        proc.wait(max(left, 0.001))
    except subprocess.TimeoutExpired:
        raise HookFailed() from None


def _lines(buffer: bytearray, chunk: bytes, emit: Callable[[str], None]) -> None:
    """Add ``chunk`` to ``buffer``; emit every whole line, and pieces of MAX_HOOK_LINE
    bytes of a line longer than that."""
    buffer += chunk
    while True:
        end = buffer.find(b"\n", 0, MAX_HOOK_LINE + 1)
        if end >= 0:
            emit(bytes(buffer[:end]).decode(errors="replace").rstrip("\r"))
            del buffer[:end + 1]
        elif len(buffer) >= MAX_HOOK_LINE:
            emit(bytes(buffer[:MAX_HOOK_LINE]).decode(errors="replace"))
            del buffer[:MAX_HOOK_LINE]
        else:
            return


def _kill(proc: subprocess.Popen) -> None:
    """The hook and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def problem(command: str, env: dict[str, str] | None = None) -> str | None:
    """Why ``command`` could not run as a hook, or None: its shell syntax is checked
    (``sh -n``) and its first word looked up as the shell would (``command -v``).
    Nothing of it runs."""
    if not command.strip():
        return "the hook is empty"
    try:
        words = shlex.split(command, comments=True)
    except ValueError as exc:
        return f"cannot be parsed: {exc}"
    env = dict(os.environ if env is None else env)
    try:
        syntax = subprocess.run(["/bin/sh", "-n", "-c", command], env=env,
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=CHECK_TIMEOUT)
        if syntax.returncode != 0:
            detail = syntax.stderr.strip().splitlines()
            return "shell syntax error" + (f": {detail[-1]}" if detail else "")
        program = next((w for w in words if not _ASSIGNMENT.match(w)), None)
        if program is None:
            return None                  # only variable assignments
        if "/" in program:
            if not os.path.isfile(program):
                return f"{program}: no such file"
            return None if os.access(program, os.X_OK) else f"{program} is not executable"
        found = subprocess.run(["/bin/sh", "-c", 'command -v -- "$1"', "sh", program],
                               env=env, stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, timeout=CHECK_TIMEOUT)
    except subprocess.TimeoutExpired:
        return "the shell did not answer"
    if found.returncode != 0:
        return f"{program}: command not found"
    return None
