"""Reliability and security (docs/reliability.md): the bad-input matrix at the CLI level, corrupt files in a
run, and the security checks.

Every bad input must end in ONE line on stderr (`twinseg: error: <what, where, how to fix>`), exit
status 2, no traceback, and nothing in the output folder that could pass for a result
(metrics.json, backbone.pt, model.pt, history.csv, summary.json). The CLIs' `main(argv)` are called
in-process (wrapped by `core.cli.guard` as their `__main__` does) to keep this file fast; two cases
run as real subprocesses to prove the end-to-end behaviour (no traceback from inside a Lightning fit).

Cases covered elsewhere at the CLI level (not repeated here): tests/test_segment_run.py (unknown
head / evaluation / flag, fusion on a CNN, non-numeric epochs, missing data root, checkpoint of
another architecture), tests/test_pretrain.py (unknown backbone, negative lambd, non-numeric
epochs, missing data root), tests/test_grid.py (unknown / missing grid file, negative grid value,
--resume on a non-grid folder), tests/test_data_synthetic.py, tests/test_report.py. The grid's
fault injection (killed twice, resumed) is tests/test_grid.py::test_resume_after_driver_killed_twice.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from core.cli import guard  # noqa: E402

RESULT_FILES = ("metrics.json", "backbone.pt", "model.pt", "history.csv", "summary.json", "summary.csv")


# ============================================================================ fixtures
@pytest.fixture(scope="module")
def base_voc(tmp_path_factory) -> Path:
    """8 train / 4 val, 32 px: the pristine dataset every variant is copied from."""
    from core.data.synthetic import generate_voc

    return generate_voc(tmp_path_factory.mktemp("rel_voc"), n_train=8, n_val=4, size=32, seed=0)


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory) -> Path:
    from core.models.registry import create_backbone
    from core.weights import export_backbone

    return export_backbone(create_backbone("resnet_tiny"), tmp_path_factory.mktemp("rel_ck") / "backbone.pt")


class _Evil:
    """Unpickling this runs code (creates a marker file): must never happen."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _voc_dir(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2012"


def _first_id(root: Path, split: str = "train") -> str:
    return (_voc_dir(root) / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()[0]


# dataset mutations: (root) -> (path that the message must name)
def _empty_list(split):
    def f(root):
        p = _voc_dir(root) / "ImageSets" / "Segmentation" / f"{split}.txt"
        p.write_text("")
        return p
    return f


def _corrupt_jpeg(root):
    p = _voc_dir(root) / "JPEGImages" / f"{_first_id(root)}.jpg"
    p.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    return p


def _truncated_png(root):
    p = _voc_dir(root) / "SegmentationClass" / f"{_first_id(root)}.png"
    p.write_bytes(p.read_bytes()[:60])
    return p


def _mask_out_of_range(root):
    p = _voc_dir(root) / "SegmentationClass" / f"{_first_id(root)}.png"
    m = np.array(Image.open(p))
    m[:4, :4] = 50  # not a VOC class id (0..20) nor void (255)
    im = Image.fromarray(m, mode="P")
    im.putpalette(Image.open(p).getpalette())
    im.save(p)
    return p


def _size_mismatch(root):
    p = _voc_dir(root) / "SegmentationClass" / f"{_first_id(root)}.png"
    src = Image.open(p)
    small = src.resize((16, 16), Image.NEAREST)
    small.putpalette(src.getpalette())
    small.save(p)
    return p


def _no_layout(root):
    shutil.rmtree(root / "VOCdevkit")
    (root / "photos").mkdir()
    (root / "photos" / "a.jpg").write_bytes(b"x")
    return root


MUTATIONS = {
    "good": lambda root: root,
    "no_layout": _no_layout,
    "empty_train": _empty_list("train"),
    "empty_val": _empty_list("val"),
    "corrupt_jpeg": _corrupt_jpeg,
    "truncated_png": _truncated_png,
    "mask_out_of_range": _mask_out_of_range,
    "size_mismatch": _size_mismatch,
}


class Ctx:
    """Paths a case may refer to: {voc}, {named} (the path the message must name), {ckpt}, {evil},
    {empty}, {out}, {coco}."""

    def __init__(self, tmp: Path, base_voc: Path, resnet_ckpt: Path, dataset: str):
        self.tmp = tmp
        self.voc = tmp / "voc"
        shutil.copytree(base_voc, self.voc)
        self.named = MUTATIONS[dataset](self.voc)
        self.ckpt = resnet_ckpt
        self.empty = tmp / "empty"
        self.empty.mkdir()
        self.out = tmp / "out"
        self.coco = tmp / "coco"  # COCO-Stuff root with images/ but no stuffthingmaps
        (self.coco / "images" / "train2017").mkdir(parents=True)
        (self.coco / "images" / "val2017").mkdir(parents=True)
        self.marker = tmp / "pwned"
        self.evil = tmp / "evil.pt"
        torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(self.marker)}, self.evil)
        self.afile = tmp / "afile"  # a file where a folder is expected
        self.afile.write_text("not a folder")
        self.plain = tmp / "plain.pt"  # pickle.dump, not torch.save
        import pickle

        self.plain.write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
        self.nan = tmp / "nan" / "backbone.pt"  # a diverged run's export: NaN weights
        sd = torch.load(resnet_ckpt, map_location="cpu", weights_only=True)
        first = next(k for k, v in sd["state_dict"].items() if v.is_floating_point())
        sd["state_dict"][first] = torch.full_like(sd["state_dict"][first], float("nan"))
        self.nan.parent.mkdir()
        torch.save(sd, self.nan)

    def fill(self, s: str) -> str:
        return s.format(voc=self.voc, named=self.named, ckpt=self.ckpt, evil=self.evil, empty=self.empty,
                        out=self.out, coco=self.coco, tmp=self.tmp, ckdir=self.ckpt.parent, afile=self.afile,
                        nan=self.nan, plain=self.plain)


