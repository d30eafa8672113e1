"""The demo's story: its steps in order, the daemons they start, what it says when a
step fails, and the cleanup that stops everything it started, whatever happens.

1. the source image; 2. breqd, bmig-nbd and breceive; 3. the writer; 4. a live
``bmigrate sync``; 5. the writer stops and a last pass ships the rest; 6. the copy is
compared; 7. the summary; 8. cleanup. The daemons run the installed commands in process
groups of their own, each ready when it says READY=1 on a notify socket of ours
(bmig/processes.py); the steps talk to them only through their command lines, sockets
and the NBD export.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
import traceback
from typing import Any

from bmig.cli.common import human_bytes
from bmig.constants import MiB
from bmig.demo.image import WORKLOAD_FILE, Image, build_ext4, build_mixed, fsck, sha256, tool
from bmig.demo.output import Out, reason, tail
from bmig.demo.settings import (DEVICE, START_TIMEOUT, STEPS, STOP_TIMEOUT, SYNC_STOP_TIMEOUT,
                                DemoError, Profile, bin_dir, parse_args, profile)
from bmig.demo.sync import SyncRun, sync_json, sync_text
from bmig.demo.workload import Writer
from bmig.processes import CHILDREN, Child, Group, NotReady, Stopped, child_env
from bmig.processes import run as run_child


def program(name: str) -> list[str]:
    """The argv that runs one of bmig's commands: the venv's script, else the module."""
    script = os.path.join(bin_dir(), name)
    if os.access(script, os.X_OK):
        return [script]
    module = {"bmigrate": "main", "breqd": "breqd", "bmig-nbd": "nbd",
              "breceive": "breceive"}[name]
    return [sys.executable, "-c", f"from bmig.cli.{module} import main; main()"]


class Demo:
    """The steps, the processes they start, and stopping them whatever happens."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Out(sys.stderr if args.json else sys.stdout)
        self.workdir = ""
        self.daemons: list[Child] = []
        self.writer: Writer | None = None
        self.result: dict[str, Any] = {}
        self.started = time.monotonic()

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    # -- running -----------------------------------------------------------------------

    def run(self) -> int:
        CHILDREN.install_signal_handlers()
        status, failure = 1, ""
        try:
            p = profile(self.args.size, self.args.quick)
            self.workdir = tempfile.mkdtemp(prefix="bmig-demo-")
            self.out.line(f"bmig demo: a live migration on this machine, in {self.workdir}"
                          f"{' (kept)' if self.args.keep else ''}")
            self.result = {"workdir": self.workdir, "kept": self.args.keep}
            if self.steps(p):
                status = 0
            else:
                failure = self.failure(DemoError(
                    "the target differs from the source" if self.result.get("source_sha256")
                    != self.result.get("target_sha256") else "e2fsck found errors on the target"))
        except DemoError as exc:
            failure = self.failure(exc)
        except (KeyboardInterrupt, Stopped):
            self.out.line("\ndemo interrupted; stopping what it started")
            self.result["error"] = "interrupted"
            status = 130
        except Exception as exc:                        # a bug: say where
            traceback.print_exc()
            failure = self.failure(DemoError(f"unexpected error: {reason(exc)}"))
        finally:
            self.cleanup()
        if failure:                                     # last, where it is seen
            sys.stderr.write(failure)
            sys.stderr.flush()
        if self.args.json:
            identical = status == 0 and bool(self.result.get("identical"))
            print(json.dumps({**self.result, "identical": identical}, sort_keys=True))
        return status

    def steps(self, p: Profile) -> bool:
        image = self.make_image(p)
        url, secret = self.start_daemons(image)
        uri = f"nbd+unix:///{DEVICE}?socket={self.path('run', 'src.nbd')}"
        self.start_writer(uri, image, p)
        live = self.live_sync(image, url, secret, p)
        last = self.last_pass(image, url, secret, p)
        identical = self.check_copy(image)
        self.summarize(image, [live, last], identical)
        return identical

    # -- steps ---------------------------------------------------------------------------

    def make_image(self, p: Profile) -> Image:
        self.out.step(1, f"The source device: an image of {human_bytes(p.size)}")
        os.makedirs(self.path("run"))
        os.makedirs(self.path("logs"))
        self._check_room(p)
        path = self.path("source.img")
        if tool("mkfs.ext4") and tool("debugfs"):
            image = build_ext4(path, self.path("files"), p, self.out)
            self.out.detail(f"{path}: ext4, {image.files} files, "
                            f"{human_bytes(image.file_bytes)} of data")
        else:
            self.out.detail("mkfs.ext4 or debugfs is missing (Debian package e2fsprogs): "
                            "using a file of mixed data instead of a file system")
            image = build_mixed(path, p.size)
            self.out.detail(f"{path}: random data, text, zeros and holes")
        self.result["image"] = {"path": path, "size": image.size, "kind": image.kind,
                                "files": image.files, "file_bytes": image.file_bytes}
        return image

    def _check_room(self, p: Profile) -> None:
        need = 3 * (p.file_budget + p.workload) + 64 * MiB
        free = shutil.disk_usage(self.workdir).free
        if free < need:
            raise DemoError(f"{self.workdir}: {human_bytes(free)} free, the demo needs about "
                            f"{human_bytes(need)} (give a smaller --size, or TMPDIR)")
        if len(self.path("run", "breqd.notify")) > 100:
            raise DemoError(f"{self.workdir} is too long a path for Unix sockets: set a "
                            "shorter TMPDIR")

    def start_daemons(self, image: Image) -> tuple[str, str]:
        self.out.step(2, "Daemons: breqd (dirty bitmap), bmig-nbd (the source, over NBD), "
                         "breceive (the target)")
        control = self.path("run", "breqd.sock")
        self.start("breqd", [*program("breqd"), "--state-dir", self.path("breqd", "state"),
                             "--config-dir", self.path("breqd", "devices.d"),
                             "--control", control])
        self.track(image, control)
        self.start("bmig-nbd", [*program("bmig-nbd"), "--device", DEVICE, "--backing",
                                image.path, "--unix", self.path("run", "src.nbd"),
                                "--control", control, "--manage-dir", self.path("run")])
        secret = self.make_secret()
        receiver = self.start("breceive", [
            *program("breceive"), "--listen", "127.0.0.1:0", "--target",
            f"{DEVICE}={self.path('target.img')}", "--state-dir",
            self.path("breceive", "state"), "--secret-file", secret])
        port = _port(receiver)
        self.out.detail(f"breceive listens on 127.0.0.1:{port}")
        return f"tcp://127.0.0.1:{port}/{DEVICE}", secret

    def start(self, name: str, argv: list[str]) -> Child:
        """A daemon in a process group of its own, ready when it says READY=1 on a notify
        socket of ours (in run/)."""
        daemon = Child(argv, name=name, log_path=self.path("logs", f"{name}.log"),
                       group=Group.OWN)
        self.daemons.append(daemon)
        self.out.command(argv)
        daemon.start(child_env(), notify=True, notify_dir=self.path("run"))
        try:
            daemon.wait_ready(START_TIMEOUT)
        except NotReady as exc:
            if exc.returncode is None:
                raise DemoError(f"{name} did not say READY=1 in {START_TIMEOUT:.0f} s",
                                daemon) from None
            raise DemoError(f"{name} exited with status {exc.returncode} before it was "
                            "ready", daemon) from None
        self.out.detail(f"{name} ready (pid {daemon.pid}, log {daemon.log_path})")
        return daemon

    def track(self, image: Image, control: str) -> None:
        argv = [*program("bmigrate"), "track", "add", DEVICE, "--size-of", image.path,
                "--control", control]
        self.out.command(argv)
        done = run_child(argv, timeout=60, env=child_env(), stop_timeout=STOP_TIMEOUT)
        if done.returncode != 0:
            raise DemoError(f"bmigrate track add failed with status {done.returncode}: "
                            f"{done.stderr.strip()}", self.daemons[0])
        self.out.detail(done.stdout.strip())

    def make_secret(self) -> str:
        path = self.path("secret")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        self.out.detail(f"shared secret: {path} (mode 0600)")
        return path

    def start_writer(self, uri: str, image: Image, p: Profile) -> None:
        self.out.step(3, "The application: a writer changing the device through bmig-nbd")
        where = (f"/{WORKLOAD_FILE} inside the file system" if image.kind == "ext4"
                 else "the whole device")
        self.out.detail(f"random 4 KiB-64 KiB writes to {where}, about "
                        f"{human_bytes(p.write_rate)}/s, on {uri}")
        self.writer = Writer(uri, image.extents, p.write_rate)
        self.writer.start()

    def sync_argv(self, image: Image, url: str, secret: str, *extra: str) -> list[str]:
        return [*program("bmigrate"), "sync", DEVICE, "--source", image.path, "--to", url,
                "--secret-file", secret, "--control", self.path("run", "breqd.sock"), *extra]

    def live_sync(self, image: Image, url: str, secret: str, p: Profile) -> SyncRun:
        self.out.step(4, "bmigrate sync while the writer keeps writing: passes until the "
                         "copy has converged")
        assert self.writer is not None
        argv = self.sync_argv(image, url, secret, "--bwlimit", p.bwlimit,
                              *(["--json"] if self.args.json else []))
        self.out.detail(f"--bwlimit {p.bwlimit}: as if over a {p.bwlimit}B/s link, so that "
                        "the passes can be watched")
        self.out.command(argv)
        before = (self.writer.writes, self.writer.bytes)
        log = self.path("logs", "bmigrate-sync-1.log")
        if self.args.json:
            run = sync_json(argv, log, self.out)
        else:
            run = sync_text(argv, log, self.out.stream)
        self.check_sync(run, "bmigrate sync", log, live=True)
        if not self.writer.is_alive():
            raise DemoError(f"the writer stopped during the sync: "
                            f"{reason(self.writer.error) if self.writer.error else 'no error'}",
                            self.daemon("bmig-nbd"))
        writes, written = self.writer.writes - before[0], self.writer.bytes - before[1]
        left = run.summary["dirty_bytes"] if run.summary else None
        self.out.detail(f"converged while the writer went on: {writes} writes "
                        f"({human_bytes(written)}) during the sync"
                        + (f", {human_bytes(left)} left dirty" if left is not None else ""))
        return run

    def last_pass(self, image: Image, url: str, secret: str, p: Profile) -> SyncRun:
        self.out.step(5, "The application stops; the last pass (--threshold 0) ships what "
                         "is left")
        assert self.writer is not None
        self.writer.finish()
        self.out.detail(f"writer stopped and flushed after {self.writer.writes} writes "
                        f"({human_bytes(self.writer.bytes)})")
        argv = self.sync_argv(image, url, secret, "--bwlimit", p.bwlimit, "--threshold", "0",
                              "--json")
        self.out.command(argv)
        log = self.path("logs", "bmigrate-sync-2.log")
        run = sync_json(argv, log, self.out)
        self.check_sync(run, "the last bmigrate sync", log)
        if not run.summary or run.summary.get("dirty_bytes") != 0:
            raise DemoError("the last pass left chunks dirty", log=tail(log))
        self.out.detail(f"{DEVICE}: converged, nothing dirty: "
                        f"{run.summary['passes']} pass(es) in {run.summary['seconds']:.1f} s")
        return run

    def check_sync(self, run: SyncRun, what: str, log: str, live: bool = False) -> None:
        """Exit 0: identical; 15 (``live``): converged while the writer goes on."""
        if run.status == 10:
            raise DemoError(f"{what} did not converge (exit 10): the writer outpaced it",
                            log=tail(log))
        if run.status not in ((0, 15) if live else (0,)):
            raise DemoError(f"{what} failed with status {run.status}", log=tail(log))
        if run.summary is not None and not run.summary.get("converged"):
            raise DemoError(f"{what} ended without converging", log=tail(log))

    def check_copy(self, image: Image) -> bool:
        self.out.step(6, "Stop bmig-nbd (it flushes), then compare the target with the source")
        status = self.daemon("bmig-nbd").stop(STOP_TIMEOUT)
        if status != 0:
            raise DemoError(f"bmig-nbd stopped with status {status}", self.daemon("bmig-nbd"))
        self.out.detail("bmig-nbd stopped cleanly")
        target = self.path("target.img")
        if not os.path.exists(target):
            raise DemoError("breceive wrote no target file", self.daemon("breceive"))
        sums = {"source": sha256(image.path), "target": sha256(target)}
        sizes = {"source": image.size, "target": os.path.getsize(target)}
        for name, path in (("source", image.path), ("target", target)):
            self.out.detail(f"{name}  sha256 {sums[name]}  {human_bytes(sizes[name])}  {path}")
        identical = sums["source"] == sums["target"] and sizes["source"] == sizes["target"]
        self.out.detail("identical" if identical else "THE TARGET DIFFERS FROM THE SOURCE")
        self.result.update(source_sha256=sums["source"], target_sha256=sums["target"])
        if image.kind == "ext4":
            clean, line = fsck(target)
            self.out.detail(f"e2fsck -fn target.img: {'clean' if clean else 'NOT CLEAN'}: {line}")
            self.result["fsck"] = "clean" if clean else line
            identical = identical and clean
        return identical

    def summarize(self, image: Image, runs: list[SyncRun], identical: bool) -> None:
        self.out.step(7, "Summary")
        totals = _totals(runs)
        assert self.writer is not None
        self.result.update(totals, writer={"writes": self.writer.writes,
                                           "bytes": self.writer.bytes},
                           syncs=[r.summary for r in runs], identical=identical,
                           seconds=round(time.monotonic() - self.started, 1),
                           verdict="target identical to source" if identical
                           else "target differs from source")
        ratio = totals["compression_ratio"]
        per_run = " + ".join(str(r.summary["passes"]) for r in runs if r.summary)
        last = runs[-1].summary or {}
        rows = [("device", f"{human_bytes(image.size)} {image.kind} image"),
                ("passes", f"{totals['passes']} ({per_run})"),
                ("bytes read", human_bytes(totals["bytes_read"])),
                ("bytes sent", human_bytes(totals["bytes_sent"])),
                ("compression", f"{ratio:.2f}x" if ratio else "none"),
                ("zero bytes", f"{human_bytes(totals['bytes_zero'])} (sent as ranges)"),
                ("sync time", f"{totals['sync_seconds']:.1f} s, of which the last pass "
                              f"{last.get('seconds', 0):.1f} s with the writer stopped "
                              f"(demo: {self.result['seconds']:.0f} s)"),
                ("writer", f"{self.writer.writes} writes, {human_bytes(self.writer.bytes)}"),
                ("verdict", self.result["verdict"])]
        if not all(r.exact for r in runs):
            rows.insert(-1, ("note", "the first sync's byte counts are read from its text "
                                     "summary, rounded as printed"))
        for label, value in rows:
            self.out.detail(f"{label:<12} {value}")

    # -- failures and cleanup --------------------------------------------------------------

    def daemon(self, name: str) -> Child:
        return next(d for d in self.daemons if d.name == name)

    def failure(self, exc: DemoError) -> str:
        """One clear line, then the log that explains it (read now: cleanup removes it)."""
        failed = exc.daemon or next((d for d in self.daemons if d.proc is not None
                                     and d.proc.poll() not in (None, 0)), None)
        text = f"\nbmig demo failed: {exc}\n"
        if exc.log:
            text += exc.log.rstrip() + "\n"
        if failed is not None:
            where = failed.log_path if self.args.keep else "--keep keeps it"
            text += (f"--- the last lines of {failed.name}'s log ({where}) ---\n"
                     f"{tail(failed.log_path).rstrip()}\n")
        self.result.update(error=str(exc), identical=False)
        return text

    def cleanup(self) -> None:
        """Stop the writer and every daemon (SIGTERM, SIGKILL after a while); remove the
        directory unless --keep. Signals wait until it is done."""
        CHILDREN.ignore_signals()
        if not self.workdir:
            return
        self.out.step(STEPS, "Stopping everything the demo started")
        if self.writer is not None and self.writer.is_alive():
            self.writer.halt.set()
            self.writer.join(timeout=STOP_TIMEOUT)
        for daemon in reversed(self.daemons):
            if daemon.running():
                self.out.detail(f"{daemon.name}: stopped, status "
                                f"{daemon.stop(STOP_TIMEOUT)}")
        CHILDREN.stop_all(SYNC_STOP_TIMEOUT)            # anything else still running
        if self.workdir and not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.out.detail(f"removed {self.workdir}")
        elif self.workdir:
            self.out.detail(f"kept {self.workdir} (images, state and logs)")


def _port(receiver: Child) -> int:
    for status in receiver.status_lines():
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", status)
        if match:
            return int(match[1])
    raise DemoError(f"breceive did not say its port (STATUS: {receiver.status_lines()})",
                    receiver)


def _totals(runs: list[SyncRun]) -> dict[str, Any]:
    summaries = [r.summary for r in runs if r.summary]
    total: dict[str, Any] = {key: sum(int(s.get(key, 0)) for s in summaries)
                             for key in ("passes", "bytes_read", "bytes_sent", "bytes_zero",
                                         "bytes_same")}
    total["sync_seconds"] = round(sum(float(s.get("seconds", 0)) for s in summaries), 3)
    data = total["bytes_read"] - total["bytes_same"]
    total["compression_ratio"] = round(data / total["bytes_sent"], 2) if total["bytes_sent"] \
        else None
    return total


def main(argv: list[str] | None = None) -> int:
    return Demo(parse_args(argv)).run()
