"""The SSL method registry (core/methods/registry.py): one entry owns a method; VICReg is the proof
that adding a method touches no other file."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from core.config import PretrainConfig
from core.errors import ConfigError
from core.methods.registry import SSLMethodSpec, get_method, ssl_methods
from core.methods.ssl_base import SSLMethod

REPO = Path(__file__).resolve().parents[1]


def test_registry_lists_every_method_with_its_pieces():
    specs = ssl_methods()
    assert list(specs)[:3] == ["barlow_twins", "dino", "vicreg"]
    assert len({s.short for s in specs.values()}) == len(specs)  # trial ids stay distinct
    for name, spec in specs.items():
        assert isinstance(spec, SSLMethodSpec) and spec.name == name
        assert issubclass(spec.module, SSLMethod) and spec.module.method_name == name
        assert spec.options.section == name and spec.label and spec.paper
        for axis in spec.axes:  # a method's grid axes are fields of its own section
            assert axis in spec.options.__dataclass_fields__
    with pytest.raises(ConfigError, match="method='simclr' is not allowed; choose one of: barlow_twins, dino, vicreg"):
        get_method("simclr")


def test_views_come_from_the_entry():
    cfg = PretrainConfig.from_dict({"method": "dino", "dino": {"local_crops": 3}, "data": {"image_size": 64}})
    assert len(get_method("dino").views(cfg, False).sizes) == 5  # 2 global + 3 local
    for name in ("barlow_twins", "vicreg"):
        assert len(get_method(name).views(PretrainConfig(method=name), False).sizes) == 2


def test_vicreg_step_is_its_loss_on_the_expander_outputs():
    from core.losses import VICRegLoss

    cfg = PretrainConfig.from_dict({"method": "vicreg", "backbone": "resnet_tiny", "projector": "32-16",
                                    "batch_size": 4, "gpu_augment": False,
                                    "vicreg": {"sim_coeff": 10, "std_coeff": 5, "cov_coeff": 2}})
    m = get_method("vicreg").module(cfg)
    m.eval()  # BatchNorm in eval mode: both forwards below see the same statistics
    torch.manual_seed(0)
    v1, v2 = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    loss = m.training_step([v1, v2], 0)
    want = VICRegLoss(10.0, 5.0, 2.0)(m.projector(m.backbone(v1)), m.projector(m.backbone(v2)))
    assert torch.allclose(loss, want, atol=1e-5)
    assert set(m.loss_fn.last_terms) == {"invariance", "variance", "covariance"}
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.backbone.parameters())


@pytest.mark.slow
def test_vicreg_pretraining_run(voc_root, tmp_path):
    """`--method vicreg` end to end: its own section in config.json, its label in metrics.json, no
    other method's keys."""
    from core.runs.pretrain import run_pretrain

    cfg = PretrainConfig.from_dict(dict(
        method="vicreg", backbone="vit_nano_patch8", projector=(64, 64), batch_size=8, epochs=1, optimizer="adamw",
        wandb="disabled", device="cpu", gpu_augment=False,
        data=dict(root=str(voc_root), image_size=32, limit_train=16, limit_val=8)))
    m = run_pretrain(cfg, tmp_path / "run", progress=False)
    assert m["method"] == "vicreg" and m["method_label"] == "VICReg"
    assert not {"lambd", "cc_diag_mean"} & set(m) and m["final_loss"] is not None
    assert json.loads((tmp_path / "run" / "config.json").read_text())["vicreg"]["sim_coeff"] == 25.0
    assert 0.0 <= m["knn_acc"] <= 100.0 and (tmp_path / "run" / "backbone.pt").is_file()


def test_vicreg_lives_in_at_most_three_source_files():
    """Adding a method is one module (plus its loss and the loss's stable export)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "grep", "-il", "vicreg", "--", "core", "experiments", "analysis", ":!*.yaml",
                          ":!*test*"], cwd=REPO, capture_output=True, text=True)
    files = out.stdout.split()
    assert len(files) <= 3, files


def test_method_defaults_sit_under_explicit_values():
    """A method's `SSLMethodSpec.defaults` replace the shared defaults in from_dict (CLI, grid) and never an
    explicit value; methods without defaults keep the dataclass defaults; a config read back is unchanged."""
    from core.config import PretrainConfig
    from core.methods.registry import ssl_methods

    shared = PretrainConfig()
    for name, spec in ssl_methods().items():
        cfg = PretrainConfig.from_dict({"method": name})
        for k in {f for f in ("lr", "optimizer", "weight_decay")}:
            assert getattr(cfg, k) == spec.defaults.get(k, getattr(shared, k)), (name, k)
        assert PretrainConfig.from_dict(cfg.to_dict()) == cfg
    dino = ssl_methods()["dino"]
    assert dino.defaults["lr"] == 5e-4
    assert PretrainConfig.from_dict({"method": "dino", "lr": 1e-3}).lr == 1e-3
    assert PretrainConfig.from_dict({"method": "dino"}, lr=3e-3).lr == 3e-3
    # the CLI: no --lr -> the method's value; --lr wins
    import experiments.pretrain as cli

    assert cli.config_from_args(cli.build_parser().parse_args(["--method", "dino"])).lr == 5e-4
    assert cli.config_from_args(cli.build_parser().parse_args(["--method", "dino", "--lr", "0.002"])).lr == 2e-3
    assert cli.config_from_args(cli.build_parser().parse_args([])).lr == shared.lr