def assert_clean_failure(rc, err: str, out: str, needles, out_dir: Path):
    """Exit 2, exactly one `twinseg: error:` line on stderr naming `needles`, no traceback, no result."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, f"exit {rc!r}\n{err[-3000:]}"
    assert "Traceback" not in err + out, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("twinseg: error: "), f"stderr: {err[-3000:]!r}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    if out_dir.exists():
        left = [p for p in out_dir.rglob("*") if p.name in RESULT_FILES]
        assert not left, f"result-like files written: {left}"


def _call(fn, argv, capsys):
    capsys.readouterr()
    try:
        rc = fn(argv)
    except SystemExit as e:
        rc = e.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _pretrain_main():
    import experiments.pretrain as P

    return guard(P.main)


def _segment_main():
    import experiments.segment as S

    return S.main  # already @guard


def _grid_main():
    import experiments.grid as G

    return G.main  # already @guard


# ============================================================================ the matrix (in-process)
PT = ["--data-root", "{voc}", "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--projector", "32-32",
      "--wandb", "disabled", "--no-progress", "--device", "cpu", "--output", "{out}"]
SEG = ["--data-root", "{voc}", "--image-size", "32", "--batch-size", "4", "--epochs", "1", "--backbone",
       "resnet_tiny", "--head", "linear", "--wandb", "disabled", "--no-progress", "--device", "cpu",
       "--output", "{out}"]


def _with(base, **flags):
    """base argv with flags replaced / added (`backbone="x"` -> --backbone x)."""
    argv = list(base)
    for k, v in flags.items():
        flag = "--" + k.replace("_", "-")
        if flag in argv:
            argv[argv.index(flag) + 1] = v
        else:
            argv += [flag, v]
    return argv


def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_NO_SERVER = f"http://127.0.0.1:{_closed_port()}"  # a wandb server that is not there (no network)

# (id, cli, dataset mutation, argv, needles (formatted with Ctx), extra env)
CASES = [
    # ---- datasets: layout, split lists (caught before anything is written)
    ("pretrain-voc-wrong-layout", "pretrain", "no_layout", PT, ["no VOC 2012 layout under {voc}", "VOCdevkit"], {}),
    ("segment-voc-wrong-layout", "segment", "no_layout", SEG, ["no VOC 2012 layout under {voc}"], {}),
    ("segment-coco-wrong-layout", "segment", "good", _with(SEG, dataset="coco_stuff", data_root="{coco}"),
     ["COCO-Stuff folder {coco}/stuffthingmaps_trainval2017/train2017 is missing"], {}),
    ("pretrain-empty-train-list", "pretrain", "empty_train", PT, ["split list {named} is empty"], {}),
    ("segment-empty-val-list", "segment", "empty_val", SEG, ["split list {named} is empty"], {}),
    # ---- file contents (found while loading: during the k-NN baseline / the first epoch)
    ("pretrain-corrupt-jpeg", "pretrain", "corrupt_jpeg", PT, ["image {named} is corrupt or truncated",
                                                               "corrupt_policy=skip"], {}),
    ("segment-corrupt-jpeg", "segment", "corrupt_jpeg", SEG, ["image {named} is corrupt or truncated"], {}),
    ("segment-truncated-png", "segment", "truncated_png", SEG, ["mask {named} is corrupt or truncated"], {}),
    ("segment-mask-out-of-range", "segment", "mask_out_of_range", SEG,
     ["mask {named} has values outside the label space {{0..20, 255}}: 50"], {}),
    ("segment-size-mismatch", "segment", "size_mismatch", SEG,
     ["mask {named} is 16x16 but image", "must have the same size"], {}),
    # ---- names
    ("pretrain-unknown-method", "pretrain", "good", _with(PT, method="simclr"), ["method='simclr'", "barlow_twins"], {}),
    ("pretrain-unknown-source", "pretrain", "good", _with(PT, source="imagenet21k"), ["source='imagenet21k'"], {}),
    ("segment-unknown-backbone", "segment", "good", _with(SEG, backbone="vit_huge"),
     ["backbone='vit_huge'", "resnet_tiny"], {}),
    ("segment-unknown-source", "segment", "good", _with(SEG, source="imagenet21k"), ["source='imagenet21k'"], {}),
    ("segment-unknown-dataset", "segment", "good", _with(SEG, dataset="ade20k"), ["dataset='ade20k'"], {}),
    # ---- sizes
    ("pretrain-image-size-vs-patch", "pretrain", "good", _with(PT, image_size="36"),
     ["image size 36x36 is not divisible by patch size 8 of vit_nano_patch8"], {}),
    ("segment-image-size-vs-patch", "segment", "good", _with(SEG, backbone="vit_nano_patch8", image_size="36"),
     ["image size 36x36 is not divisible by patch size 8"], {}),
    # ---- weights
    ("pretrain-missing-weights-offline", "pretrain", "good",
     _with(PT, backbone="vit_small_patch16", source="dino", method="dino"),
     ["dino weights for vit_small_patch16 not found at {empty}/dino/", "python -m core.weights fetch"],
     {"TWINSEG_WEIGHTS": "{empty}", "TWINSEG_OFFLINE": "1"}),
    ("segment-missing-weights-offline", "segment", "good", _with(SEG, backbone="vit_tiny_patch16", source="imagenet"),
     ["imagenet weights for vit_tiny_patch16 not found at {empty}/imagenet/", "(offline)"],
     {"TWINSEG_WEIGHTS": "{empty}", "TWINSEG_OFFLINE": "1"}),
    ("pretrain-checkpoint-other-arch", "pretrain", "good", _with(PT, source="checkpoint:{ckpt}"),
     ["checkpoint {ckpt} holds a resnet_tiny backbone but backbone=vit_nano_patch8"], {}),
    ("segment-pickle-with-code", "segment", "good", _with(SEG, source="checkpoint:{evil}"),
     ["{evil} is not a plain weights file (refusing to unpickle code)", "trusted=True"], {}),
    ("segment-checkpoint-is-a-folder", "segment", "good", _with(SEG, source="checkpoint:{ckdir}"),
     ["weights path {ckdir} is a folder, not a file", "pass the file inside it: {ckdir}/backbone.pt"], {}),
    ("segment-checkpoint-nan-weights", "segment", "good", _with(SEG, source="checkpoint:{nan}"),
     ["weights {nan} hold 864 NaN/inf values (1 tensors, first conv1.weight)", "diverged run", "lower lr"], {}),
    ("segment-checkpoint-plain-pickle", "segment", "good", _with(SEG, source="checkpoint:{plain}"),
     ["{plain} is a plain Python pickle, not a torch weights file (torch.save)", "torch.save(state_dict, path)"], {}),
    # ---- the output folder
    ("pretrain-output-is-a-file", "pretrain", "good", _with(PT, output="{afile}"),
     ["--output {afile} is a file, not a folder"], {}),
    ("segment-output-under-a-file", "segment", "good", _with(SEG, output="{afile}/run"),
     ["--output {afile}/run: {afile} is a file, not a folder"], {}),
    ("segment-wandb-online-without-key", "segment", "good", _with(SEG, wandb="online"),
     ["wandb=online needs wandb credentials", "WANDB_API_KEY", "--wandb offline"], {"NETRC": "{empty}/netrc"}),
    ("pretrain-wandb-online-without-key", "pretrain", "good", _with(PT, wandb="online"),
     ["wandb=online needs wandb credentials"], {"NETRC": "{empty}/netrc"}),
    ("segment-wandb-online-no-network", "segment", "good", _with(SEG, wandb="online"),
     [f"wandb=online: the wandb server {_NO_SERVER} did not start the run within 2 s (", "--wandb offline",
      "`wandb sync {out}/wandb/offline-run-*` later"],
     {"WANDB_API_KEY": "a" * 40, "WANDB_BASE_URL": _NO_SERVER, "TWINSEG_WANDB_INIT_TIMEOUT": "2"}),
    ("pretrain-wandb-online-short-key", "pretrain", "good", _with(PT, wandb="online"),
     ["WANDB_API_KEY is not a wandb API key (API key must have 40+ characters, has 5)", "--wandb offline"],
     {"WANDB_API_KEY": "short"}),
    # ---- out-of-range numbers: refused with the field, the value and the bounds, before anything is written
    ("pretrain-seed-negative", "pretrain", "good", _with(PT, seed="-1"),
     ["seed=-1 is out of range: it must be >= 0 and <= 4294967295"], {}),
    ("segment-seed-2-to-the-32", "segment", "good", _with(SEG, seed="4294967296"),
     ["seed=4294967296 is out of range", "<= 4294967295"], {}),
    ("segment-batch-size-10e21", "segment", "good", _with(SEG, batch_size=str(10**21)),
     [f"batch_size={10**21} is out of range: it must be >= 1 and <= 65536"], {}),
    ("segment-lr-overflow", "segment", "good", _with(SEG, lr="1e308"),
     ["lr=1e+308 is out of range: it must be > 0 and <= 1e+06"], {}),
    ("pretrain-lr-overflow", "pretrain", "good", _with(PT, lr="1e308"), ["lr=1e+308 is out of range"], {}),
    ("segment-weight-decay-1e30", "segment", "good", _with(SEG, weight_decay="1e30"),
     ["weight_decay=1e+30 is out of range: it must be >= 0 and <= 100"], {}),
    ("pretrain-epochs-10e30", "pretrain", "good", _with(PT, epochs=str(10**30)),
     [f"epochs={10**30} is out of range: it must be >= 1 and <= 100000"], {}),
    ("segment-max-iters-absurd", "segment", "good", _with(SEG, max_iters=str(10**12)),
     ["max_iters=1000000000000 is out of range", "<= 100000000"], {}),
]


@pytest.mark.parametrize("cid,cli,dataset,argv,needles,env", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(cid, cli, dataset, argv, needles, env, tmp_path, base_voc, resnet_ckpt, capsys,
                          monkeypatch):
    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, dataset)
    monkeypatch.delenv("TWINSEG_TRACEBACK", raising=False)
    monkeypatch.delenv("TWINSEG_ONLINE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, ctx.fill(v))
    fn = {"pretrain": _pretrain_main, "segment": _segment_main}[cli]()
    rc, out, err = _call(fn, [ctx.fill(a) for a in argv], capsys)
    assert_clean_failure(rc, err, out, [ctx.fill(n) for n in needles], ctx.out)
    assert not ctx.marker.exists()  # no pickled code ran


# ---------------------------------------------------------------------------- grid files (no Ray: fails first)
TINY = {
    "name": "tiny", "wandb": "disabled", "max_concurrent": 1, "retries": 0,
    "data": {"image_size": 32, "synthetic_n_train": 8, "synthetic_n_val": 4},
    "stage1": {"resources": {"cpu": 1, "gpu": 0},
               "settings": {"device": "cpu", "epochs": 1, "batch_size": 4, "projector": [32, 32]},
               "axes": {"backbone": ["vit_nano_patch8", "resnet_tiny"], "lambd": [0.0051], "method": ["barlow_twins"]}},
    "stage2": {"resources": {"cpu": 1, "gpu": 0}, "settings": {"device": "cpu", "epochs": 1, "batch_size": 4},
               "evaluations": [{"evaluation": "E1", "from": {"backbone": "resnet_tiny"}},
                               {"evaluation": "E2", "from": {"backbone": "vit_nano_patch8"}}]},
}


def _set(doc: dict, path: str, value):
    keys = path.split(".")
    d = doc
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if value is _DEL:
        del d[keys[-1]]
    elif isinstance(d, list):
        d[int(keys[-1])] = value
    else:
        d[keys[-1]] = value


_DEL = object()

GRID_CASES = [
    ("non-numeric-lambd", [("stage1.axes.lambd", [0.0051, "abc"])], ["g.yaml: stage1.axes.lambd[1]='abc'"], {}),
    ("non-numeric-epochs", [("stage2.settings.epochs", "ten")], ["g.yaml: stage2.settings.epochs='ten' must be an integer"],
     {}),
    ("negative-batch", [("stage1.settings.batch_size", -4)], ["g.yaml: stage1.settings.batch_size=-4"], {}),
    ("unknown-backbone", [("stage1.axes.backbone", ["vit_huge"])], ["g.yaml: stage1.axes.backbone[0]='vit_huge'"], {}),
    ("unknown-head", [("stage2.settings.head", "unet")], ["g.yaml: stage2.settings.head='unet' is not known"], {}),
    ("fusion-on-cnn", [("stage2.evaluations.0.evaluation", "E3")], ["g.yaml: stage2.evaluations[0]", "is a CNN"], {}),
    ("image-size-vs-patch", [("data.image_size", 36)], ["g.yaml: data.image_size=36", "patch size 8"], {}),
    ("voc-wrong-layout", [("data.root", "{empty}")], ["no VOC 2012 layout under {empty}"], {}),
    ("voc-empty-train-list", [("data.root", "{voc}")], ["split list {named} is empty"], {"dataset": "empty_train"}),
    ("imagefolder-empty", [("data.dataset", "imagefolder"), ("data.root", "{empty}"), ("stage2", _DEL)],
     ["no images", "found under {empty}"], {}),
    ("seed-out-of-range", [("stage1.axes.seed", [0, -1])], ["g.yaml: stage1.axes.seed[1]=-1",
                                                            "<= 4294967295"], {}),
    ("missing-weights-offline", [("stage1.axes.backbone", ["vit_small_patch16"]), ("stage1.axes.source", ["dino"]),
                                 ("stage2", _DEL)],
     ["dino weights for vit_small_patch16 not found at {empty}/dino/", "python -m core.weights fetch"],
     {"env": {"TWINSEG_WEIGHTS": "{empty}", "TWINSEG_OFFLINE": "1"}}),
]


@pytest.mark.parametrize("cid,changes,needles,opts", GRID_CASES, ids=[c[0] for c in GRID_CASES])
def test_bad_grid_file_matrix(cid, changes, needles, opts, tmp_path, base_voc, resnet_ckpt, capsys, monkeypatch):
    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, opts.get("dataset", "good"))
    monkeypatch.delenv("TWINSEG_TRACEBACK", raising=False)
    monkeypatch.delenv("TWINSEG_ONLINE", raising=False)
    monkeypatch.setenv("TWINSEG_DATA_DIR", str(tmp_path / "data"))  # a generated dataset stays in tmp_path
    for k, v in opts.get("env", {}).items():
        monkeypatch.setenv(k, ctx.fill(v))
    doc = json.loads(json.dumps(TINY))
    for path, value in changes:
        _set(doc, path, ctx.fill(value) if isinstance(value, str) else value)
    grid = tmp_path / "g.yaml"
    grid.write_text(yaml.safe_dump(doc, sort_keys=False))
    rc, out, err = _call(_grid_main(), ["--grid", str(grid), "--output", str(ctx.out), "--no-dashboard",
                                        "--no-report"], capsys)
    assert_clean_failure(rc, err, out, [ctx.fill(n) for n in needles], ctx.out)
    assert not ctx.out.exists()  # caught before the results folder is made


def test_report_on_corrupt_summary_is_one_line(tmp_path, capsys):
    """analysis/report.py on a results folder whose summary.json is garbage."""
    import analysis.report as R

    res = tmp_path / "res"
    (res / "trials").mkdir(parents=True)
    (res / "summary.json").write_text("{not json")
    rc, out, err = _call(guard(R.main), [str(res), "--out", str(tmp_path / "rep")], capsys)
    assert_clean_failure(rc, err, out, ["summary.json"], tmp_path / "rep")
    assert not (tmp_path / "rep" / "report.md").exists()


def test_synthetic_cli_bad_size_is_one_line(tmp_path, capsys):
    from core.data import synthetic

    rc, out, err = _call(guard(synthetic.main), ["--out", str(tmp_path / "d"), "--size", "-5"], capsys)
    assert_clean_failure(rc, err, out, ["size"], tmp_path / "d")
    assert not (tmp_path / "d" / "VOCdevkit").exists()


# ============================================================================ end to end (subprocess)
def _subprocess(script: str, argv: list[str], env_extra: dict, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("TWINSEG_TRACEBACK", "PYTHONWARNINGS")}
    env.update({"WANDB_MODE": "disabled", "PYTHONPATH": str(REPO), **env_extra})
    return subprocess.run([sys.executable, str(REPO / script), *argv], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("script,dataset,argv,needles", [
    # an error raised inside Lightning's fit (a DataLoader batch): still one line, no Lightning INFO lines
    ("experiments/segment.py", "mask_out_of_range", SEG, ["mask {named} has values outside the label space"]),
    ("experiments/pretrain.py", "good", _with(PT, source="checkpoint:{evil}"), ["refusing to unpickle code"]),
], ids=["segment-bad-mask-mid-fit", "pretrain-pickle-with-code"])
def test_end_to_end_subprocess_one_line(script, dataset, argv, needles, tmp_path, base_voc, resnet_ckpt):
    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, dataset)
    r = _subprocess(script, [ctx.fill(a) for a in argv], {}, tmp_path)
    assert_clean_failure(r.returncode, r.stderr, r.stdout, [ctx.fill(n) for n in needles], ctx.out)
    assert not ctx.marker.exists()


# ============================================================================ corrupt files in a long run
def test_corrupt_image_skip_policy_completes_and_counts(tmp_path, base_voc, resnet_ckpt, capsys, caplog):
    """corrupt_policy=skip: the run finishes and metrics.json counts the skipped file; the same data
    with the default policy (stop) is a one-line error naming the file (matrix case segment-corrupt-jpeg)."""
    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, "corrupt_jpeg")
    argv = [ctx.fill(a) for a in _with(SEG, epochs="2", corrupt_policy="skip")]
    rc, out, err = _call(_segment_main(), argv, capsys)
    assert rc == 0, err[-3000:]
    m = json.loads((ctx.out / "metrics.json").read_text())
    assert m["skipped_files"] == 1  # counted once, not once per epoch
    logged = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "skipping" in r.getMessage()]
    assert len(logged) == 1 and str(ctx.named) in logged[0]  # and logged once, naming the file
    bad = tmp_path / "bad"
    rc, out, err = _call(_segment_main(), [ctx.fill(a) for a in _with(SEG, corrupt_policy="maybe", output=str(bad))],
                         capsys)
    assert_clean_failure(rc, err, out, ["corrupt_policy='maybe'", "stop, skip"], bad)


# ============================================================================ security
SOURCE_DIRS = ("core", "experiments", "analysis")


def _py_files():
    for d in SOURCE_DIRS:
        yield from sorted((REPO / d).rglob("*.py"))


def test_no_config_string_becomes_code():
    """No eval/exec/compile of strings, no unsafe YAML or pickle loading anywhere in the code."""
    bad = re.compile(r"(?<![\w.])(eval|exec|compile|__import__)\s*\(|yaml\.(unsafe_)?load\s*\(|pickle\.loads?\s*\(|"
                     r"shell\s*=\s*True|os\.system\s*\(")
    hits = []
    for f in _py_files():
        for i, line in enumerate(f.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if bad.search(code) and "re.compile" not in code:
                hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)


def test_every_torch_load_is_weights_only():
    """torch.load always with weights_only=True, except the one explicit trusted=True branch."""
    hits = []
    for f in _py_files():
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if "torch.load(" in line and not line.lstrip().startswith(("#", "Safety", "``")):
                if "weights_only=True" not in line and "trusted=True only" not in line:
                    hits.append(f"{f.relative_to(REPO)}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
    import inspect

    from core.weights import load_source, read_weights_file

    for fn in (load_source, read_weights_file):  # the opt-out can only be named, never positional
        assert inspect.signature(fn).parameters["trusted"].kind is inspect.Parameter.KEYWORD_ONLY


def test_pickle_with_code_refused_and_trusted_opt_out(tmp_path):
    from core.errors import WeightsError
    from core.weights import read_weights_file

    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    torch.save({"x": _Evil(marker)}, path)
    with pytest.raises(WeightsError, match="refusing to unpickle code"):
        read_weights_file(path)
    assert not marker.exists()
    read_weights_file(path, trusted=True)  # the named opt-out really is the only way in
    assert marker.exists()


def test_grid_ray_dashboard_on_loopback():
    from experiments.engine.ray_backend import local_ray_init_kwargs

    kw = local_ray_init_kwargs(2, {"log_to_driver": False})
    assert kw["dashboard_host"] == "127.0.0.1" and kw["address"] == "local" and kw["num_cpus"] == 2
    assert kw["log_to_driver"] is False
    assert "0.0.0.0" not in json.dumps(kw)
    src = (REPO / "experiments" / "engine" / "ray_backend.py").read_text()
    assert not re.search(r"dashboard_host\s*=\s*['\"](?!127\.0\.0\.1)", src)  # no other host anywhere
    assert not re.search(r"RAY_AUTH_MODE\"?\]?\s*=\s*['\"]disabled", src)  # token auth never switched off


# ============================================================================ one run folder, one config, one writer
def _hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding `path`'s folder lock (core.folder_lock imports no torch: starts fast)."""
    code = ("import sys, time\nfrom core.folder_lock import folder_lock\n"
            "with folder_lock(sys.argv[1], 'pretrain run'):\n    print('held', flush=True)\n    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_on_a_folder_is_refused(tmp_path, base_voc, resnet_ckpt, capsys):
    """A run folder has one writer: a second pretrain / segment on a folder another live process holds
    gets one line naming the holder; the lock dies with its process (no stale lock)."""
    from core.folder_lock import folder_lock, is_locked

    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, "good")
    holder = _hold_lock(ctx.out)
    try:
        assert is_locked(ctx.out)
        for fn, argv in ((_pretrain_main(), PT), (_segment_main(), SEG)):
            rc, out, err = _call(fn, [ctx.fill(a) for a in argv], capsys)
            assert_clean_failure(rc, err, out, [f"{ctx.out} is in use by another pretrain run (pid {holder.pid}, "
                                                "started", "wait for it or use another --output"], ctx.out)
            assert not (ctx.out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert not is_locked(ctx.out)  # killed holder: the kernel dropped its lock
    with folder_lock(ctx.out, "segment run"), folder_lock(ctx.out, "grid trial"):  # re-entrant in one process
        assert not is_locked(ctx.out)


def _write_run(out: Path, cfg, metrics: Optional[dict] = None, ckpt: bool = False) -> None:
    from core.runs.identity import result_identity

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg.to_dict()))
    if metrics is not None:
        (out / "metrics.json").write_text(json.dumps({**metrics, "identity": result_identity(cfg)}))
    if ckpt:
        (out / "checkpoints").mkdir()
        (out / "checkpoints" / "last.ckpt").write_bytes(b"x")


