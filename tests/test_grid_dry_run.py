"""experiments/grid.py --dry-run and the pre-start checks (experiments/engine/checks.py, plan.py): every problem
at once, nothing written.

In-process calls of `experiments.engine.cli.main` (no Ray: `sys.modules["ray"]` is set to None for each
test, so any `import ray` would fail the test). The weights folder is an empty folder and the
checks run offline; the local machine is taken to have no GPU.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import yaml

from experiments.engine import checks, cli, expand, gridfile, spec

IMPOSSIBLE = ["pt-vit_small_patch8-imagenet-bt-l0.0051-s0", "pt-vit_small_patch8-imagenet-bt-l0.0051-s1"]
DINO_PT = "pt-vit_small_patch16-dino-bt-l0.0051-s0"
RES = "pt-resnet_tiny-random-bt-l0.0051-s0"
VIT = "pt-vit_nano_patch8-random-bt-l0.0051-s0"

CLEAN = {
    "name": "clean",
    "wandb": "disabled",
    "max_concurrent": 2,
    "retries": 1,
    "data": {"image_size": 32, "synthetic_n_train": 8, "synthetic_n_val": 4},  # generated: made at the start only
    "stage1": {
        "resources": {"cpu": 1, "gpu": 0},
        "settings": {"device": "cpu", "epochs": 1, "batch_size": 4},
        "axes": {"backbone": ["vit_nano_patch8", "resnet_tiny"], "lambd": [0.0051], "method": ["barlow_twins"]},
    },
    "stage2": {
        "resources": {"cpu": 1, "gpu": 0},
        "settings": {"device": "cpu", "epochs": 1, "batch_size": 4},
        "evaluations": [
            {"evaluation": "E1", "from": {"backbone": "resnet_tiny"}},
            {"evaluation": "E4", "from": {"backbone": "vit_nano_patch8"}},
        ],
    },
}

# Four independent problems: an impossible (source, backbone) pair (2 seeds, and an E2 entry that
# consumes only them), a DINO source whose weight file is missing, E3 (attention fusion) on a CNN,
# and a segmentation GPU request on a machine without GPU.
BAD = copy.deepcopy(CLEAN)
BAD["name"] = "bad"
BAD["stage1"]["axes"] = [
    {"backbone": ["vit_nano_patch8", "resnet_tiny"], "method": ["barlow_twins"]},
    {"backbone": ["vit_small_patch8"], "source": ["imagenet"], "method": ["barlow_twins"], "seed": [0, 1]},
    {"backbone": ["vit_small_patch16"], "source": ["dino"], "method": ["barlow_twins"]},
]
BAD["stage2"]["resources"] = {"cpu": 1, "gpu": 1}
BAD["stage2"]["evaluations"] = [
    {"evaluation": "E1", "from": {"backbone": "resnet_tiny"}},
    {"evaluation": "E3", "from": {"backbone": "resnet_tiny"}},
    {"evaluation": "E2", "from": {"backbone": "vit_small_patch8"}},
]


def offline_env(mp: pytest.MonkeyPatch, cwd: Path, gpus: int = 0) -> Path:
    """Make `cwd` a fresh working folder holding an empty weights folder and the data cache; offline; `gpus`
    GPUs seen; `import ray` fails."""
    (cwd / "weights").mkdir(parents=True)
    mp.chdir(cwd)
    mp.setenv("TWINSEG_WEIGHTS", str(cwd / "weights"))
    mp.setenv("TWINSEG_DATA_DIR", str(cwd / "data"))  # a generated dataset would show up here
    mp.setenv("TWINSEG_OFFLINE", "1")
    mp.delenv("TWINSEG_ONLINE", raising=False)
    mp.delenv("RAY_ADDRESS", raising=False)
    mp.setattr(checks, "local_gpu_count", lambda: gpus)
    mp.setitem(sys.modules, "ray", None)  # `import ray` -> ImportError: Ray is never started
    return cwd


@pytest.fixture
def env(tmp_path, monkeypatch):
    """`offline_env` in tmp_path/cwd, no GPU."""
    return offline_env(monkeypatch, tmp_path / "cwd")


def _grid(tmp_path: Path, doc: dict, name: str) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(doc, sort_keys=False))
    return p


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _main(capsys, *argv) -> tuple[int, str, list[str]]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as e:  # guard: a fatal error
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, [ln for ln in err.splitlines() if ln.strip()]


def test_dry_run_lists_every_problem_and_writes_nothing(tmp_path, env, capsys):
    bad = _grid(tmp_path, BAD, "bad")
    before = _listing(env)
    rc, out, err = _main(capsys, "--grid", str(bad), "--dry-run")
    assert rc == 2, err
    assert _listing(env) == before  # no results/, no data/, nothing else
    assert sys.modules.get("ray") is None
    assert all(ln.startswith("twinseg: error: bad.yaml: ") for ln in err), err
    text = "\n".join(err)
    assert "Traceback" not in text + out

    def one(*fragments) -> str:
        hits = [ln for ln in err if all(f in ln for f in fragments)]
        assert len(hits) == 1, (fragments, err)
        return hits[0]

    # the pair without weights: one line naming the pair, its trials, the dependants and the fix
    pair = one("source imagenet has no weights for backbone vit_small_patch8")
    assert "stage1.axes[1].source[0]='imagenet' x stage1.axes[1].backbone[0]='vit_small_patch8'" in pair
    assert f"(2 trials: {IMPOSSIBLE[0]}, {IMPOSSIBLE[1]}; and 2 segmentation trial(s) from them)" in pair
    assert "not scheduled" in pair and "add {backbone: vit_small_patch8, source: imagenet} to stage1.exclude" in pair
    # the DINO weight file, with the fetch command
    dino = one("dino_deitsmall16_pretrain.pth")
    assert f"bad.yaml: source=dino backbone=vit_small_patch16 (trial {DINO_PT}):" in dino
    assert str(env / "weights" / "dino" / "dino_deitsmall16_pretrain.pth") in dino
    assert "python -m core.weights fetch --source dino --backbone vit_small_patch16" in dino
    # E3 on a CNN
    e3 = one("stage2.evaluations[1]")
    assert f"(trial seg-E3-from-{RES})" in e3 and "resnet_tiny is a CNN" in e3
    # the GPU request
    gpu = one("stage2.resources.gpu=1")
    assert "but this machine (local start) has 0 GPU(s)" in gpu
    assert len(err) == 4, err

    # the plan (stdout): every scheduled trial with its dependency and resources, the totals
    assert "cluster  assumed: this machine (local start):" in out and "0 GPU(s)" in out
    lines = out.splitlines()
    for tid in (VIT, RES, DINO_PT, f"seg-E1-from-{RES}", f"seg-E3-from-{RES}"):
        assert any(tid in ln for ln in lines), (tid, out)
    assert "vit_small_patch8" not in "\n".join(ln for ln in lines if ln.startswith(("!", " ")))
    e3_line = next(ln for ln in lines if ln[2:].startswith(f"seg-E3-from-{RES} "))
    assert e3_line.startswith("! ")  # named by a problem
    assert e3_line.split()[2:4] == ["segment", RES] and e3_line.endswith("1 CPU, 1 GPU")
    assert "totals   pretrain 3 trial(s); requests 3 CPU and 0 GPU in all" in out
    assert "totals   segment  2 trial(s); requests 2 CPU and 2 GPU in all" in out
    assert "left out 2 pretraining + 2 segmentation trial(s)" in out
    assert "dry run: 4 problem(s)" in out

    # the normal start: the same lines, exit 2, before Ray or any folder
    rc2, _out2, err2 = _main(capsys, "--grid", str(bad))
    assert rc2 == 2
    assert err2 == err
    assert _listing(env) == before


def test_dry_run_reports_a_bad_data_root_with_the_rest(tmp_path, env, capsys):
    empty = tmp_path / "novoc"
    empty.mkdir()
    rc, _out, err = _main(capsys, "--grid", str(_grid(tmp_path, BAD, "bad")), "--data-root", str(empty), "--dry-run")
    assert rc == 2
    assert any(ln.startswith(f"twinseg: error: bad.yaml: data.root={empty} (") for ln in err), err
    assert any("dino_deitsmall16_pretrain.pth" in ln for ln in err)  # still every other problem


def test_clean_grid_dry_run_exits_0(tmp_path, env, capsys):
    clean = _grid(tmp_path, CLEAN, "clean")
    before = _listing(env)
    rc, out, err = _main(capsys, "--grid", str(clean), "--dry-run")
    assert rc == 0 and err == [], err
    assert _listing(env) == before  # the generated dataset is NOT made by a dry run
    assert sys.modules.get("ray") is None
    assert "plan     grid clean (clean.yaml): 2 pretraining + 2 segmentation trials" in out
    assert "data     generated dataset (made at the start" in out
    assert f"seg-E4-from-{VIT}" in out and "1 CPU, 0 GPU" in out
    assert "totals   all      4 trial(s), 0 marked !" in out
    assert "dry run: no problem found" in out
    # --address: the cluster is not known without Ray; the plan says so, no fit problem
    doc = copy.deepcopy(CLEAN)
    doc["stage2"]["resources"] = {"cpu": 1, "gpu": 1}
    rc, out, err = _main(capsys, "--grid", str(_grid(tmp_path, doc, "gpu")), "--address", "10.0.0.1:6379", "--dry-run")
    assert rc == 0 and err == [], err
    assert "cluster  --address 10.0.0.1:6379: its size is known only once Ray is up" in out
    # a local start counts --num-cpus
    doc["stage2"]["resources"] = {"cpu": 3, "gpu": 0}
    rc, out, err = _main(capsys, "--grid", str(_grid(tmp_path, doc, "cpu")), "--num-cpus", "2", "--dry-run")
    assert rc == 2 and len(err) == 1
    assert err[0].startswith("twinseg: error: cpu.yaml: stage2.resources.cpu=3 but this machine (local start) has 2 CPU(s)")
    assert "2 CPU(s) (--num-cpus)" in out


def test_fatal_grid_error_stays_one_line(tmp_path, env, capsys):
    doc = copy.deepcopy(BAD)
    doc["stage1"]["settings"]["epochz"] = 3  # malformed: stops the expansion, one line
    rc, out, err = _main(capsys, "--grid", str(_grid(tmp_path, doc, "bad")), "--dry-run")
    assert rc == 2 and len(err) == 1 and "stage1.settings.epochz is not a PretrainConfig field" in err[0]


def test_paper_dry_run_names_every_missing_weight_file(voc_root, env, capsys):
    """paper.yaml on a VOC folder with no weight file: every missing file in one run, exit 2."""
    from core.weights import WEIGHT_SPECS, local_path

    rc, out, err = _main(capsys, "--grid", "paper", "--data-root", str(voc_root), "--dry-run")
    assert rc == 2
    assert sys.modules.get("ray") is None
    g = expand.load_grid(gridfile.resolve_grid("paper"), {"data_root": str(voc_root)}, check_models=False,
                           collect=True)
    pairs = {(t.config["source"], t.config["backbone"]) for t in g.trials} & set(WEIGHT_SPECS)
    assert {("dino", "vit_small_patch16"), ("imagenet", "resnet50"), ("imagenet", "swin_tiny")} <= pairs
    for pair in pairs:
        path = str(local_path(WEIGHT_SPECS[pair]))
        hits = [ln for ln in err if path in ln]
        assert len(hits) == 1, (pair, err)
        assert f"python -m core.weights fetch --source {pair[0]} --backbone {pair[1]}" in hits[0]
    # the VOC layout is fine; stage 2 trains on trainaug, whose SBD layout this tree lacks: one line
    data = [ln for ln in err if ln.startswith("twinseg: error: paper.yaml: data.root=")]
    assert len(data) == 1 and "split 'trainaug' needs" in data[0] and "SegmentationClassAug" in data[0], err
    # and COCO-Stuff's own folder (data/coco_stuff under the current folder) is missing: one line naming its key
    coco = [ln for ln in err if "coco_stuff" in ln and "data.root=" in ln]
    assert len(coco) == 1 and coco[0].startswith(
        f"twinseg: error: paper.yaml: stage2.datasets.coco_stuff.data.root={env / 'data' / 'coco_stuff'} ("), err
    assert all(ln.startswith("twinseg: error: paper.yaml: ") for ln in err), err
    assert "plan     grid paper (paper.yaml)" in out and "cluster  assumed: this machine" in out


def test_paper_dry_run_accepts_a_tree_with_the_sbd_layout(tmp_path, env, capsys):
    """With SegmentationClassAug present (generator --trainaug) no data problem is left."""
    from core.data.synthetic import generate_voc

    root = generate_voc(tmp_path / "voc", n_train=4, n_val=2, size=32, seed=0, trainaug=True)
    rc, _out, err = _main(capsys, "--grid", "paper", "--data-root", str(root), "--dry-run")
    assert rc == 2  # the weight files are still missing
    assert not any(ln.startswith("twinseg: error: paper.yaml: data.root=") for ln in err), err


def test_dry_run_reports_an_impossible_pair_in_a_paper_like_grid(voc_root, tmp_path, env, capsys):
    """A grid crossing vit_small_patch8 with imagenet (as paper.yaml once did): reported, not scheduled."""
    doc = gridfile.read_yaml(gridfile.resolve_grid("paper"))
    doc["stage1"]["axes"] = [{"backbone": ["vit_small_patch16", "vit_small_patch8"], "source": ["random", "imagenet"],
                              "lambd": [0.0051], "method": ["barlow_twins"], "seed": [0]}]
    doc["stage1"].pop("exclude", None)
    doc["stage2"]["evaluations"] = [{"evaluation": "E2", "from": {"method": "barlow_twins"}}]
    doc["data"]["image_size"] = 32
    rc, out, err = _main(capsys, "--grid", str(_grid(tmp_path, doc, "paperlike")), "--data-root", str(voc_root),
                         "--dry-run")
    assert rc == 2
    pair = [ln for ln in err if "source imagenet has no weights for backbone vit_small_patch8" in ln]
    assert len(pair) == 1 and "pt-vit_small_patch8-imagenet-bt-l0.0051-s0" in pair[0], err
    assert "and 2 segmentation trial(s) from them" in pair[0]  # its E2 on VOC and on COCO-Stuff
    assert "pt-vit_small_patch8-imagenet" not in out  # not in the plan
    assert "pt-vit_small_patch8-random-bt-l0.0051-s0" in out


def test_problem_lines_have_one_format():
    pr = spec.Problem("g.yaml", "stage2.evaluations[0]", "x is wrong; fix it", ["a", "b", "c"])
    assert pr.line == "g.yaml: stage2.evaluations[0] (3 trials: a, b, +1 more): x is wrong; fix it"
    assert spec.Problem("g.yaml", "k", "bad; fix").line == "g.yaml: k: bad; fix"
    assert os.linesep not in pr.line


# ----------------------------------------------------------------------------- --json, COCO-Stuff folders
def _two_datasets(coco_root) -> dict:
    doc = copy.deepcopy(CLEAN)
    doc["stage2"]["datasets"] = {"voc": {}, "coco_stuff": {"data": {"root": str(coco_root), "coco_labels": "fine"}}}
    return doc


def test_dry_run_names_a_missing_coco_stuff_folder(tmp_path, env, capsys):
    """A stage-2 dataset's folder is checked like data.root: one line naming its key, its trials and the fix; a
    generated COCO-Stuff-layout tree passes."""
    from core.data.synthetic import generate_coco_stuff

    rc, _out, err = _main(capsys, "--grid", str(_grid(tmp_path, _two_datasets("missing/coco"), "two")), "--dry-run")
    assert rc == 2 and len(err) == 1, err
    assert err[0] == (
        f"twinseg: error: two.yaml: stage2.datasets.coco_stuff.data.root={env / 'missing' / 'coco'} (2 trials: "
        f"seg-E1-coco_stuff-from-{RES}, seg-E4-coco_stuff-from-{VIT}): does not exist; set "
        "stage2.datasets.coco_stuff.data.root in the grid file to the folder that holds images/ and "
        "stuffthingmaps_trainval2017/ (COCO-Stuff 164k) (a relative path: from the current folder)")
    # a folder without the layout: the data layer's own line, at the same key
    (tmp_path / "empty").mkdir()
    rc, _out, err = _main(capsys, "--grid", str(_grid(tmp_path, _two_datasets(tmp_path / "empty"), "two")), "--dry-run")
    assert rc == 2 and len(err) == 1 and "stage2.datasets.coco_stuff.data.root=" in err[0], err
    assert "COCO-Stuff folder" in err[0] and "is missing" in err[0]
    root = generate_coco_stuff(tmp_path / "coco", n_train=4, n_val=2, size=32, seed=0)
    before = _listing(env)
    rc, out, err = _main(capsys, "--grid", str(_grid(tmp_path, _two_datasets(root), "two")), "--dry-run")
    assert rc == 0 and err == [], err
    assert f"seg-E4-coco_stuff-from-{VIT}" in out and f"seg-E4-from-{VIT}" in out
    assert _listing(env) == before


def test_dry_run_json_is_one_document_with_every_trial_and_problem(tmp_path, env, capsys):
    import json

    rc, out, err = _main(capsys, "--grid", str(_grid(tmp_path, CLEAN, "clean")), "--dry-run", "--json")
    assert rc == 0 and err == [], err
    doc = json.loads(out)  # nothing but the JSON on stdout
    assert set(doc) == {"trials", "problems"} and doc["problems"] == []
    assert [t["id"] for t in doc["trials"]] == [VIT, RES, f"seg-E1-from-{RES}", f"seg-E4-from-{VIT}"]
    for t in doc["trials"]:
        assert set(t) == {"id", "stage", "depends_on", "resources", "config"}
    seg = doc["trials"][3]
    assert seg["stage"] == "segment" and seg["depends_on"] == [VIT] and seg["resources"] == {"cpu": 1, "gpu": 0}
    assert seg["config"]["fusion"] == "affinity" and seg["config"]["data"]["dataset"] == "voc"
    # problems: the same lines as the text dry run's stderr (without the prefix), exit 2, stderr quiet
    bad = _grid(tmp_path, BAD, "bad")
    rc_text, _out, err_text = _main(capsys, "--grid", str(bad), "--dry-run")
    rc, out, err = _main(capsys, "--grid", str(bad), "--dry-run", "--json")
    assert rc == rc_text == 2 and err == []
    doc = json.loads(out)
    assert doc["problems"] == [ln[len("twinseg: error: "):] for ln in err_text] and len(doc["problems"]) == 4
    assert f"seg-E3-from-{RES}" in [t["id"] for t in doc["trials"]]


def test_json_without_dry_run_is_one_line(tmp_path, env, capsys):
    before = _listing(env)
    rc, out, err = _main(capsys, "--grid", str(_grid(tmp_path, CLEAN, "clean")), "--json")
    assert rc == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith("twinseg: error: --json prints the plan of a dry run; add --dry-run")
    assert _listing(env) == before
