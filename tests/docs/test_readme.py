"""The README's quick start is two commands, make test and make demo; installing comes
after it."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def part(title: str) -> str:
    text = README.read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README.md has no '## {title}'"
    return match.group(1)


def commands(text: str) -> list[str]:
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines()
            if line.split("#")[0].strip()]


def test_the_quick_start_is_make_test_and_make_demo():
    assert commands(part("Quick start")) == ["make test", "make demo"]


def test_installing_comes_after_the_quick_start():
    text = README.read_text()
    assert text.index("## Quick start") < text.index("## Installing")
    assert "make install" in commands(part("Installing"))