def test_folder_with_another_config_refused_same_config_returned(tmp_path, base_voc, resnet_ckpt, capsys,
                                                                 monkeypatch):
    """finished + other config -> one line naming the fields (was: the old result, exit 0); finished +
    same config (bookkeeping fields aside) -> the old result, no training, even without a checkpoint;
    unfinished + other config -> refused (segment too); --overwrite clears the run's files only."""
    import experiments.pretrain as P
    import experiments.segment as S
    import core.runs.skeleton as skeleton

    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, "good")
    pt_argv = [ctx.fill(a) for a in PT]
    old = P.config_from_args(P.build_parser().parse_args(_with(pt_argv, lambd="0.5")))
    _write_run(ctx.out, old, {"stage": "pretrain", "knn_acc": 12.5})
    # DINO's registry defaults (lr, weight_decay) differ from Barlow Twins' too
    rc, out, err = _call(_pretrain_main(), _with(pt_argv, method="dino", backbone="resnet_tiny"), capsys)
    assert_clean_failure(rc, err, out, [f"{ctx.out} holds a finished run with a different config (fields "
                                        "backbone, barlow_twins.lambd, lr, method, weight_decay)", "--overwrite"], tmp_path / "none")
    assert json.loads((ctx.out / "metrics.json").read_text())["knn_acc"] == 12.5  # untouched

    def no_training(*a, **k):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(skeleton, "make_trainer", no_training)
    rc, out, err = _call(_pretrain_main(), _with(pt_argv, lambd="0.5", wandb="offline", keep_checkpoints="true"),
                         capsys)
    assert rc == 0 and "after 12.50%" in out, err[-2000:]

    seg_argv = [ctx.fill(a) for a in _with(SEG, output=str(tmp_path / "seg"))]
    _write_run(tmp_path / "seg", S.resolve_config(S.build_parser().parse_args(_with(seg_argv, lr="0.5"))), ckpt=True)
    rc, out, err = _call(_segment_main(), seg_argv, capsys)
    assert_clean_failure(rc, err, out, ["holds an unfinished run with a different config (fields lr)"], tmp_path / "seg")

    # --overwrite: the run's own files go, anything else in the folder stays; then the new run is done
    (ctx.out / "notes.txt").write_text("mine")
    (ctx.out / "logs" / "version_0").mkdir(parents=True)

    def fake_fit(run, out_dir, ident, **kw):
        assert not (out_dir / "metrics.json").exists() and not (out_dir / "logs" / "version_0").exists()
        atomic = skeleton.atomic_write_json
        atomic(out_dir / "config.json", run.cfg.to_dict())
        atomic(out_dir / "metrics.json", {"stage": "pretrain", "knn_acc": 50.0, "identity": ident})
        return {"stage": "pretrain", "knn_acc": 50.0}

    monkeypatch.setattr(skeleton, "_fit_and_write", fake_fit)
    rc, out, err = _call(_pretrain_main(), pt_argv + ["--overwrite"], capsys)
    assert rc == 0 and "after 50.00%" in out, err[-2000:]
    assert (ctx.out / "notes.txt").read_text() == "mine"
    assert json.loads((ctx.out / "config.json").read_text())["barlow_twins"]["lambd"] != 0.5


