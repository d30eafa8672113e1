"""The bitmap file: round trips, torn writes, and every way it can be untrustworthy."""

import os

import pytest

from bmig.tracker.chunks import zeros
from bmig.tracker.store import (BITS_PER_PAGE, BLOCK, HEADER_SLOTS, NO_SAVED_BITMAP,
                                PAGES_OFFSET, BitmapFile, Identity, file_size)

IDENT = Identity(device_id=0x1234, size=3 * BITS_PER_PAGE * 4096 - 100, chunk_size=4096)


def fresh(path, ident=IDENT):
    """A clean bitmap with nothing dirty."""
    bitmap, bits, _ = BitmapFile.open(path, ident)
    bitmap.write_pages({i: b"" for i in range(ident.npages)})
    bitmap.close(clean=True)


def load(path, ident=IDENT):
    bitmap, bits, reason = BitmapFile.open(path, ident)
    bitmap.close(clean=True)
    return bits, reason


def test_new_file_is_all_dirty(tmp_path):
    path = str(tmp_path / "d.bitmap")
    bits, reason = load(path)
    assert reason == NO_SAVED_BITMAP
    assert bits.all() and len(bits) == IDENT.nchunks
    assert os.path.getsize(path) == file_size(IDENT)


def test_pages_round_trip_and_survive_reopen(tmp_path):
    path = str(tmp_path / "d.bitmap")
    fresh(path)
    bitmap, bits, reason = BitmapFile.open(path, IDENT)
    assert reason is None and not bits.any() and bitmap.was_clean
    page = zeros(BITS_PER_PAGE)
    page[7] = 1
    bitmap.write_pages({1: page.tobytes()})
    page[8] = 1
    bitmap.write_pages({1: page.tobytes()})   # second copy goes to the other slot
    bitmap.close(clean=False)
    bitmap, bits, reason = BitmapFile.open(path, IDENT)
    assert reason is None and not bitmap.was_clean
    assert bits.search(1) and list(bits.search(1)) == [BITS_PER_PAGE + 7, BITS_PER_PAGE + 8]
    bitmap.close(clean=True)


def _page_slot_offset(index, slot):
    return PAGES_OFFSET + (index * HEADER_SLOTS + slot) * BLOCK


@pytest.mark.parametrize("cut", [0, 1, 31, 32, 100, BLOCK - 1])
def test_torn_page_write_makes_that_page_dirty(tmp_path, cut):
    """A power loss inside a page write: that page's chunks all dirty, the rest kept."""
    path = str(tmp_path / "d.bitmap")
    fresh(path)
    bitmap, _, _ = BitmapFile.open(path, IDENT)
    old = zeros(BITS_PER_PAGE)
    old[3] = 1
    bitmap.write_pages({0: old.tobytes()})
    target_slot = 1 - bitmap._slots[0]
    bitmap.close(clean=False)
    # The next write of page 0 goes to target_slot: tear it after `cut` bytes.
    new = zeros(BITS_PER_PAGE)
    new.setall(1)
    from bmig.tracker.store import pack_page
    block = pack_page(0, 99, new.tobytes())
    torn = block[:cut] + os.urandom(BLOCK - cut) if cut < BLOCK else block
    with open(path, "r+b") as f:
        f.seek(_page_slot_offset(0, target_slot))
        f.write(torn)
    _corrupt(path, _page_slot_offset(2, 0) + 40, b"\x00")  # page 2: the same, at rest
    bits, reason = load(path)
    assert "page(s) 0, 2 damaged" in reason
    assert bits[:BITS_PER_PAGE].all()
    assert not bits[BITS_PER_PAGE:2 * BITS_PER_PAGE].any()
    assert bits[2 * BITS_PER_PAGE:].all()
    # Repaired on open: the next load finds both copies of every page valid.
    bits, reason = load(path)
    assert reason is None and bits[:BITS_PER_PAGE].all()


def test_complete_page_write_wins(tmp_path):
    path = str(tmp_path / "d.bitmap")
    fresh(path)
    bitmap, _, _ = BitmapFile.open(path, IDENT)
    for bit in (1, 2, 3):
        page = zeros(BITS_PER_PAGE)
        page[bit] = 1
        bitmap.write_pages({2: page.tobytes()})
    bitmap.close(clean=False)
    bits, _ = load(path)
    assert list(bits.search(1)) == [2 * BITS_PER_PAGE + 3]


def _corrupt(path, offset, data=b"\xff\xff\xff\xff"):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.mark.parametrize("damage,reason", [
    (lambda p: [_corrupt(p, 0), _corrupt(p, BLOCK)], "header is corrupt"),
    (lambda p: os.truncate(p, file_size(IDENT) - 1), "truncated"),
    (lambda p: os.truncate(p, 100), "truncated"),
    (lambda p: os.truncate(p, 0), "truncated"),
])
def test_untrusted_bitmap_becomes_all_dirty(tmp_path, damage, reason):
    path = str(tmp_path / "d.bitmap")
    fresh(path)
    damage(path)
    bits, why = load(path)
    assert why is not None and reason in why
    assert bits.all()
    assert any(name.startswith("d.bitmap.bad-") for name in os.listdir(tmp_path))
    # The replacement is itself a valid file.
    bits, why = load(path)
    assert why is None and bits.all()


@pytest.mark.parametrize("ident,reason", [
    (Identity(0x1234, IDENT.size + 4096, 4096), "device of"),
    (Identity(0x1234, IDENT.size, 8192), "chunks"),
    (Identity(0x9999, IDENT.size, 4096), "device id"),
])
def test_bitmap_of_another_geometry_or_device_becomes_all_dirty(tmp_path, ident, reason):
    path = str(tmp_path / "d.bitmap")
    fresh(path)
    bits, why = load(path, ident)
    assert reason in why and bits.all() and len(bits) == ident.nchunks


def test_page_with_no_valid_copy_is_dirty_and_repaired(tmp_path):
    path = str(tmp_path / "d.bitmap")
    fresh(path)
    for slot in (0, 1):
        _corrupt(path, _page_slot_offset(1, slot) + 40, b"\x01")
    bits, why = load(path)
    assert "page(s) 1 damaged" in why
    assert list(bits.search(1)) == list(range(BITS_PER_PAGE, 2 * BITS_PER_PAGE))
    bits, why = load(path)
    assert why is None and bits.count() == BITS_PER_PAGE


@pytest.mark.parametrize("which", ["newest", "older"])
def test_one_corrupt_header_copy_is_survivable(tmp_path, which):
    path = str(tmp_path / "d.bitmap")
    fresh(path)
    bitmap, _, _ = BitmapFile.open(path, IDENT)
    newest = bitmap._header_slot
    bitmap.close(clean=True)
    # Either header copy may be torn; the other one (same identity) still opens the file.
    slot = newest if which == "newest" else 1 - newest
    _corrupt(path, BLOCK * slot + 8)
    bits, why = load(path)
    assert why is None and not bits.any()


def test_write_failure_is_a_state_write_error_and_keeps_old_copy(tmp_path):
    from bmig.errors import StateWriteError
    path = str(tmp_path / "d.bitmap")
    fresh(path)
    bitmap, _, _ = BitmapFile.open(path, IDENT)
    os.close(bitmap._fd)
    bitmap._fd = os.open(path, os.O_RDONLY)        # writes now fail with EBADF
    with pytest.raises(StateWriteError, match="cannot write bitmap"):
        bitmap.write_pages({0: b"\xff" * 10})
    os.close(bitmap._fd)
    bits, why = load(path)
    assert why is None and not bits.any()
