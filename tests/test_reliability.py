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

    def fill(self, s: str) -> str:
        return s.format(voc=self.voc, named=self.named, ckpt=self.ckpt, evil=self.evil, empty=self.empty,
                        out=self.out, coco=self.coco, tmp=self.tmp)


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
]


@pytest.mark.parametrize("cid,cli,dataset,argv,needles,env", CASES, ids=[c[0] for c in CASES])
def test_bad_input_matrix(cid, cli, dataset, argv, needles, env, tmp_path, base_voc, resnet_ckpt, capsys,
                          monkeypatch):
    ctx = Ctx(tmp_path, base_voc, resnet_ckpt, dataset)
    monkeypatch.delenv("TWINSEG_TRACEBACK", raising=False)
    monkeypatch.delenv("TWINSEG_ONLINE", raising=False)
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
    from experiments.grid import local_ray_init_kwargs

    kw = local_ray_init_kwargs(2, {"log_to_driver": False})
    assert kw["dashboard_host"] == "127.0.0.1" and kw["address"] == "local" and kw["num_cpus"] == 2
    assert kw["log_to_driver"] is False
    assert "0.0.0.0" not in json.dumps(kw)
    src = (REPO / "experiments" / "grid.py").read_text()
    assert not re.search(r"dashboard_host\s*=\s*['\"](?!127\.0\.0\.1)", src)  # no other host anywhere
    assert not re.search(r"RAY_AUTH_MODE\"?\]?\s*=\s*['\"]disabled", src)  # token auth never switched off