def test_read_only_output_is_one_line(tmp_path, base_voc, resnet_ckpt, capsys):
    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, "good")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode bits: use a read-only system folder instead
            ro = next((Path(p) for p in ("/sys/fs", "/proc/sys") if Path(p).is_dir() and not _can_mkdir(Path(p))),
                      None)
            if ro is None:
                pytest.skip("no read-only folder available to this user")
        rc, out, err = _call(_segment_main(), [ctx.fill(a) for a in _with(SEG, output=str(ro / "run"))], capsys)
        assert_clean_failure(rc, err, out, [str(ro / "run")], tmp_path / "none")
        assert re.search(r"not writable|permission denied|Operation not permitted|Read-only", err)
    finally:
        (tmp_path / "ro").chmod(0o755)


def _can_mkdir(p: Path) -> bool:
    try:
        (p / "twinseg-probe").mkdir()
    except OSError:
        return False
    (p / "twinseg-probe").rmdir()
    return True


# ============================================================================ divergence
def test_nan_loss_stops_the_run(tmp_path, base_voc, resnet_ckpt, capsys):
    """segment --lr 1e6 on a ViT, the largest lr accepted (--lr 1e20 is now refused as out of range) (was: NaN
    losses, exit 0, metrics.json with an mIoU, model.pt): one line with the step, the value and the likely cause;
    no metrics.json, no model.pt."""
    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, "good")
    rc, out, err = _call(_segment_main(), [ctx.fill(a) for a in _with(SEG, lr="1e6", backbone="vit_nano_patch8")],
                         capsys)
    assert_clean_failure(rc, err, out, ["training diverged:", "the learning rate (lr=1e+06) is likely too high; "
                                                              "lower --lr"], ctx.out)


