"""What a result is (core/runs/identity.py, core/runs/skeleton.py): a folder is reused or resumed only when the
config, the data and the starting weights all match the request; a folder that cannot be checked is not a result;
output and data never overlap; --overwrite removes exactly what the run wrote; a run that fails before its first
checkpoint leaves nothing that refuses the corrected rerun. docs/reliability.md, "Results" rows. CPU, tiny
backbones, generated data."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from core.config import SegmentConfig
from core.errors import ConfigError


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    from core.data.synthetic import generate_voc

    return generate_voc(tmp_path_factory.mktemp("id_voc"), n_train=8, n_val=4, size=32, seed=0)


def _cfg(root, **kw) -> SegmentConfig:
    d = {"backbone": "resnet_tiny", "head": "linear", "epochs": 1, "batch_size": 4, "wandb": "disabled",
         "device": "cpu", "data": {"root": str(root), "image_size": 32}}
    d["data"].update(kw.pop("data", {}))
    d.update(kw)
    return SegmentConfig.from_dict(d)


def _run(cfg, out, **kw):
    from core.runs.segment import run_segment

    return run_segment(cfg, out, progress=False, **kw)


def _no_training(monkeypatch):
    import core.runs.skeleton as skeleton

    def boom(*a, **k):
        raise AssertionError("a reused result must not train")

    monkeypatch.setattr(skeleton, "make_trainer", boom)


def _edit_config(out, **values):
    """Edit a run folder's config.json by hand, as a user would."""
    c = json.loads((out / "config.json").read_text())
    c.update(values)
    (out / "config.json").write_text(json.dumps(c))


def test_finished_result_is_reused_only_when_config_data_and_weights_match(tmp_path, voc, monkeypatch):
    """An edited config.json, a missing one, regenerated data and other starting weights are
    each refused in one line naming what differs (was: the old result, exit 0); the same request gets the stored
    result back, with its identity inside metrics.json."""
    from core.data.synthetic import generate_voc
    from core.models.registry import create_backbone
    from core.weights import export_backbone

    data = tmp_path / "data"
    shutil.copytree(voc, data)
    ck = export_backbone(create_backbone("resnet_tiny"), tmp_path / "bb.pt")
    cfg = _cfg(data, source=f"checkpoint:{ck}")
    out = tmp_path / "run"
    m = _run(cfg, out)
    ident = json.loads((out / "metrics.json").read_text())["identity"]
    assert ident == m["identity"] and ident["weights"][0]["path"] == str(ck.resolve())
    assert ident["config"]["lr"] == cfg.lr and ident["data"]["roots"][0]["generator"]["seed"] == 0
    with monkeypatch.context() as mp:
        _no_training(mp)
        assert _run(cfg, out) == m  # the same request: the stored result

        # 1. config.json edited to lr=0.5, then the run asked with lr=0.5: the record says 0.001
        _edit_config(out, lr=0.5)
        with pytest.raises(ConfigError, match=r"holds a finished run with a different config \(fields lr\)"):
            _run(cfg.replace(lr=0.5), out)

        # 2. config.json missing: not a result (was: 'nothing to compare', the old result returned)
        (out / "config.json").unlink()
        with pytest.raises(ConfigError, match=r"config.json is missing or unreadable, so it is not a result.*"
                                              r"--overwrite"):
            _run(cfg, out)
        (out / "config.json").write_text(json.dumps(cfg.to_dict()))
        assert _run(cfg, out) == m

        # 4. the dataset regenerated with another seed at the same path (same file names and sizes)
        generate_voc(data, n_train=8, n_val=4, size=32, seed=1, overwrite=True)
        with pytest.raises(ConfigError, match=r"made on different data \(.*regenerated \(seed 0 -> 1\)\)"):
            _run(cfg, out)
        generate_voc(data, n_train=8, n_val=4, size=32, seed=0, overwrite=True)
        assert _run(cfg, out) == m
        (data / "VOCdevkit" / "VOC2012" / "JPEGImages" / "extra.jpg").write_bytes(b"x" * 10)
        with pytest.raises(ConfigError, match=r"made on different data \(.* files / .* bytes ->"):
            _run(cfg, out)
        (data / "VOCdevkit" / "VOC2012" / "JPEGImages" / "extra.jpg").unlink()

        # 3. the same checkpoint path with other content: other starting weights
        torch.manual_seed(1)
        export_backbone(create_backbone("resnet_tiny"), ck)
        with pytest.raises(ConfigError, match=r"started from different weights \(.*bb.pt: sha256 [0-9a-f]{12} -> "
                                              r"[0-9a-f]{12}\)"):
            _run(cfg, out)
    # --overwrite reruns it, and the new record names the new weights
    m2 = _run(cfg, out, overwrite=True)
    assert m2["identity"]["weights"] != ident["weights"]


def test_moved_checkpoint_with_same_content_is_the_same_request(tmp_path, voc, monkeypatch):
    """A checkpoint source is identified by its content: a results folder copied elsewhere (its stage-2 configs then
    name the stage-1 weights at their new place) is the same request; a finished folder is returned."""
    from core.models.registry import create_backbone
    from core.weights import export_backbone

    ck = export_backbone(create_backbone("resnet_tiny"), tmp_path / "a" / "bb.pt")
    m = _run(_cfg(voc, source=f"checkpoint:{ck}"), tmp_path / "run")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    _no_training(monkeypatch)
    assert _run(_cfg(voc, source=f"checkpoint:{tmp_path / 'b' / 'bb.pt'}"), tmp_path / "run") == m


