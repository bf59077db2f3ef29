"""Outputs packing and work-dir removal cope with trees deeper than Python recurses."""

from __future__ import annotations

import os
import sys
import tarfile
from pathlib import Path

from scaleq.worker.transfer import pack_outputs, remove_tree


def deep_tree(root: Path, depth: int) -> Path:
    """``root/d/d/…/d/leaf.txt``, ``depth`` directories down, made with relative steps (short paths each time)."""
    root.mkdir()
    here = os.getcwd()
    try:
        os.chdir(root)
        for _ in range(depth):
            os.mkdir("d")
            os.chdir("d")
        Path("leaf.txt").write_text("deep")
    finally:
        os.chdir(here)
    return root


def test_a_tree_deeper_than_the_recursion_limit_is_packed_and_removed(tmp_path: Path) -> None:
    depth = sys.getrecursionlimit() + 100
    outputs = deep_tree(tmp_path / "outputs", depth)
    (outputs / "top.txt").write_text("top")
    (outputs / "link").symlink_to("/etc/passwd")  # never followed, never packed
    assert pack_outputs(outputs, tmp_path / "out.tar")
    with tarfile.open(tmp_path / "out.tar") as t:
        names = sorted(t.getnames())
    assert names == ["/".join(["d"] * depth + ["leaf.txt"]), "top.txt"]
    remove_tree(outputs)
    assert not outputs.exists()


def test_remove_tree_of_a_missing_path_and_of_a_plain_tree(tmp_path: Path) -> None:
    remove_tree(tmp_path / "missing")  # nothing there: nothing to do
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "f").write_text("x")
    remove_tree(kept)
    assert not kept.exists()


def test_a_tree_whose_paths_pass_path_max_is_packed_whole_and_removed_whole(tmp_path: Path) -> None:
    depth = 2100  # "d/" * 2100: 4,200 characters, past Linux's PATH_MAX (4096)
    outputs = deep_tree(tmp_path / "outputs", depth)
    assert pack_outputs(outputs, tmp_path / "out.tar")
    with tarfile.open(tmp_path / "out.tar") as t:
        (member,) = t.getmembers()
        assert member.name == "/".join(["d"] * depth + ["leaf.txt"])
        assert t.extractfile(member).read() == b"deep"  # type: ignore[union-attr]
    remove_tree(outputs)
    assert not outputs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.tar"]  # nothing left behind


def test_hard_links_are_packed_as_links_to_the_first_name(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "a").write_bytes(b"bytes")
    os.link(outputs / "a", outputs / "b")
    assert pack_outputs(outputs, tmp_path / "out.tar")
    with tarfile.open(tmp_path / "out.tar") as t:
        a, b = t.getmembers()
        assert (a.name, a.isfile(), b.name, b.islnk(), b.linkname) == ("a", True, "b", True, "a")


def test_no_files_no_archive(tmp_path: Path) -> None:
    (tmp_path / "outputs" / "empty").mkdir(parents=True)
    assert not pack_outputs(tmp_path / "outputs", tmp_path / "out.tar")
    assert not (tmp_path / "out.tar").exists()
    assert not pack_outputs(tmp_path / "missing", tmp_path / "out.tar")
