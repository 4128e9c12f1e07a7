"""Weight sources: every real file format loads into the right backbone and reproduces outputs;
unsafe pickles, missing files offline and wrong architectures end in one WeightsError line."""

import os

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

import core.weights as W
from core.errors import ConfigError, WeightsError
from core.models import create_backbone
from core.weights import (WEIGHT_SPECS, check_source, export_backbone, is_online, load_source,
                          local_path)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("TWINSEG_ONLINE", "TWINSEG_OFFLINE", "HF_HUB_OFFLINE", "TWINSEG_WEIGHTS"):
        monkeypatch.delenv(k, raising=False)


def _put(wdir, source, backbone, obj):
    path = local_path(WEIGHT_SPECS[(source, backbone)], wdir)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(obj, str(path))
    else:
        torch.save(obj, path)
    return path


def _x(size=64, n=2):
    torch.manual_seed(1)
    return torch.randn(n, 3, size, size)


def test_official_dino_vit_file_loads_with_pos_embed_resize(tmp_path):
    torch.manual_seed(0)
    # official DINO ViT-S/16 format == timm keys, pos_embed for 224 px (1, 197, 384), no head
    ref = timm.create_model("vit_small_patch16_224", num_classes=0, dynamic_img_size=True).eval()
    sd = ref.state_dict()
    assert sd["pos_embed"].shape == (1, 197, 384) and not any(k.startswith("head") for k in sd)
    _put(tmp_path, "dino", "vit_small_patch16", sd)
    b = create_backbone("vit_small_patch16", image_size=64).eval()
    rep = load_source(b, "dino", weights_dir=tmp_path)
    assert rep["loaded"] == len(sd) and rep["resized"] and rep["url"].endswith("dino_deitsmall16_pretrain.pth")
    x = _x(64)
    with torch.no_grad():
        want = ref.forward_features(x)  # timm interpolates the same way at run time
        got = b.forward_all(x)
    assert torch.allclose(got.pooled, want[:, 0], atol=1e-4)
    assert torch.allclose(got.dense.flatten(2).transpose(1, 2), want[:, 1:], atol=1e-4)


def test_barlowtwins_resnet50_file(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet50().eval()
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("fc.")}
    _put(tmp_path, "barlowtwins-imagenet", "resnet50", sd)
    b = create_backbone("resnet50", image_size=64).eval()
    rep = load_source(b, "barlowtwins-imagenet", weights_dir=tmp_path)
    assert rep["loaded"] == len(sd) and not rep["missing"]
    ref.fc = nn.Identity()
    x = _x(64)
    with torch.no_grad():
        assert torch.allclose(b(x), ref(x), atol=1e-4)


def test_torchvision_imagenet_file_head_ignored(tmp_path):
    torch.manual_seed(0)
    ref = torchvision.models.resnet18().eval()
    _put(tmp_path, "imagenet", "resnet18", ref.state_dict())
    b = create_backbone("resnet18", image_size=64).eval()
    rep = load_source(b, "imagenet", weights_dir=tmp_path)
    assert rep["ignored"] == ["fc.bias", "fc.weight"]
    ref.fc = nn.Identity()
    with torch.no_grad():
        assert torch.allclose(b(_x(64)), ref(_x(64)), atol=1e-4)


def test_timm_safetensors_imagenet_file(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", num_classes=1000, dynamic_img_size=True).eval()
    _put(tmp_path, "imagenet", "vit_tiny_patch16", ref.state_dict())
    b = create_backbone("vit_tiny_patch16", image_size=64).eval()
    rep = load_source(b, "imagenet", weights_dir=tmp_path)
    assert "head.weight" in rep["ignored"]
    with torch.no_grad():
        assert torch.allclose(b(_x(64)), ref.forward_features(_x(64))[:, 0], atol=1e-4)


def test_coco_deeplab_backbone_keys(tmp_path):
    torch.manual_seed(0)
    dl = torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None,
                                                            aux_loss=True)
    _put(tmp_path, "coco-deeplab", "resnet50", dl.state_dict())
    b = create_backbone("resnet50", image_size=64)
    load_source(b, "coco-deeplab", weights_dir=tmp_path)
    for k, v in dl.backbone.state_dict().items():
        assert torch.equal(b.tv_model.state_dict()[k], v), k


