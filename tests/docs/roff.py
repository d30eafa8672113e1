"""Reading the man pages as a reader sees them: sections, .TP items, their text.

Only what bmig's pages use: font macros (.B, .BR, .RB ...), font escapes, the
special characters \\- \\(dq \\(lq \\(rq \\e \\& and \\(space), and ``.br`` as a line break.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ARGUMENT = re.compile(r'"((?:[^"]|"")*)"|(\S+)')
_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")
_SPECIAL = {r"\-": "-", r"\(dq": '"', r"\(lq": "\u201c", r"\(rq": "\u201d", r"\e": "\\",
            r"\&": "", "\\ ": " ", r"\(aq": "'", r"\(ti": "~", r"\(ha": "^"}
# Macros whose arguments are set in alternating fonts, with nothing between them.
_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
_JOINED = {"B", "I", "SM", "SB"}
BREAK = "\n"          # what .br becomes in ``text``


def unescape(text: str) -> str:
    text = _FONT.sub("", text)
    for escape, char in _SPECIAL.items():
        text = text.replace(escape, char)
    return text


def arguments(text: str) -> list[str]:
    return [m.group(1).replace('""', '"') if m.group(1) is not None else m.group(2)
            for m in _ARGUMENT.finditer(text)]


def text(lines: list[str]) -> str:
    """The words of roff lines, ``.br`` kept as BREAK; other requests are dropped."""
    words: list[str] = []
    for line in lines:
        if line.startswith((".", "'")):
            name, _, rest = line[1:].partition(" ")
            if name == "br":
                words.append(BREAK)
            elif name in _ALTERNATING:
                words.append("".join(arguments(rest)))
            elif name in _JOINED:
                words.append(" ".join(arguments(rest)))
        else:
            words.append(line)
    joined = " ".join(unescape(w) for w in words)
    return "\n".join(" ".join(part.split()) for part in joined.split(BREAK))


def split(lines: list[str], macro: str) -> tuple[list[str], dict[str, list[str]]]:
    """The lines before the first ``macro`` and those of each part, by its plain title."""
    head: list[str] = []
    parts: dict[str, list[str]] = {}
    current = head
    for line in lines:
        if line == macro or line.startswith(macro + " "):
            title = unescape(" ".join(arguments(line[len(macro):])))
            current = parts.setdefault(title, [])
        else:
            current.append(line)
    return head, parts


@dataclass
class Item:
    """One ``.TP`` item: its tag and the text of its body, a string per line break."""
    tag: str
    body: list[str]


def items(lines: list[str]) -> list[Item]:
    """The ``.TP`` items of a part, each up to the next .TP, .PP, .SS or .SH."""
    found: list[Item] = []
    i = 0
    while i < len(lines):
        if lines[i].strip() == ".TP" and i + 1 < len(lines):
            tag = text([lines[i + 1]])
            end = i + 2
            while end < len(lines) and lines[end].split(" ")[0] not in (
                    ".TP", ".PP", ".P", ".LP", ".SS", ".SH"):
                end += 1
            body = [part for part in text(lines[i + 2:end]).split("\n") if part]
            found.append(Item(tag, body))
            i = end
        else:
            i += 1
    return found


def examples(lines: list[str]) -> list[str]:
    """The text of every .EX/.EE block, as written (escapes undone)."""
    blocks: list[str] = []
    current: list[str] | None = None
    for line in lines:
        if line.startswith(".EX"):
            current = []
        elif line.startswith(".EE") and current is not None:
            blocks.append("\n".join(current) + "\n")
            current = None
        elif current is not None:
            current.append(unescape(line))
    return blocks
