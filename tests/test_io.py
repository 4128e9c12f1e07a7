"""core/io.py: THE atomic writer (temp file in the target's folder, fsync, rename, folder fsync), its disk-full
line, and a scan proving no other module renames a temp file into place itself."""

from __future__ import annotations

import ast
import errno
import json
import os
import stat
from pathlib import Path

import pytest

import core.io as IO
from core.errors import StorageError

REPO = Path(__file__).resolve().parents[1]

# The only renames / temp files outside core/io.py: (module, enclosing function) -> why it is not a file write.
ALLOWED = {
    ("core/data/synthetic.py", "_atomic_generate"): "swaps a whole generated dataset FOLDER into place",
    ("core/runs/common.py", "usable_checkpoint"): "moves an existing corrupt checkpoint aside (writes nothing)",
}
_FUNCS = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("shutil", "move"), ("os", "fsync"),
          ("tempfile", "mkstemp"), ("tempfile", "NamedTemporaryFile"), ("tempfile", "mktemp")}


def _rename_calls(tree: ast.AST):
    """(function name, line, call text) of every rename / temp-file / fsync call in a module."""
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node

    def owner(node):
        while node in parents:
            node = parents[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                return node.name
        return "<module>"

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = None
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and (f.value.id, f.attr) in _FUNCS:
            name = f"{f.value.id}.{f.attr}"
        elif isinstance(f, ast.Name) and f.id in {"mkstemp", "NamedTemporaryFile", "fsync"}:
            name = f.id
        elif (isinstance(f, ast.Attribute) and f.attr in ("replace", "rename") and len(node.args) == 1
              and not node.keywords and not isinstance(f.value, ast.Constant)):
            name = f".{f.attr}(1 arg)"  # Path.replace / Path.rename (str.replace takes two arguments)
        if name:
            yield owner(node), node.lineno, name


def test_every_atomic_write_goes_through_core_io():
    found = []
    for top in ("core", "analysis", "experiments"):
        for py in sorted((REPO / top).rglob("*.py")):
            rel = py.relative_to(REPO).as_posix()
            if rel == "core/io.py":
                continue
            for func, line, name in _rename_calls(ast.parse(py.read_text(encoding="utf-8"))):
                if (rel, func) not in ALLOWED:
                    found.append(f"{rel}:{line} {name} in {func}()")
    assert not found, ("write files atomically with core.io (atomic_write / atomic_write_bytes / _text / _json / "
                       "atomic_save_figure), not by hand: " + "; ".join(found))
    # the allow-list names code that still exists (an entry outliving its code would hide a new one)
    for rel, func in ALLOWED:
        calls = list(_rename_calls(ast.parse((REPO / rel).read_text(encoding="utf-8"))))
        assert any(f == func for f, _, _ in calls), f"{rel} {func}() no longer renames anything: drop it from ALLOWED"


def test_the_scan_sees_hand_written_renames():
    src = ("import os, tempfile\nfrom pathlib import Path\n"
           "def w(p):\n    fd, t = tempfile.mkstemp()\n    os.replace(t, p)\n    Path(t).replace(p)\n"
           "    'a'.replace('a', 'b')\n")
    assert [(f, n) for f, _, n in _rename_calls(ast.parse(src))] == [
        ("w", "tempfile.mkstemp"), ("w", "os.replace"), ("w", ".replace(1 arg)")]


def test_atomic_writers_write_whole_readable_files(tmp_path):
    p = IO.atomic_write_text(tmp_path / "sub" / "a.txt", "héllo\n")
    assert p.read_bytes() == "héllo\n".encode()
    mode = stat.S_IMODE(p.stat().st_mode)
    assert mode == 0o666 & ~IO._umask()  # not mkstemp's 0600
    IO.atomic_write_json(tmp_path / "b.json", {"x": [1, 2], "p": Path("/q")}, default=str)
    assert (tmp_path / "b.json").read_text().endswith("}\n")
    assert json.loads((tmp_path / "b.json").read_text()) == {"x": [1, 2], "p": "/q"}
    IO.atomic_write_bytes(tmp_path / "c.bin", memoryview(b"\x00\x01" * 5000))
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01" * 5000
    assert sorted(q.relative_to(tmp_path).as_posix() for q in tmp_path.rglob("*")) == \
        ["b.json", "c.bin", "sub", "sub/a.txt"]  # no temp file left


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    p = IO.atomic_write_text(tmp_path / "m.json", "old")

    def boom(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        IO.atomic_write(p, boom)
    assert p.read_text() == "old" and [q.name for q in tmp_path.iterdir()] == ["m.json"]


def test_disk_full_is_one_storage_line_that_is_still_an_oserror(tmp_path, monkeypatch):
    p = IO.atomic_write_bytes(tmp_path / "last.ckpt", b"old")

    def full(fd, data):
        os.write(fd, bytes(data)[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IO, "_write_all", full)
    with pytest.raises(StorageError) as info:
        IO.atomic_write_bytes(p, b"x" * 3 * 2**20, what="the checkpoint")
    e = info.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename == str(p)
    assert str(e).startswith(f"no space left on the device holding {tmp_path}: writing the checkpoint needs 3.0 MB")
    assert "\n" not in str(e) and "rerun the same command" in str(e)
    with pytest.raises(OSError, match="writing a.txt needs 0.0 MB \\("):  # callers catching OSError still catch it
        IO.atomic_write_text(tmp_path / "a.txt", "text")
    assert p.read_bytes() == b"old" and [q.name for q in tmp_path.iterdir()] == ["last.ckpt"]


def test_writer_that_replaces_the_temp_file_is_synced_and_kept(tmp_path):
    """A download writes its own temp file and moves it over ours (torch.hub): the result is still published."""
    def download(tmp):
        other = Path(tmp).with_name("other")
        other.write_bytes(b"weights")
        other.replace(tmp)  # what torch.hub.download_url_to_file's shutil.move does

    assert IO.atomic_write(tmp_path / "w.pth", download, ".pth").read_bytes() == b"weights"
    assert [q.name for q in tmp_path.iterdir()] == ["w.pth"]


def test_figures_keep_their_format(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1, 1))
    FigureCanvasAgg(fig)
    fig.add_subplot().plot([0, 1])
    assert IO.atomic_save_figure(fig, tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert IO.atomic_save_figure(fig, tmp_path / "f.pdf").read_bytes()[:4] == b"%PDF"
    assert sorted(q.name for q in tmp_path.iterdir()) == ["f.pdf", "f.png"]


def test_weights_download_is_checked_before_it_is_published(tmp_path, monkeypatch):
    import torch

    import core.weights as W
    from core.errors import WeightsError

    spec = W.WEIGHT_SPECS[("dino", "resnet50")]
    dst = W.local_path(spec, tmp_path)

    def good(url, path, progress=True):
        torch.save({"w": torch.ones(2)}, path)

    monkeypatch.setattr(torch.hub, "download_url_to_file", good)
    assert W.fetch(spec, tmp_path) == dst and torch.load(dst, weights_only=True)["w"].sum() == 2
    assert [q.name for q in dst.parent.iterdir()] == [dst.name]
    dst.unlink()

    def unsafe(url, path, progress=True):  # a pickle that would run code on load
        Path(path).write_bytes(b"\x80\x04cos\nsystem\n.")

    monkeypatch.setattr(torch.hub, "download_url_to_file", unsafe)
    with pytest.raises(WeightsError):
        W.fetch(spec, tmp_path)
    assert list(dst.parent.iterdir()) == []  # nothing published, no temp left
