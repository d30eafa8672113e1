"""bmigrate cutover --check: every precondition of a cutover, tested without changing
anything, as ``drbdadm -d`` or ``rsync -n`` let an operator rehearse.

    check      holds when                                                     exit if not
    breqd      breqd answers on --control and tracks the device                        20
    source     --source opens for reading and has the size breqd tracks                 21
    intercept  bmig-nbd's control socket answers (or the dm-era intercept is
               attached), and the device is neither read-only nor frozen                22
    slot       the sender slot can be had: free, or held by a sender that gives it
               up (bmigrate run, sync); not held or claimed for another cutover         23
    hooks      --pre-handover and --post-handover parse (sh -n) and name a command
               that exists (command -v); nothing of them runs                           24
    receiver   the receiver at --to answers and serves the export (not tried while
               this sender's settings cannot authenticate it: see auth)                 25
    auth       this sender has what authenticates the receiver (a shared secret, a
               usable certificate or identity file: looked at before connecting), and
               the receiver and this sender authenticate each other                     26
    lineage    breqd's role is primary, and the target holds this lineage, the one
               it took over from, or nothing of ours (not another lineage)              27

The exit status is that of the first check, in this order, that does not hold. What is
asked: STATS (breqd), "status" (bmig-nbd), an OPEN in "inspect" mode (breceive takes no
lock and writes nothing; it is the OPEN ``bmigrate verify`` makes). A check that needs
one that failed is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from bmig.blockdev import size_of_fd
from bmig.errors import (EXIT_CHECK_AUTH, EXIT_CHECK_BREQD, EXIT_CHECK_HOOK,
                         EXIT_CHECK_INTERCEPT, EXIT_CHECK_LINEAGE, EXIT_CHECK_RECEIVER,
                         EXIT_CHECK_SLOT, EXIT_CHECK_SOURCE, AuthError, BmigError,
                         LineageError, TargetMissing)
from bmig.lineage import ROLE_PRIMARY
from bmig.nbd.manage_client import ManageClient
from bmig.sender.converge import Migration, source_info
from bmig.sender.hooks import problem
from bmig.sender.targets import open_target
from bmig.wire.connect import check_settings
from bmig.tracker.blocking_client import TrackerClient
from bmig.wire.client import WireTarget

TIMEOUT = 10.0         # seconds each daemon gets to answer

# The checks in the order they are made and reported, with their exit status.
CHECKS = (("breqd", EXIT_CHECK_BREQD), ("source", EXIT_CHECK_SOURCE),
          ("intercept", EXIT_CHECK_INTERCEPT), ("slot", EXIT_CHECK_SLOT),
          ("hooks", EXIT_CHECK_HOOK), ("receiver", EXIT_CHECK_RECEIVER),
          ("auth", EXIT_CHECK_AUTH), ("lineage", EXIT_CHECK_LINEAGE))
EXIT_OF = dict(CHECKS)


@dataclass
class Check:
    name: str
    ok: bool | None          # None: skipped, since a check it needs failed
    message: str

    @property
    def exit_code(self) -> int:
        return EXIT_OF[self.name]

    def to_json(self) -> dict:
        return {"event": "check", "check": self.name, "ok": self.ok,
                "message": self.message,
                "exit_code": None if self.ok or self.ok is None else self.exit_code}


class Precheck:
    """The checks of one cutover: ``run`` reports each as it is made."""

    def __init__(self, migration: Migration, manage_dir: str, hooks: dict[str, str | None],
                 report: Callable[[Check], None]):
        self.m = migration
        self.manage_dir = manage_dir
        self.hooks = {which: command for which, command in hooks.items() if command}
        self.report = report
        self.results: list[Check] = []
        self._stats: dict | None = None

    def run(self) -> list[Check]:
        for name, _ in CHECKS:
            getattr(self, "_" + name)()
        return self.results

    def failed(self) -> Check | None:
        """The first check that does not hold."""
        return next((c for c in self.results if c.ok is False), None)

    def _say(self, name: str, ok: bool | None, message: str) -> None:
        check = Check(name, ok, message)
        self.results.append(check)
        self.report(check)

    def _passed(self, name: str) -> bool:
        return any(c.name == name and c.ok for c in self.results)

    # -- the checks, in order ----------------------------------------------------------

    def _breqd(self) -> None:
        m = self.m
        try:
            with TrackerClient(m.control, timeout=TIMEOUT,
                               client="bmigrate cutover --check") as tracker:
                self._stats = tracker.stats(m.name)
                version, server = tracker.version, tracker.server
        except BmigError as exc:
            self._say("breqd", False, exc.message)
            return
        if version < 3:
            self._say("breqd", False, f"{server} at {m.control} speaks control protocol "
                                      f"{version}; a cutover needs 3 (upgrade breqd)")
            self._stats = None
            return
        self._say("breqd", True, f"{server} at {m.control} tracks {m.name}")

    def _source(self) -> None:
        if self._stats is None:
            return self._say("source", None, "skipped: breqd did not answer")
        path, size = self.m.source_path, int(self._stats["size"])
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            return self._say("source", False, f"cannot open {path}: {exc.strerror}")
        try:
            have = size_of_fd(fd)
        finally:
            os.close(fd)
        if have != size:
            return self._say("source", False, f"{path} has {have} bytes, but breqd tracks "
                                              f"{size} for {self.m.name}")
        self._say("source", True, f"{path} is readable and has {size} bytes")

    def _intercept(self) -> None:
        m = self.m
        if m.intercept is not None:
            return self._say("intercept", True, f"{m.name} is under a dm-era intercept "
                                                "(bmig-dm): the cutover freezes the device")
        try:
            with ManageClient(self.manage_dir, m.name, timeout=TIMEOUT) as nbd:
                status = nbd.call("status")
        except BmigError as exc:
            return self._say("intercept", False, exc.message)
        if status.get("read_only"):
            return self._say("intercept", False, f"bmig-nbd serves {m.name} read-only (handed "
                                                 "over already?)")
        if status.get("frozen"):
            return self._say("intercept", False, f"bmig-nbd holds the writes of {m.name} "
                                                 "frozen: another cutover is under way")
        self._say("intercept", True, f"bmig-nbd answers at "
                                     f"{os.path.join(self.manage_dir, m.name + '.sock')}")

    def _slot(self) -> None:
        stats = self._stats
        if stats is None:
            return self._say("slot", None, "skipped: breqd did not answer")
        sender, claimant = stats.get("sender"), stats.get("claimed_by")
        if claimant:
            return self._say("slot", False, f"{claimant} already claims {self.m.name} for a "
                                            "cutover")
        if sender and stats.get("sender_claimed"):
            return self._say("slot", False, f"{sender} holds {self.m.name} for a cutover")
        if sender:
            return self._say("slot", True, f"{sender} ships {self.m.name} now and gives it "
                                           "up when the cutover starts")
        self._say("slot", True, "no sender ships the device now")

    def _hooks(self) -> None:
        if not self.hooks:
            return self._say("hooks", True, "no hooks (the cutover freezes bmig-nbd's writes)")
        problems = [f"--{which} {command!r}: {why}" for which, command in self.hooks.items()
                    if (why := problem(command)) is not None]
        if problems:
            return self._say("hooks", False, "; ".join(problems))
        self._say("hooks", True, ", ".join(f"--{w}" for w in self.hooks) + " can run")

    def _receiver(self) -> None:
        """This sender's settings first (nothing is tried without them), then reach and
        authenticate (receiver, auth), then OPEN in inspect mode (lineage)."""
        m = self.m
        try:
            check_settings(m.url, m.options)
        except BmigError as exc:
            self._say("receiver", None, "not tried: this sender cannot authenticate it")
            self._say("auth", False, f"this sender's settings: {exc.message}")
            return self._say("lineage", None, "skipped: not authenticated")
        try:
            target = open_target(m.url, m.options)
        except AuthError as exc:              # only once the transport has connected
            self._say("receiver", True, f"{m.url.host}:{m.url.port} answers")
            self._say("auth", False, exc.message)
            return self._say("lineage", None, "skipped: not authenticated")
        except BmigError as exc:
            self._say("receiver", False, exc.message)
            self._say("auth", None, "skipped: the receiver did not answer")
            return self._say("lineage", None, "skipped: the receiver did not answer")
        try:
            self._open(target)
        finally:
            target.close()

    def _open(self, target) -> None:
        m = self.m
        if not isinstance(target, WireTarget):
            self._say("receiver", True, f"{target.description} answers")
            self._say("auth", True, "an NBD server: nothing to authenticate")
            return self._say("lineage", False, f"{target.description} keeps no lineage: only "
                                               "breceive can be promoted")
        if self._stats is None:
            self._say("receiver", True, f"{target.description} answers")
            self._say("auth", True, "authenticated")
            return self._say("lineage", None, "skipped: breqd did not answer")
        missing = ""
        try:
            relation = target.open(source_info(m.name, self._stats), False, "inspect")
        except TargetMissing as exc:
            relation = "missing"                 # a pass creates it: "new"
            missing = exc.message
        except LineageError as exc:
            self._say("receiver", True, f"{target.description} answers")
            self._say("auth", True, "authenticated")
            return self._say("lineage", False, exc.message)
        except AuthError as exc:
            self._say("receiver", True, f"{target.description} answers")
            self._say("auth", False, exc.message)
            return self._say("lineage", None, "skipped: not authenticated")
        except BmigError as exc:
            self._say("receiver", False, exc.message)
            self._say("auth", True, "authenticated")
            return self._say("lineage", None, "skipped: the receiver refused the target")
        self._say("receiver", True, f"{target.description} serves {m.url.export!r}")
        self._say("auth", True, "authenticated")
        role = self._stats.get("role")
        if role != ROLE_PRIMARY:
            return self._say("lineage", False, f"breqd records {m.name} as {role} (successor "
                                               f"{self._stats.get('successor')}): it is not "
                                               "the primary any more")
        what = {"same": "the target holds this lineage: the drain ships what is dirty",
                "descendant": "the target holds the lineage this one took over from: the "
                              "drain ships what changed since",
                "new": "the target holds nothing of this lineage: the drain ships "
                       "everything",
                "missing": f"{missing}: the cutover creates it and ships everything"}
        self._say("lineage", True, what.get(relation, relation))

    def _auth(self) -> None:
        """Reported by _receiver."""

    def _lineage(self) -> None:
        """Reported by _receiver."""
