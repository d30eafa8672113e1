"""breceive's target writes: a frame of 4 MiB goes to the file in pieces of at most
WRITE_PIECE bytes (large writes into pages new to the page cache cost the kernel several
times the CPU), every byte lands where it belongs, and a short write is continued."""

from __future__ import annotations

import os

from bmig.receiver import target as target_module
from bmig.receiver.target import WRITE_PIECE, TargetDevice


def test_a_large_write_goes_in_pieces_and_lands_whole(tmp_path, monkeypatch):
    path = str(tmp_path / "t.img")
    device = TargetDevice.create(path, 8 << 20, None)
    data = os.urandom(4 << 20)
    sizes: list[int] = []
    real = os.pwrite

    def recording(fd, buf, offset):
        sizes.append(len(buf))
        return real(fd, buf, offset)

    monkeypatch.setattr(target_module.os, "pwrite", recording)
    device.write(1 << 20, data)
    assert max(sizes) <= WRITE_PIECE and sum(sizes) == len(data)
    with open(path, "rb") as f:
        f.seek(1 << 20)
        assert f.read(len(data)) == data


def test_a_short_write_is_continued_where_it_stopped(tmp_path, monkeypatch):
    path = str(tmp_path / "t.img")
    device = TargetDevice.create(path, 1 << 20, None)
    data = os.urandom(300_000)
    real = os.pwrite

    def short(fd, buf, offset):             # at most 1000 bytes a call, as a signal may cut
        return real(fd, bytes(buf[:1000]), offset)

    monkeypatch.setattr(target_module.os, "pwrite", short)
    device.write(4096, data)
    with open(path, "rb") as f:
        f.seek(4096)
        assert f.read(len(data)) == data


def test_a_write_that_makes_no_progress_is_an_error_not_a_loop(tmp_path, monkeypatch):
    import pytest

    from bmig.errors import BmigError

    path = str(tmp_path / "t.img")
    device = TargetDevice.create(path, 1 << 20, None)
    monkeypatch.setattr(target_module.os, "pwrite", lambda fd, buf, offset: 0)
    with pytest.raises(BmigError, match="write of 4096 bytes at 0"):
        device.write(0, b"x" * 4096)