def test_divergence_hint_names_the_likely_value():
    """The 'likely cause' of a diverged run names the value that is likely too high: a weight decay above 1 (was:
    the lr blamed for --weight-decay 1e30), else the lr."""
    from core.runs.common import lr_hint

    assert lr_hint(SegmentConfig_(weight_decay=50.0)) == ("the weight decay (weight_decay=50) is likely too high; "
                                                          "lower --weight-decay")
    assert lr_hint(SegmentConfig_(lr=0.5)) == "the learning rate (lr=0.5) is likely too high; lower --lr"


def SegmentConfig_(**kw):
    from core.config import SegmentConfig

    return SegmentConfig.from_dict({"backbone": "resnet_tiny", "head": "linear", **kw})


def test_read_only_data_cache_is_one_line(tmp_path, base_voc, resnet_ckpt, capsys, monkeypatch):
    """The generated dataset's cache (TWINSEG_DATA_DIR) on a read-only folder: one line naming it (was: an
    OSError [Errno 30] traceback)."""
    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, "good")
    ro = next((Path(p) for p in ("/proc/sys", "/sys/fs") if Path(p).is_dir() and not _can_mkdir(Path(p))), None)
    if ro is None:
        pytest.skip("no read-only folder available to this user")
    monkeypatch.setenv("TWINSEG_DATA_DIR", str(ro / "twinseg-cache"))
    argv = [ctx.fill(a) for a in SEG]
    argv = argv[:argv.index("--data-root")] + argv[argv.index("--data-root") + 2:]
    rc, out, err = _call(_segment_main(), argv, capsys)
    assert_clean_failure(rc, err, out, [f"cannot write the generated dataset to {ro / 'twinseg-cache'}",
                                        "TWINSEG_DATA_DIR"], ctx.out)


