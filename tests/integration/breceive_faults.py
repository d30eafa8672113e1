"""breceive with faults the tests choose, for what a real network rarely does on cue.

    python -c 'from tests.integration.breceive_faults import main; main()' FAULTS ARGS...

FAULTS is a comma-separated list (or "none"); ARGS are breceive's own:

    promoted-lost   PROMOTE is carried out, but its answer is lost: the connection ends
                    instead of PROMOTED (the receiver may have died right after, or the
                    network failed)
    promote-lost    the connection ends when PROMOTE arrives, before it is carried out
    status-lost     every STATUS_REQ ends its connection unanswered
    promote-stuck   PROMOTE is never carried out nor answered: the session logs
                    "fault: PROMOTE stuck" and waits until its connection ends (the sender
                    waiting for the answer is the one a test kills)
    promote-held    the connection ends when PROMOTE arrives, but the session goes on
                    holding the target and carries PROMOTE out only after a STATUS_REQ
                    (of another connection) was answered: the sender that asks finds the
                    target not promoted yet, but still held by that session
    finish-slow     a session's end (the final sync, the locks let go, the connection
                    closed) waits FINISH_DELAY seconds first, as on a slow disk
"""

from __future__ import annotations

import sys
import threading

from bmig.receiver import session as session_module
from bmig.receiver.session import Session
from bmig.wire.protocol import Message, T


def _promoted_lost(original):
    def promote(self: Session, msg: Message) -> bool:
        sent = self.send

        def send(message: Message) -> None:
            if message.type != T.PROMOTED:
                sent(message)
            else:
                self.channel.close()           # the answer is lost with the connection
        self.send = send                       # type: ignore[method-assign]
        try:
            original(self, msg)
        finally:
            del self.send
        return False                           # and the session ends
    return promote


_status_answered = threading.Event()


def _answered(original):
    def status(self: Session, msg: Message) -> bool:
        try:
            return original(self, msg)
        finally:
            _status_answered.set()
    return status


def _promote_held(original):
    def promote(self: Session, msg: Message) -> bool:
        self.channel.close()                   # the sender hears nothing ...
        _status_answered.wait(60)              # ... asks, and is answered; only then
        self.send = lambda message: None       # type: ignore[method-assign]
        try:
            original(self, msg)                # ... is PROMOTE carried out
        finally:
            del self.send
        return False
    return promote


def _promote_stuck(original):
    def promote(self: Session, msg: Message) -> bool:
        import logging
        logging.getLogger("breceive").warning("fault: PROMOTE stuck")
        try:
            while True:                        # until the sender's side goes away
                self.channel.read()
        except Exception:
            return False
    return promote


def _lost(original):
    def handler(self: Session, msg: Message) -> bool:
        self.channel.close()
        return False
    return handler


FAULTS = {"promoted-lost": (T.PROMOTE, _promoted_lost), "promote-lost": (T.PROMOTE, _lost),
          "status-lost": (T.STATUS_REQ, _lost), "promote-held": (T.PROMOTE, _promote_held),
          "promote-stuck": (T.PROMOTE, _promote_stuck),
          "status-answered": (T.STATUS_REQ, _answered)}


FINISH_DELAY = 3.0


def _finish_slow() -> None:
    original = Session._finish

    def finish(self: Session) -> None:
        import time
        time.sleep(FINISH_DELAY)
        original(self)
    Session._finish = finish                   # type: ignore[method-assign]


def install(names: list[str]) -> None:
    for name in names:
        if name == "finish-slow":
            _finish_slow()
            continue
        kind, make = FAULTS[name]
        handlers = session_module._JSON_HANDLERS
        handlers[kind] = make(handlers[kind])


def main() -> None:
    faults = sys.argv.pop(1)
    install([] if faults == "none" else faults.split(","))
    from bmig.cli.breceive import main as breceive_main
    breceive_main()


def argv(faults: str):
    """A ``program`` for tests.integration.sync_helpers.start_receiver."""
    def make(*args: str) -> list[str]:
        return [sys.executable, "-c",
                "from tests.integration.breceive_faults import main; main()", faults, *args]
    return make
