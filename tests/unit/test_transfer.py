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