def test_non_finite_results_and_weights_are_errors():
    """The guards behind the one line: results (the linear-probe accuracy of diverged features...) and the
    trained weights must be finite; per-class lists may hold NaN (a class absent from val)."""
    from core.errors import NonFiniteError, TwinsegError
    from core.runs.common import check_finite_metrics
    from core.runs.skeleton import check_finite_weights

    assert issubclass(NonFiniteError, TwinsegError)
    check_finite_metrics({"mIoU": 12.0, "IoU": [float("nan"), 3.0], "val_loss": None})
    with pytest.raises(NonFiniteError, match=r"linear_probe_acc=nan.*lower --lr"):
        check_finite_metrics({"knn_acc": 3.0, "linear_probe_acc": float("nan")}, "lower --lr")
    m = torch.nn.Linear(2, 2)
    check_finite_weights(m)
    with torch.no_grad():
        m.bias[0] = float("inf")
    with pytest.raises(NonFiniteError, match="1 NaN/inf values in bias"):
        check_finite_weights(m)


# ============================================================================ checkpoints: atomic, checked, RNG
def test_checkpoint_write_is_atomic_and_disk_full_is_one_line(tmp_path, monkeypatch):
    """Checkpoints are written in their own folder (temp + fsync + rename: Lightning's fsspec path used a
    temp file in $TMPDIR and a cross-filesystem copy); a full disk leaves the previous checkpoint intact
    and says how much space is needed; an unreadable checkpoint is set aside, the run restarts."""
    import errno

    import core.io as IO
    import core.runs.common as C
    from core.errors import StorageError

    ck = tmp_path / "checkpoints" / "last.ckpt"
    io_ = C.make_checkpoint_io()
    io_.save_checkpoint({"epoch": 0, "w": torch.ones(1000)}, ck)
    assert C.checkpoint_problem(ck) is None and C.usable_checkpoint(tmp_path) == ck

    def full(fd, data):
        os.write(fd, bytes(data)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(IO, "_write_all", full)
    with pytest.raises(StorageError, match=r"no space left on the device holding .*checkpoints: writing the "
                                           r"checkpoint needs [0-9.]+ MB .*rerun the same command to resume"):
        io_.save_checkpoint({"epoch": 1, "w": torch.zeros(1000)}, ck)
    monkeypatch.undo()
    assert sorted(p.name for p in ck.parent.iterdir()) == ["last.ckpt"]  # no temp file left
    assert torch.load(ck, weights_only=True)["epoch"] == 0  # the previous checkpoint, intact

    ck.write_bytes(ck.read_bytes()[:200])  # what a kill during the old non-atomic copy left behind
    with pytest.warns(RuntimeWarning, match=r"last.ckpt is unreadable .*set aside as last.ckpt.corrupt-.*restarts "
                                            "from scratch"):
        assert C.usable_checkpoint(tmp_path) is None
    assert not ck.exists() and len(list(ck.parent.glob("last.ckpt.corrupt-*"))) == 1


@pytest.mark.parametrize("cli,base,artifact", [("pretrain", PT, "backbone.pt"), ("segment", SEG, "model.pt")])
def test_disk_full_at_the_exported_weights_is_one_line(cli, base, artifact, tmp_path, base_voc, resnet_ckpt,
                                                        capsys, monkeypatch):
    """The disk fills up while a finished run writes its weights, backbone.pt (pretrain) or model.pt (segment)
    (was: torch's `RuntimeError: [enforce fail at inline_container.cc ...]`, two tracebacks): exit 2, one line
    naming the folder and the MB needed, no temp file and nothing that could pass for a result."""
    import errno

    import core.io as IO

    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc/self/fd to tell which file a write goes to")
    write_all = IO._write_all

    def full(fd, data):  # only the temp file of the weights runs out of space; checkpoints and json files fit
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{artifact}."):
            os.write(fd, bytes(memoryview(data)[:100]))
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    monkeypatch.setattr(IO, "_write_all", full)
    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, "good")
    main = _pretrain_main() if cli == "pretrain" else _segment_main()
    rc, out, err = _call(main, [ctx.fill(a) for a in _with(base, backbone="resnet_tiny")], capsys)
    assert_clean_failure(rc, err, out, [f"no space left on the device holding {ctx.out}: writing {artifact} needs ",
                                        " MB", "rerun the same command to resume"], ctx.out)
    assert re.search(rf"writing {re.escape(artifact)} needs [0-9]+\.[0-9] MB \([0-9.]+ MB free\)", err), err
    assert not list(ctx.out.glob(f".{artifact}.*")), "temp file left behind"
    assert (ctx.out / "checkpoints" / "last.ckpt").is_file()  # the trained state stays for the rerun

    monkeypatch.undo()  # space freed: the rerun the line suggests finishes from that checkpoint
    rc, out, err = _call(main, [ctx.fill(a) for a in _with(base, backbone="resnet_tiny")], capsys)
    assert rc == 0 and "Traceback" not in err, err[-3000:]
    assert (ctx.out / artifact).is_file() and (ctx.out / "metrics.json").is_file()


