"""A file edited in place is picked up once the edit is whole, even when the
kernel gave the half-written file and the finished one the same mtime."""

from __future__ import annotations

import os
import time
from pathlib import Path

from mariana_common.reloading import ReloadingFile


def parse(text: str) -> dict[str, int]:
    pairs = [line.split("=") for line in text.splitlines()]
    if not pairs:
        raise ValueError("empty")
    return {key: int(value) for key, value in pairs}


def write(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


def test_a_torn_read_does_not_hide_the_finished_edit(tmp_path: Path) -> None:
    path = tmp_path / "rules"
    write(path, "a=1", 1_000)
    rules = ReloadingFile(path, parse, "rules", interval_s=0)
    assert rules() == {"a": 1}
    stamp = time.time_ns()
    write(path, "", stamp)  # truncated, seen before the write lands
    assert rules() == {"a": 1}  # the last good one stays
    write(path, "a=2\nb=3", stamp)  # the write lands within the same clock tick
    assert rules() == {"a": 2, "b": 3}


def test_a_recent_file_is_compared_by_content(tmp_path: Path) -> None:
    path = tmp_path / "rules"
    stamp = time.time_ns()
    write(path, "a=1", stamp)
    rules = ReloadingFile(path, parse, "rules", interval_s=0)
    write(path, "a=7", stamp)  # same size, same mtime, same inode
    assert rules() == {"a": 7}


def test_a_rename_over_the_file_is_seen(tmp_path: Path) -> None:
    path = tmp_path / "rules"
    write(path, "a=1", 1_000)
    rules = ReloadingFile(path, parse, "rules", interval_s=0)
    assert rules() == {"a": 1}
    staged = tmp_path / "rules.new"
    write(staged, "a=5", 1_000)  # same mtime and size, another inode
    staged.replace(path)
    assert rules() == {"a": 5}


def test_an_unchanged_settled_file_is_not_parsed_again(tmp_path: Path) -> None:
    path = tmp_path / "rules"
    write(path, "a=1", 1_000)
    parsed: list[str] = []

    def counting(text: str) -> dict[str, int]:
        parsed.append(text)
        return parse(text)

    rules = ReloadingFile(path, counting, "rules", interval_s=0)
    for _ in range(3):
        assert rules() == {"a": 1}
    os.utime(path, ns=(2_000, 2_000))  # touched, content the same
    assert rules() == {"a": 1}
    assert parsed == ["a=1"]


def test_a_deleted_file_keeps_the_last_good_value(tmp_path: Path) -> None:
    path = tmp_path / "rules"
    write(path, "a=1", 1_000)
    rules = ReloadingFile(path, parse, "rules", interval_s=0)
    path.unlink()
    assert rules() == {"a": 1}
    path.write_text("a=4")  # may reuse the inode and size; its mtime is now
    assert rules() == {"a": 4}