def test_resume_checks_the_record_before_training(tmp_path, voc):
    """Unfinished: a run stopped after epoch 0, config.json edited to another lr and the run asked
    with that lr is refused (was: epochs 0-7 with one config, 8-29 with another); the original request resumes."""
    from lightning.pytorch.callbacks import Callback

    class StopAfterFirstEpoch(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                raise RuntimeError("stopped")

    cfg = _cfg(voc, epochs=2)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="stopped"):
        _run(cfg, out, callbacks=[StopAfterFirstEpoch()])
    assert (out / "checkpoints" / "last.ckpt").is_file() and (out / "identity.json").is_file()
    _edit_config(out, lr=0.5)
    with pytest.raises(ConfigError, match=r"holds an unfinished run with a different config \(fields lr\)"):
        _run(cfg.replace(lr=0.5), out)
    (out / "identity.json").unlink()
    (out / "config.json").unlink()
    with pytest.raises(ConfigError, match=r"unfinished run whose config.json and identity.json are missing or "
                                          r"unreadable, so its checkpoint cannot be checked"):
        _run(cfg, out)


def test_output_and_data_never_overlap(tmp_path, voc):
    """--output inside the ImageFolder / VOC root (its figures became training images) or holding
    it is refused in one line, before anything is written."""
    data = tmp_path / "data"
    shutil.copytree(voc, data)
    with pytest.raises(ConfigError, match=rf"--output {data}/run1 lies inside the data folder {data}"):
        _run(_cfg(data), data / "run1")
    with pytest.raises(ConfigError, match=rf"--output {tmp_path} contains the data folder {data}"):
        _run(_cfg(data), tmp_path)
    with pytest.raises(ConfigError, match="lies inside the data folder"):
        _run(_cfg(data), data)
    assert not (data / "run1").exists() and not (data / "config.json").exists()


def test_overwrite_removes_exactly_what_the_run_wrote(tmp_path, voc):
    """--overwrite deletes the files listed in the run's manifest.json, never the user's own files under logs/ or
    figures/ (was: both folders deleted whole)."""
    out = tmp_path / "run"
    for rel in ("logs/mine.csv", "figures/mine.png", "notes.txt"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_text("mine")
    _run(_cfg(voc), out)
    listed = json.loads((out / "manifest.json").read_text())["entries"]
    assert "logs/version_0" in listed and "config.json" in listed and "metrics.json" in listed
    assert not any(e in listed for e in ("logs", "figures", "notes.txt", "logs/mine.csv", "figures/mine.png"))
    run_figures = [p for p in (out / "figures").iterdir() if p.name != "mine.png"]
    with pytest.warns(RuntimeWarning, match="--overwrite: removed"):
        _run(_cfg(voc, lr=0.002), out, overwrite=True)
    for rel in ("logs/mine.csv", "figures/mine.png", "notes.txt"):
        assert (out / rel).read_text() == "mine", rel
    assert json.loads((out / "metrics.json").read_text())["identity"]["config"]["lr"] == 0.002
    assert sorted(p.name for p in (out / "logs").iterdir()) == ["mine.csv", "version_0"]  # the new run's own
    assert all(p.exists() for p in run_figures)  # rewritten by the new run, listed again
    assert sorted(json.loads((out / "manifest.json").read_text())["entries"]) == sorted(listed)


def test_failed_run_leaves_nothing_that_blocks_its_fix(tmp_path, voc):
    """A run refused mid-way before its first checkpoint (a corrupt image) leaves no config.json: the rerun its
    message suggests (--corrupt-policy skip) is accepted without --overwrite (was: refused as a different config)."""
    from core.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(voc, data)
    voc_dir = data / "VOCdevkit" / "VOC2012"
    first = (voc_dir / "ImageSets" / "Segmentation" / "train.txt").read_text().split()[0]
    (voc_dir / "JPEGImages" / f"{first}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="corrupt_policy=skip"):
        _run(_cfg(data), out)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["notes.txt"]
    m = _run(_cfg(data, data={"corrupt_policy": "skip"}), out)
    assert m["skipped_files"] == 1 and (out / "notes.txt").read_text() == "mine"


def test_relative_checkpoint_source_is_resolved_when_read(tmp_path, monkeypatch):
    """`checkpoint:bb.pt` is made absolute when the flags are read, so a resume from another folder
    names the same file (and the identity records its content)."""
    import experiments.segment as S

    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    args = S.build_parser().parse_args(["--source", "checkpoint:bb.pt", "--data-root", str(tmp_path),
                                        "--head", "linear", "--backbone", "resnet_tiny"])
    cfg = S.resolve_config(args)
    assert cfg.source == f"checkpoint:{(tmp_path / 'a' / 'bb.pt').resolve()}"
    assert cfg.data.root == str(tmp_path)
    from core.config_cli import resolve_paths

    assert resolve_paths({"data": {"ssl_root": "imgs"}}, base=tmp_path)["data"]["ssl_root"] == str(tmp_path / "imgs")
    assert os.path.isabs(resolve_paths({"source": "checkpoint:~/x.pt"})["source"][len("checkpoint:"):])