def _kill_at(epoch: int, sig=None):
    from lightning.pytorch.callbacks import Callback
    import signal as _signal

    class KillAt(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == epoch:
                os.kill(os.getpid(), sig or _signal.SIGTERM)

    return KillAt()


RESULT_KEYS = ("knn_acc", "knn_acc_init", "linear_probe_acc", "final_loss", "dense_rank", "dense_local_var",
               "cc_diag_mean", "cc_offdiag_rms")


def test_sigterm_then_disk_full_then_resume_equals_uninterrupted(tmp_path, base_voc, capsys, monkeypatch):
    """SIGTERM mid-run (was: exit 0, nothing written): exit 143, one line saying how to continue, no
    result. The resume then hits a full disk at its checkpoint (one line, the previous checkpoint kept),
    and the next resume finishes with exactly the metrics of an uninterrupted run (RNG states are in the
    checkpoint); on success last.ckpt is deleted unless keep_checkpoints."""
    import errno

    import core.io as IO
    import core.runs.common as C
    from core.config import PretrainConfig
    from core.runs.pretrain import run_pretrain

    cfg = PretrainConfig.from_dict(dict(backbone="resnet_tiny", projector=(32, 32), batch_size=4, epochs=2,
                                        warmup_epochs=0.5, optimizer="adamw", wandb="disabled", device="cpu",
                                        gpu_augment=False, data=dict(root=str(base_voc), image_size=32)))
    ref = run_pretrain(cfg.replace(keep_checkpoints=True), tmp_path / "ref", progress=False)
    assert (tmp_path / "ref" / "checkpoints" / "last.ckpt").is_file()  # kept on request

    out = tmp_path / "run"
    run = guard(lambda cbs: run_pretrain(cfg, out, progress=False, callbacks=cbs))
    rc, o, err = _call(run, [_kill_at(1)], capsys)
    ckpt = out / "checkpoints" / "last.ckpt"
    assert rc == 143 and "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == [f"twinseg: interrupted by SIGTERM; rerun the same command to resume from {ckpt}"], err[-3000:]
    assert ckpt.is_file() and not [p for p in out.rglob("*") if p.name in RESULT_FILES]

    write_all = IO._write_all

    def full(fd, data):  # the disk fills up at the checkpoint (a torch zip, "PK"); the small json files fit
        if bytes(memoryview(data)[:2]) == b"PK":
            raise OSError(errno.ENOSPC, "No space left on device")
        write_all(fd, data)

    with monkeypatch.context() as mp:
        mp.setattr(IO, "_write_all", full)
        rc, o, err = _call(run, [], capsys)
    assert rc == 2 and "Traceback" not in err and f"no space left on the device holding {ckpt.parent}" in err, err
    assert C.checkpoint_problem(ckpt) is None and not [p for p in out.rglob("*") if p.name in RESULT_FILES]

    m = run_pretrain(cfg, out, progress=False)
    assert {k: m[k] for k in RESULT_KEYS} == {k: ref[k] for k in RESULT_KEYS}
    assert not ckpt.exists() and (out / "backbone.pt").is_file()  # issue 19: the finished run keeps no checkpoint
    assert run_pretrain(cfg, out, progress=False) == m  # finished + same config, without a checkpoint


def test_sigterm_to_the_cli_process(tmp_path, base_voc, resnet_ckpt):
    """The real thing: `kill -TERM` to experiments/segment.py while it trains."""
    import signal as _signal
    import time

    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, "good")
    env = {k: v for k, v in os.environ.items() if k not in ("TWINSEG_TRACEBACK", "PYTHONWARNINGS")}
    env.update({"WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)})
    argv = [ctx.fill(a) for a in _with(SEG, epochs="50")]
    p = subprocess.Popen([sys.executable, str(REPO / "experiments/segment.py"), *argv], cwd=tmp_path, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (ctx.out / "logs").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    p.send_signal(_signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert p.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("twinseg: interrupted by SIGTERM; ") and \
        "rerun the same command to" in lines[0], err
    assert not [q for q in ctx.out.rglob("*") if q.name in RESULT_FILES]