def test_lightning_checkpoint_with_backbone_prefix(tmp_path):
    torch.manual_seed(0)
    src = create_backbone("vit_nano_patch8", image_size=32).eval()
    sd = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    sd["projector.0.weight"] = torch.randn(8, 96)
    path = tmp_path / "last.ckpt"
    torch.save({"epoch": 3, "global_step": 10, "state_dict": sd,
                "hyper_parameters": {"lr": 0.1, "name": "x"}}, path)
    torch.manual_seed(5)
    b = create_backbone("vit_nano_patch8", image_size=64).eval()  # other size: pos_embed resized
    rep = load_source(b, f"checkpoint:{path}")
    assert rep["prefix"] == "backbone.timm_model." and rep["resized"]
    src64 = create_backbone("vit_nano_patch8", image_size=64).eval()
    load_source(src64, f"checkpoint:{path}")
    with torch.no_grad():
        assert torch.allclose(b(_x(64)), src64(_x(64)))
        # the 32-px source model at 64 px interpolates the same embedding on the fly
        assert torch.allclose(b(_x(64)), src(_x(64)), atol=1e-4)


@pytest.mark.parametrize("name", ["resnet_tiny", "vit_nano_patch8", "swin_nano", "vitpytorch_small"])
def test_export_then_checkpoint_roundtrip(tmp_path, name):
    torch.manual_seed(0)
    src = create_backbone(name, image_size=64).eval()
    p = export_backbone(src, tmp_path / "backbone.pt")
    obj = torch.load(p, map_location="cpu", weights_only=True)
    assert obj["arch"] == name and isinstance(obj["state_dict"], dict)
    torch.manual_seed(1)
    dst = create_backbone(name, image_size=64).eval()
    load_source(dst, f"checkpoint:{p}")
    with torch.no_grad():
        assert torch.allclose(dst(_x(64)), src(_x(64)), atol=1e-6)


def test_plain_export_loads_into_library_models_strictly(tmp_path):
    v = create_backbone("vit_tiny_patch16", image_size=64)
    p = export_backbone(v, tmp_path / "vit.pt", plain=True)
    m = timm.create_model("vit_tiny_patch16_224", num_classes=0, img_size=64)
    m.load_state_dict(torch.load(p, weights_only=True), strict=True)
    r = create_backbone("resnet18")
    p = export_backbone(r, tmp_path / "r.pt", plain=True)
    tv = torchvision.models.resnet18()
    tv.fc = nn.Identity()
    tv.load_state_dict(torch.load(p, weights_only=True), strict=True)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(marker)}, path)
    b = create_backbone("resnet_tiny")
    with pytest.raises(WeightsError) as e:
        load_source(b, f"checkpoint:{path}")
    assert "is not a plain weights file (refusing to unpickle code)" in str(e.value)
    assert "trusted=True" in str(e.value)
    assert not marker.exists()
    with pytest.raises(TypeError):  # trusted must be named explicitly
        load_source(b, f"checkpoint:{path}", None, None, True)


