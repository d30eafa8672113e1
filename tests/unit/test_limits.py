"""Invariant 8's caps live in bmig/limits.py alone, and hold against each other.

The relations are checked when bmig.limits is imported; here each is also shown to be
live (a cap changed so that it breaks is refused, with the reason), and the rest of bmig/
is searched for a cap defined on its own or imported from anywhere but bmig.limits.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import bmig
from bmig import limits

BMIG = Path(bmig.__file__).parent
LIMITS = BMIG / "limits.py"


def _assigned(tree: ast.AST) -> list[tuple[str, int]]:
    """Names bound by assignments at module or class level (not in functions)."""
    out: list[tuple[str, int]] = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            targets: list[ast.expr] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets = [node.target]
            elif isinstance(node, ast.ClassDef):
                visit(node.body)
            for target in targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        out.append((name.id, node.lineno))
    visit(tree.body)         # type: ignore[attr-defined]
    return out


CAPS = {name for name, _ in _assigned(ast.parse(LIMITS.read_text()))
        if name.isupper() and isinstance(getattr(limits, name), int)}

# Module-level names that look like caps but bound no allocation a peer or a file can
# cause, each with the reason it stays where it is.
NOT_CAPS = {
    ("constants.py", "MAX_CHUNK_SIZE"): "device geometry (chunk sizes), not a memory cap",
    ("constants.py", "MAX_DEVICE_SIZE"): "device geometry; memory is MAX_CHUNKS'",
    ("constants.py", "MAX_DEVICE_NAME"): "what a device name may be",
    ("config.py", "MAX_KEY_PARTS"): "TOML key syntax inside a file capped by MAX_CONFIG_FILE",
    ("config.py", "MAX_SHOWN"): "characters of a bad value quoted in an error message",
    ("demo/settings.py", "MAX_WRITE"): "the demo writer's own write size",
    ("processes.py", "MAX_NOTIFICATIONS"): "what a helper keeps of its own children's "
                                           "notifications: not a peer's input",
    ("sender/converge.py", "MAX_HOLD_WAIT"): "seconds",
    ("nbd/manage.py", "MAX_LEASE"): "seconds",
    ("wire/handshake.py", "MAX_VERSION_FIELD"): "the range of a number",
    ("wire/seal.py", "MAX_FRAMES"): "frames one key may seal: a counter, not memory",
    ("nbdclient/transmission.py", "MAX_IN_FLIGHT"): "the client's own pipelining, set by its caller",
    ("nbdclient/transmission.py", "_MAX_U32"): "an integer width",
    ("nbdclient/transmission.py", "_MAX_U64"): "an integer width",
    ("nbdclient/transmission.py", "_MAX_NO_PAYLOAD"): "a request length's width (32 bits)",
}
LOOKS_LIKE_A_CAP = re.compile(r"^_?MAX_|_(LIMIT|CAP)$|^PREAUTH_")


def _modules() -> list[tuple[str, ast.Module]]:
    return [(str(path.relative_to(BMIG)), ast.parse(path.read_text()))
            for path in sorted(BMIG.rglob("*.py")) if path != LIMITS]


def test_the_caps_hold_against_each_other():
    limits.check(vars(limits))
    assert len(limits.relations(limits)) >= 15


@pytest.mark.parametrize("cap, value, reason", [
    ("MAX_CONTROL_FRAME", 2 * 1024 * 1024, "control message"),
    ("MAX_CHECKOUT_RUNS", 65537, "CHECKOUT reply"),
    ("MAX_QUERY_RUNS", 65537, "QUERY reply"),
    ("MAX_HELD_RUNS", 1000, "MARK with hold"),
    ("DEFAULT_HOLD_LIMIT", 1 << 19, "bmig-nbd at its default hold limit"),
    ("MARK_PIECE", 1001, "MARK piece"),
    ("MAX_FRAME", 4 * 1024 * 1024, "DATA frame"),
    ("MAX_HASHES", 1 << 20, "HASHES reply"),
    ("MAX_PREAUTH_FRAME", 1 << 17, "authentication only raises the cap"),
    ("MAX_UNAUTHENTICATED", 1000, "strangers"),
    ("SSH_MAX_PACKET_SIZE", 32 << 20, "SSH packet"),
    ("MAX_NAME_LENGTH", 1 << 16, "NBD_OPT_GO"),
    ("MAX_DISCARD", 1 << 20, "refused NBD write"),
    ("MAX_INFLIGHT_BYTES", 1 << 20, "payload budget"),
    ("INLINE_PAYLOAD", 1 << 20, "receive buffer"),
    ("MAX_PSK_FILE", 256, "PSK file line"),
])
def test_a_cap_that_breaks_a_relation_is_refused_with_the_reason(cap, value, reason):
    caps = {**vars(limits), cap: value}
    with pytest.raises(AssertionError, match=reason):
        limits.check(caps)


def test_no_module_but_limits_defines_a_cap():
    found = []
    for module, tree in _modules():
        for name, line in _assigned(tree):
            if name in CAPS:
                found.append(f"{module}:{line}: {name} is bmig.limits'; import it from there")
            elif LOOKS_LIKE_A_CAP.search(name) and (module, name) not in NOT_CAPS:
                found.append(f"{module}:{line}: {name} looks like a cap: put it in "
                             "bmig/limits.py, or in NOT_CAPS here with the reason")
    assert not found, "\n".join(found)


def test_every_module_imports_its_caps_from_limits():
    found = []
    for module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module != "bmig.limits":
                for alias in node.names:
                    if alias.name in CAPS:
                        found.append(f"{module}:{node.lineno}: {alias.name} from "
                                     f"{node.module}, not bmig.limits")
    assert not found, "\n".join(found)


def test_the_allowed_look_alikes_still_exist():
    """NOT_CAPS names only what is there, so it cannot hide a cap added later."""
    defined = {(module, name) for module, tree in _modules() for name, _ in _assigned(tree)}
    assert set(NOT_CAPS) <= defined, sorted(set(NOT_CAPS) - defined)
