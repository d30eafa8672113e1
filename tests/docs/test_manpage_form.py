"""The form of every man page: mandoc finds nothing at WARNING level or worse, and the
.TH line has the page's name and section, a date man can read, the version of bmig and
the usual title of its section.
"""

from __future__ import annotations

import datetime
import shutil
import subprocess
from pathlib import Path

import pytest

import bmig
from tests.docs import roff

MAN = Path(__file__).resolve().parents[2] / "man"
PAGES = sorted(p for p in MAN.iterdir() if p.suffix[1:].isdigit())
SECTION_TITLES = {"1": "User Commands", "5": "File Formats", "8": "System Administration"}


def test_the_pages_are_there():
    names = {p.name for p in PAGES}
    assert {"bmigrate.1", "breqd.8", "breceive.8", "bmig-nbd.8", "bmig-dm.8",
            "bmig.toml.5"} <= names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_mandoc_finds_nothing_at_warning_level(page):
    if not shutil.which("mandoc"):
        pytest.skip("mandoc is not installed (make test installs it as root)")
    lint = subprocess.run(["mandoc", "-Tlint", "-W", "warning", str(page)],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0 and not lint.stdout + lint.stderr, \
        f"mandoc -Tlint -W warning {page.name}:\n{lint.stdout}{lint.stderr}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_the_title_line(page):
    lines = [line for line in page.read_text().splitlines() if line.startswith(".TH ")]
    assert len(lines) == 1, f"{page.name}: wants one .TH line"
    fields = roff.arguments(lines[0][4:])
    assert len(fields) == 5, f"{page.name}: .TH NAME SECTION DATE SOURCE MANUAL, got {fields}"
    name, section, date, source, manual = fields
    assert roff.unescape(name) == page.stem.upper(), f"{page.name}: .TH names {name}"
    assert section == page.suffix[1:], f"{page.name}: .TH gives section {section}"
    try:
        datetime.date.fromisoformat(date)
    except ValueError:
        raise AssertionError(f"{page.name}: .TH date {date!r} is not YYYY-MM-DD") from None
    assert source == f"bmig {bmig.__version__}", \
        f"{page.name}: .TH source {source!r}, not 'bmig {bmig.__version__}'"
    assert manual == SECTION_TITLES[section], f"{page.name}: .TH manual {manual!r}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_page_names_the_configuration_page(page):
    if page.name != "bmig.toml.5":
        see_also = roff.split(page.read_text().splitlines(), ".SH")[1]["SEE ALSO"]
        assert "bmig.toml(5)" in roff.text(see_also), f"{page.name}: SEE ALSO bmig.toml(5)"