def test_missing_offline_gives_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINSEG_ONLINE", "1")
    monkeypatch.setenv("TWINSEG_OFFLINE", "1")  # offline wins
    assert not is_online()
    b = create_backbone("vit_small_patch16", image_size=32)
    with pytest.raises(WeightsError) as e:
        load_source(b, "dino", weights_dir=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg
    assert str(tmp_path / "dino" / "dino_deitsmall16_pretrain.pth") in msg
    assert "https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth" in msg
    assert "python -m core.weights fetch --source dino --backbone vit_small_patch16" in msg


def test_weights_dir_env_default(tmp_path, monkeypatch):
    monkeypatch.setenv("TWINSEG_WEIGHTS", str(tmp_path))
    assert W.default_weights_dir() == tmp_path
    monkeypatch.delenv("TWINSEG_WEIGHTS")
    assert W.default_weights_dir() == W.REPO_ROOT / "weights"
    assert not is_online() and is_online(True)


def test_architecture_mismatch(tmp_path):
    r = create_backbone("resnet_tiny")
    p = export_backbone(r, tmp_path / "r.pt", plain=True)
    with pytest.raises(WeightsError, match="look like a ResNet state dict but backbone=vit_nano_patch8 is a ViT"):
        load_source(create_backbone("vit_nano_patch8", image_size=32), f"checkpoint:{p}")
    # same family, other size -> strict key / shape report
    p2 = export_backbone(create_backbone("vit_tiny_patch16", image_size=32), tmp_path / "t.pt", plain=True)
    with pytest.raises(WeightsError, match="do not match backbone=vit_nano_patch8: 96 unexpected keys.*shape mismatches"):
        load_source(create_backbone("vit_nano_patch8", image_size=32), f"checkpoint:{p2}")
    # twinseg backbone.pt records its arch
    p3 = export_backbone(create_backbone("vit_nano_patch8", image_size=32), tmp_path / "n.pt")
    with pytest.raises(WeightsError, match="holds a vit_nano_patch8 backbone but backbone=vit_tiny_patch16"):
        load_source(create_backbone("vit_tiny_patch16", image_size=32), f"checkpoint:{p3}")
    # official ResNet weights into a ViT through a named source
    ref = torchvision.models.resnet18()
    bad = local_path(WEIGHT_SPECS[("imagenet", "vit_tiny_patch16")], tmp_path)
    bad.parent.mkdir(parents=True)
    save_file(ref.state_dict(), str(bad))
    with pytest.raises(WeightsError, match="look like a ResNet"):
        load_source(create_backbone("vit_tiny_patch16", image_size=32), "imagenet", weights_dir=tmp_path)


def test_source_validation():
    with pytest.raises(ConfigError, match="choose one of: random, imagenet"):
        check_source("pretrain.source", "imagenet21k")
    with pytest.raises(ConfigError, match="no weights for backbone=vit_nano_patch8"):
        check_source("source", "dino", "vit_nano_patch8")
    assert check_source("source", "checkpoint:/x/backbone.pt", "resnet_tiny")
    with pytest.raises(WeightsError, match="sources for it: random"):
        load_source(create_backbone("resnet_tiny"), "imagenet")
    rep = load_source(create_backbone("resnet_tiny"), "random")
    assert rep["loaded"] == 0
    with pytest.raises(WeightsError, match="does not exist"):
        load_source(create_backbone("resnet_tiny"), "checkpoint:/nonexistent/backbone.pt")


def test_corrupt_file(tmp_path):
    p = tmp_path / "bad.pt"
    p.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read"):
        load_source(create_backbone("resnet_tiny"), f"checkpoint:{p}")


def test_urls_agree_with_torchvision():
    M = torchvision.models
    assert WEIGHT_SPECS[("imagenet", "resnet50")].url == M.ResNet50_Weights.IMAGENET1K_V1.url
    assert WEIGHT_SPECS[("imagenet", "resnet18")].url == M.ResNet18_Weights.IMAGENET1K_V1.url
    assert WEIGHT_SPECS[("coco-deeplab", "resnet50")].url == \
        M.segmentation.DeepLabV3_ResNet50_Weights.COCO_WITH_VOC_LABELS_V1.url
    for (src, bb), spec in WEIGHT_SPECS.items():
        if spec.hf_repo:
            assert timm.list_pretrained(spec.hf_repo.split("/", 1)[1]), spec


def test_fetch_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        W.main(["fetch", "--source", "nope", "--dir", str(tmp_path)])
    assert e.value.code == 2
    assert "twinseg: error: --source='nope' is not known" in capsys.readouterr().err
    # a file already present is not downloaded again
    _put(tmp_path, "dino", "vit_small_patch8", {"w": torch.zeros(1)})
    assert W.main(["fetch", "--source", "dino", "--backbone", "vit_small_patch8", "--dir", str(tmp_path)]) == 0
    assert "dino_deitsmall8_pretrain.pth" in capsys.readouterr().out


def test_weight_source_names_are_declared_once():
    """core.config.BASE_SOURCES is the one list: core.weights adds only checkpoint:PATH, every named source but
    random has weight files, and every weight file belongs to a named source."""
    from core.config import BASE_SOURCES
    from core.weights import SOURCES, WEIGHT_SPECS

    assert SOURCES == BASE_SOURCES + ("checkpoint:PATH",)
    assert {s for s, _ in WEIGHT_SPECS} == set(BASE_SOURCES) - {"random"}
