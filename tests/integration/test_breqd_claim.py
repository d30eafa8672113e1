"""The sender slot handed over on request (CLAIM), against a real breqd.

- A CLAIM of a device nobody ships is granted at once; STATS names the sender and says
  it took the slot by CLAIM.
- A CLAIM of a device another connection ships waits: the sender's next CHECKOUT is
  refused (``sender-claimed``), its COMMITs still work, STATS names the claimant; when
  the sender's connection ends the claim is granted (the reply names who gave it up),
  and what the sender had checked out and not committed is dirty again (invariant 3).
- A CLAIM that waits longer than ``wait_ms`` is refused (``device-busy``) and the sender
  keeps the slot; a claimant that goes away while it waits lets the sender go on.
- A second claim while one waits, and a claim of a slot taken by CLAIM, are refused at
  once: one cutover at a time.
"""

from __future__ import annotations

import threading

import pytest

from bmig.errors import DeviceBusy, SenderClaimed
from bmig.tracker.blocking_client import TrackerClient
from bmig.tracker.protocol import Op
from tests.daemon import wait_until
from tests.integration.breqd_helpers import body, hello, raw_connect, send

CHUNK = 64 << 10
SIZE = 64 * CHUNK


def client(breqd, name: str) -> TrackerClient:
    return TrackerClient(breqd.control, timeout=30, client=name)


@pytest.fixture
def device(breqd):
    admin = client(breqd, "test admin")
    admin.add_device("d", SIZE, chunk_size=CHUNK)     # every chunk dirty
    yield admin
    admin.close()


class Claim(threading.Thread):
    """A CLAIM that waits, in a thread of its own: ``result`` or ``error`` once done."""

    def __init__(self, tracker: TrackerClient, wait: float):
        super().__init__(daemon=True)
        self.tracker, self.wait = tracker, wait
        self.result: str | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self.result = self.tracker.claim("d", self.wait)
        except Exception as exc:          # noqa: BLE001 - the test looks at it
            self.error = exc


def test_a_claim_of_a_device_nobody_ships_is_granted_at_once(breqd, device):
    cutover = client(breqd, "bmigrate cutover")
    try:
        assert cutover.claim("d", 5) is None
        stats = device.stats("d")
        assert stats["sender"].startswith("bmigrate cutover") and "(pid " in stats["sender"]
        assert stats["sender_claimed"] is True and stats["claimed_by"] is None
        assert cutover.checkout("d", CHUNK)                  # it is the sender now
        with pytest.raises(DeviceBusy):                      # nobody else is
            device.checkout("d", CHUNK)
    finally:
        cutover.close()
    wait_until(lambda: device.stats("d")["sender"] is None, timeout=10,
               what="the slot to be free once the claimant closed")


def test_a_claim_waits_for_the_sender_and_is_granted_when_it_goes(breqd, device):
    run = client(breqd, "bmigrate run")
    cutover = client(breqd, "bmigrate cutover")
    try:
        first = run.checkout("d", 4 * CHUNK)
        second = run.checkout("d", 4 * CHUNK)
        claim = Claim(cutover, wait=60)
        claim.start()
        wait_until(lambda: device.stats("d")["claimed_by"], timeout=10,
                   what="breqd to show the claim")
        stats = device.stats("d")
        assert stats["claimed_by"].startswith("bmigrate cutover")
        assert stats["sender"].startswith("bmigrate run") and not stats["sender_claimed"]
        with pytest.raises(SenderClaimed) as refused:
            run.checkout("d", CHUNK)
        assert "bmigrate cutover" in refused.value.message
        assert refused.value.exit_code == 17
        run.commit("d", first)                          # what is in flight is answered
        assert claim.is_alive()                         # still the sender's
        inflight = device.stats("d")["inflight_bytes"]
        assert inflight == sum(n for _, n in second)
    finally:
        run.close()                                     # gives the slot up
    claim.join(timeout=30)
    try:
        assert not claim.is_alive() and claim.error is None, claim.error
        assert claim.result is not None and claim.result.startswith("bmigrate run")
        stats = device.stats("d")
        assert stats["sender"].startswith("bmigrate cutover") and stats["sender_claimed"]
        assert stats["claimed_by"] is None and stats["inflight_bytes"] == 0
        # Invariant 3: what the sender had not committed is dirty again; what it
        # committed is clean.
        assert stats["dirty_bytes"] == SIZE - sum(n for _, n in first)
        assert cutover.checkout("d", SIZE)
    finally:
        cutover.close()


def test_a_claim_that_waits_too_long_is_refused_and_the_sender_keeps_the_device(
        breqd, device):
    run = client(breqd, "bmigrate run")
    cutover = client(breqd, "bmigrate cutover")
    try:
        run.checkout("d", CHUNK)
        with pytest.raises(DeviceBusy) as refused:
            cutover.claim("d", 0.2)
        assert "did not give the device up" in refused.value.message
        assert not isinstance(refused.value, SenderClaimed)
        stats = device.stats("d")
        assert stats["claimed_by"] is None and stats["sender"].startswith("bmigrate run")
        assert run.checkout("d", CHUNK)                  # it ships on
    finally:
        run.close()
        cutover.close()


def test_a_claimant_that_goes_away_lets_the_sender_go_on(breqd, device):
    run = client(breqd, "bmigrate run")
    cutover = raw_connect(breqd.control)          # a claimant that can vanish at once
    try:
        run.checkout("d", CHUNK)
        hello(cutover)
        send(cutover, body(Op.CLAIM, 2, {"device": "d", "wait_ms": 60000}))
        wait_until(lambda: device.stats("d")["claimed_by"], timeout=10,
                   what="breqd to show the claim")
        with pytest.raises(SenderClaimed):
            run.checkout("d", CHUNK)
        cutover.close()
        wait_until(lambda: device.stats("d")["claimed_by"] is None, timeout=10,
                   what="the claim to go with its connection")
        assert run.checkout("d", CHUNK)
        assert device.stats("d")["sender"].startswith("bmigrate run")
    finally:
        run.close()
        cutover.close()


def test_one_cutover_at_a_time(breqd, device):
    run = client(breqd, "bmigrate run")
    first = client(breqd, "first cutover")
    second = client(breqd, "second cutover")
    try:
        run.checkout("d", CHUNK)
        claim = Claim(first, wait=60)
        claim.start()
        wait_until(lambda: device.stats("d")["claimed_by"], timeout=10,
                   what="breqd to show the claim")
        with pytest.raises(DeviceBusy) as refused:
            second.claim("d", 5)
        assert "already claims it" in refused.value.message
        run.close()
        claim.join(timeout=30)
        assert claim.error is None, claim.error
        with pytest.raises(DeviceBusy) as refused:       # held by a claimant: kept
            second.claim("d", 5)
        assert "for a cutover" in refused.value.message
        assert device.stats("d")["sender"].startswith("first cutover")
    finally:
        for c in (run, first, second):
            c.close()
