"""Weight sources for a `Backbone`: random, imagenet, barlowtwins-imagenet, dino, coco-deeplab,
checkpoint:PATH.

    report = load_source(backbone, "dino")                  # local weights folder first
    report = load_source(backbone, "checkpoint:runs/x/backbone.pt")

Where files are looked for: ``<weights_dir>/<source>/<file name>`` where ``weights_dir`` is the
argument, else ``$TWINSEG_WEIGHTS``, else ``<repo root>/weights`` (the repo root, not the current
directory, so Ray trials that change directory find the same folder). The hub (direct URL or the
Hugging Face hub for timm weights) is only tried when online: ``online=True``, or ``online=None``
and ``TWINSEG_ONLINE=1`` (and neither ``TWINSEG_OFFLINE`` nor ``HF_HUB_OFFLINE`` is set); a
download is saved to the same local path. Offline and missing: one `WeightsError` naming the file,
the URL and the pre-fetch command ``python -m core.weights fetch --source S --backbone B``.

Safety: every file is read with ``torch.load(map_location="cpu", weights_only=True)`` (or
safetensors); a pickle that would run code is refused unless the caller names ``trusted=True``.
Matching is strict: missing / unexpected / wrongly-shaped keys end in one WeightsError line; known
classifier heads (``fc.*``, ``head.*``, DeepLab ``classifier.*``) are ignored, ViT positional
embeddings are resampled (timm ``resample_abs_pos_embed``) when the grid differs.

`export_backbone(backbone, path)` writes ``{"arch", "library_arch", "state_dict"}`` where
``state_dict`` is the wrapped library model's plain state dict (timm: loads into
``timm.create_model(arch, num_classes=0)`` with strict=True; torchvision: into ``resnet50()`` with
``fc = nn.Identity()``, the official Barlow Twins / DINO format); ``plain=True`` writes the bare
state dict. That file is what ``checkpoint:PATH`` reads back (run folders' ``backbone.pt``).
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from core.config import BASE_SOURCES
from core.errors import ConfigError, StorageError, WeightsError
from core.io import atomic_torch_save, atomic_write

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCES = BASE_SOURCES + ("checkpoint:PATH",)  # the names are declared once, in core.config (no torch import)

_DINO_URL = "https://dl.fbaipublicfiles.com/dino/{0}/{0}.pth"
_BT_URL = ("https://dl.fbaipublicfiles.com/barlowtwins/ep1000_bs2048_lrw0.2_lrb0.0048_lambd0.0051/"
           "resnet50.pth")
# torchvision URLs (the same as torchvision.models.*_Weights.*.url; kept literal so that importing
# this module stays cheap; tests check they agree with torchvision)
_TV_RESNET50 = "https://download.pytorch.org/models/resnet50-0676ba61.pth"      # IMAGENET1K_V1
_TV_RESNET18 = "https://download.pytorch.org/models/resnet18-f37072fd.pth"      # IMAGENET1K_V1
_TV_DEEPLAB = "https://download.pytorch.org/models/deeplabv3_resnet50_coco-cd0a2569.pth"


@dataclass(frozen=True)
class WeightSpec:
    """Where one (source, backbone) weight file comes from and how its keys map."""

    source: str
    backbone: str
    filename: str
    url: str | None = None          # direct download URL
    hf_repo: str | None = None      # Hugging Face hub repo (timm weights)
    hf_file: str = "model.safetensors"
    prefix: str = ""                # key prefix to keep and strip (DeepLab: "backbone.")

    @property
    def where(self) -> str:
        return self.url or f"https://huggingface.co/{self.hf_repo}/resolve/main/{self.hf_file}"


def _specs() -> dict[tuple[str, str], WeightSpec]:
    s: list[WeightSpec] = [
        WeightSpec("imagenet", "resnet50", Path(_TV_RESNET50).name, url=_TV_RESNET50),
        WeightSpec("imagenet", "resnet18", Path(_TV_RESNET18).name, url=_TV_RESNET18),
        WeightSpec("barlowtwins-imagenet", "resnet50", "resnet50.pth", url=_BT_URL),
        WeightSpec("coco-deeplab", "resnet50", Path(_TV_DEEPLAB).name, url=_TV_DEEPLAB,
                   prefix="backbone."),
    ]
    for bb, stem in [("resnet50", "dino_resnet50_pretrain"),
                     ("vit_small_patch16", "dino_deitsmall16_pretrain"),
                     ("vit_small_patch8", "dino_deitsmall8_pretrain"),
                     ("vit_base_patch16", "dino_vitbase16_pretrain"),
                     ("vit_base_patch8", "dino_vitbase8_pretrain")]:
        s.append(WeightSpec("dino", bb, f"{stem}.pth", url=_DINO_URL.format(stem)))
    for bb, tag in [("vit_tiny_patch16", "vit_tiny_patch16_224.augreg_in21k_ft_in1k"),
                    ("vit_small_patch16", "vit_small_patch16_224.augreg_in21k_ft_in1k"),
                    ("vit_base_patch16", "vit_base_patch16_224.augreg2_in21k_ft_in1k"),
                    ("vit_base_patch8", "vit_base_patch8_224.augreg2_in21k_ft_in1k"),
                    ("swin_tiny", "swin_tiny_patch4_window7_224.ms_in1k")]:
        s.append(WeightSpec("imagenet", bb, f"{tag}.safetensors", hf_repo=f"timm/{tag}"))
    return {(w.source, w.backbone): w for w in s}


WEIGHT_SPECS = _specs()

# keys of classifier heads / non-persistent buffers that a backbone never has: dropped silently
_IGNORED = {
    "resnet": re.compile(r"^(fc\.|classifier\.|aux_classifier\.)"),
    "vit": re.compile(r"^(head\.|head_dist\.|fc_norm\.|pre_logits\.)"),
    "swin": re.compile(r"^head\.|(relative_position_index|attn_mask)$"),
    "vitpytorch": re.compile(r"^mlp_head\."),
}
_FAMILY_NAMES = {"resnet": "a ResNet", "vit": "a ViT", "swin": "a Swin Transformer",
                 "vitpytorch": "a vit-pytorch ViT"}
_WRAPPER_PREFIXES = ("timm_model.", "tv_model.", "vp_model.")


# ----------------------------------------------------------------------------- environment
def default_weights_dir(weights_dir: str | os.PathLike | None = None) -> Path:
    if weights_dir is not None:
        return Path(weights_dir)
    env = os.environ.get("TWINSEG_WEIGHTS")
    return Path(env) if env else REPO_ROOT / "weights"


def is_online(online: bool | None = None) -> bool:
    if online is not None:
        return bool(online)
    if os.environ.get("TWINSEG_OFFLINE", "") not in ("", "0") or \
            os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return False
    return os.environ.get("TWINSEG_ONLINE", "") == "1"


def _source_names() -> str:
    return ", ".join(SOURCES)


def available_sources(backbone_name: str) -> list[str]:
    """Sources that can initialise `backbone_name` (besides checkpoint:PATH)."""
    return ["random"] + [s for (s, b) in WEIGHT_SPECS if b == backbone_name]


def check_source(field: str, source: str, backbone_name: str | None = None) -> str:
    """ConfigError when `source` is not a known source (or has no weights for the backbone)."""
    if not isinstance(source, str) or not source:
        raise ConfigError(f"{field}={source!r} is not a weight source; choose one of: {_source_names()}")
    if source.startswith("checkpoint:"):
        if not source[len("checkpoint:"):].strip():
            raise ConfigError(f"{field}={source!r} names no file; use checkpoint:PATH/TO/backbone.pt")
        return source
    if source not in SOURCES:
        raise ConfigError(f"{field}={source!r} is not known; choose one of: {_source_names()}")
    if backbone_name is not None and source != "random" and (source, backbone_name) not in WEIGHT_SPECS:
        raise ConfigError(
            f"{field}={source!r} has no weights for backbone={backbone_name}; sources for it: "
            f"{', '.join(available_sources(backbone_name))}, checkpoint:PATH"
        )
    return source


# ----------------------------------------------------------------------------- reading files
def read_weights_file(path: str | os.PathLike, *, trusted: bool = False):
    """Read a weights file without running pickled code (safetensors or torch weights_only)."""
    path = Path(path)
    if path.is_dir():
        inside = [n for n in ("backbone.pt", "model.pt") if (path / n).is_file()]
        hint = (f"pass the file inside it: {path / inside[0]}" if inside else
                "pass a weights file, e.g. a pretraining run folder's backbone.pt")
        raise WeightsError(f"weights path {path} is a folder, not a file; {hint}")
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            return load_file(str(path), device="cpu")
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
            raise WeightsError(f"cannot read {path} as safetensors ({type(e).__name__}); re-download it") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "global" not in str(e).lower() and _is_plain_pickle(path):
            raise WeightsError(f"{path} is a plain Python pickle, not a torch weights file (torch.save); re-save "
                               "its state dict with torch.save(state_dict, path) or as .safetensors") from e
        if "global" not in str(e).lower():  # garbage bytes, not a disallowed class / function
            raise WeightsError(f"cannot read {path} as a torch weights file (not a pickle/zip "
                               f"checkpoint); re-download or re-save it") from e
        if not trusted:
            raise WeightsError(
                f"{path} is not a plain weights file (refusing to unpickle code); re-save it as a "
                f"state dict, or pass trusted=True only for files you trust"
            ) from e
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file ...
        raise WeightsError(f"cannot read {path} as a torch weights file ({type(e).__name__}: "
                           f"{str(e)[:120]}); re-download or re-save it") from e
    return torch.load(path, map_location="cpu", weights_only=False)  # explicit trusted=True only


def _is_plain_pickle(path: Path) -> bool:
    """A file written by pickle.dump (protocol >= 2 starts with the PROTO opcode), not by torch.save."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _tensor_dict(obj, path) -> dict[str, torch.Tensor]:
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise WeightsError(f"{path} holds no state dict of tensors; expected a (Lightning / "
                           f"twinseg / timm / torchvision) checkpoint")
    return obj


def _unwrap(obj, path) -> tuple[dict[str, torch.Tensor], str | None]:
    """-> (state dict, arch recorded in a twinseg backbone.pt or None)."""
    arch = None
    if isinstance(obj, dict):
        if "state_dict" in obj and isinstance(obj["state_dict"], dict):
            arch = obj.get("arch") if isinstance(obj.get("arch"), str) else None
            obj = obj["state_dict"]
        elif "teacher" in obj and isinstance(obj["teacher"], dict):  # full DINO training checkpoint
            obj = obj["teacher"]
        elif "model" in obj and isinstance(obj["model"], dict):
            obj = obj["model"]
    return _tensor_dict(obj, path), arch


def _strip(sd: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _strip_checkpoint_prefixes(sd: dict, path) -> tuple[dict, str]:
    """Lightning / DDP / wrapper prefixes -> plain library keys; returns (sd, prefix used)."""
    if all(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    used = ""
    if not any(k.startswith(_WRAPPER_PREFIXES) or _looks_plain(k) for k in sd):
        cands = sorted({m.group(1) for k in sd for m in [re.match(r"^(.*?backbone\.)", k)] if m})
        if "backbone." in cands:
            used = "backbone."
        elif len(cands) == 1:
            used = cands[0]
        elif cands:
            teacher = [c for c in cands if "teacher" in c]
            used = teacher[0] if teacher else cands[0]
        else:
            raise WeightsError(f"{path} has no backbone keys (expected plain keys or a "
                               f"'backbone.' prefix as in a twinseg Lightning checkpoint)")
        sd = _strip(sd, used)
    for p in _WRAPPER_PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = _strip(sd, p)
            used += p
    return sd, used


def _looks_plain(k: str) -> bool:
    return bool(re.match(r"^(conv1\.|bn1\.|layer\d\.|cls_token|pos_embed|patch_embed\.|blocks\.\d|"
                         r"layers\.\d|norm\.|to_patch_embedding|transformer\.|pos_embedding)", k))


def guess_family(sd: dict) -> str | None:
    keys = set(sd)
    if any(k.startswith("layer1.") for k in keys) and "conv1.weight" in keys:
        return "resnet"
    if any(k.startswith("blocks.") for k in keys) and any(k.startswith("patch_embed.") for k in keys):
        return "vit"
    if any(k.startswith("layers.") for k in keys) and any(k.startswith("patch_embed.") for k in keys):
        return "swin"
    if any(k.startswith("transformer.layers.") for k in keys):
        return "vitpytorch"
    return None


# ----------------------------------------------------------------------------- matching
def _resize_pos_embed(backbone, sd: dict, resized: list) -> None:
    from timm.layers import resample_abs_pos_embed

    lib = backbone.library_model
    if backbone.family == "vit" and "pos_embed" in sd:
        old, new = sd["pos_embed"], lib.pos_embed
        if old.shape != new.shape and old.dim() == 3 and old.shape[-1] == new.shape[-1]:
            npt = 0 if getattr(lib, "no_embed_class", False) else int(lib.num_prefix_tokens)
            n_old = old.shape[1] - npt
            gs = int(round(n_old ** 0.5))
            if gs * gs == n_old:
                grid = lib.patch_embed.grid_size
                sd["pos_embed"] = resample_abs_pos_embed(old, new_size=list(grid), old_size=[gs, gs],
                                                         num_prefix_tokens=npt)
                resized.append(f"pos_embed {tuple(old.shape)}->{tuple(sd['pos_embed'].shape)}")
    if backbone.family == "vitpytorch" and "pos_embedding" in sd:
        old, new = sd["pos_embedding"], lib.pos_embedding
        if old.shape != new.shape and old.dim() == 2 and old.shape[-1] == new.shape[-1]:
            gs = int(round((old.shape[0] - 1) ** 0.5))
            if gs * gs == old.shape[0] - 1:
                sd["pos_embedding"] = resample_abs_pos_embed(
                    old.unsqueeze(0), new_size=list(backbone.base_grid), old_size=[gs, gs],
                    num_prefix_tokens=1)[0]
                resized.append(f"pos_embedding {tuple(old.shape)}->{tuple(sd['pos_embedding'].shape)}")


def _fmt(keys: list[str], n: int = 4) -> str:
    head = ", ".join(keys[:n])
    return head + (f" ... (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_into(backbone, sd: dict[str, torch.Tensor], *, origin: str,
                         source: str = "checkpoint") -> dict:
    """Strictly load plain library keys `sd` into `backbone.library_model`; returns the report."""
    fam = guess_family(sd)
    if fam is not None and fam != backbone.family:
        raise WeightsError(
            f"weights {origin} look like {_FAMILY_NAMES[fam]} state dict but backbone="
            f"{backbone.name} is {_FAMILY_NAMES[backbone.family]}; pick weights made for "
            f"{backbone.name} (or the matching backbone)"
        )
    lib = backbone.library_model
    ign = _IGNORED[backbone.family]
    target = lib.state_dict()
    sd = dict(sd)
    ignored = sorted(k for k in sd if ign.search(k) and k not in target)
    for k in ignored:
        del sd[k]
    resized: list[str] = []
    _resize_pos_embed(backbone, sd, resized)
    missing = sorted(k for k in target if k not in sd and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in sd if k not in target)
    shape = sorted(f"{k} {tuple(sd[k].shape)} vs {tuple(target[k].shape)}" for k in sd
                   if k in target and sd[k].shape != target[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_fmt(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_fmt(unexpected)})")
        if shape:
            parts.append(f"{len(shape)} shape mismatches ({_fmt(shape, 2)})")
        raise WeightsError(
            f"weights {origin} do not match backbone={backbone.name}: {'; '.join(parts)}; use "
            f"weights saved from the same architecture"
        )
    check_finite_state(sd, origin)
    sd = {k: v.to(target[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}
    lib.load_state_dict(sd, strict=False)
    return {"source": source, "backbone": backbone.name, "path": origin, "loaded": len(sd),
            "missing": [], "unexpected": [], "ignored": ignored, "resized": resized}


def check_finite_state(sd: dict[str, torch.Tensor], origin: str) -> None:
    """Weights with NaN / inf values (saved from a diverged run) -> NonFiniteError naming the file and
    the first tensor; training from them would only produce NaN."""
    from core.errors import NonFiniteError

    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        n = sum(int((~torch.isfinite(sd[k])).sum()) for k in bad)
        raise NonFiniteError(f"weights {origin} hold {n} NaN/inf values ({len(bad)} tensors, first {bad[0]}); they "
                             "come from a diverged run: retrain it with a lower lr, or use other weights")


# ----------------------------------------------------------------------------- sources
def local_path(spec: WeightSpec, weights_dir=None) -> Path:
    return default_weights_dir(weights_dir) / spec.source / spec.filename


def fetch(spec: WeightSpec, weights_dir=None, *, progress: bool = True) -> Path:
    """Download one weight file to its local path (atomic rename) and check it reads safely."""
    dst = local_path(spec, weights_dir)
    if dst.is_file():
        return dst

    def download(tmp: str) -> None:  # into core.io's temp file, checked before it is renamed into place
        if spec.url:
            torch.hub.download_url_to_file(spec.url, tmp, progress=progress)
        else:
            from huggingface_hub import hf_hub_download
            got = hf_hub_download(spec.hf_repo, spec.hf_file)
            shutil.copyfile(got, tmp)
        read_weights_file(tmp)  # the temp name keeps the suffix for the safetensors check

    try:
        atomic_write(dst, download, dst.suffix, what=f"the {spec.source} weights of {spec.backbone}")
    except (WeightsError, StorageError):
        raise
    except Exception as e:  # noqa: BLE001 - network / hub failures -> one line
        raise WeightsError(f"could not download {spec.where} to {dst} ({type(e).__name__}: "
                           f"{str(e)[:120]}); check the network or copy the file there by hand") from e
    return dst


def _resolve(spec: WeightSpec, weights_dir, online) -> Path:
    path = local_path(spec, weights_dir)
    if path.is_file():
        return path
    if is_online(online):
        return fetch(spec, weights_dir)
    raise WeightsError(
        f"{spec.source} weights for {spec.backbone} not found at {path} (offline); download "
        f"{spec.where} to that path, or run `python -m core.weights fetch --source {spec.source} "
        f"--backbone {spec.backbone}` on an online machine and copy its weights/ folder here "
        f"(or set TWINSEG_ONLINE=1)"
    )


def source_files(source: str, backbone_name: str, weights_dir=None) -> list[Path]:
    """The weight files a run starting from `source` reads (resolved; none for random): part of a result's
    identity (core/runs/identity.py). A named source's file may not be there yet (it is fetched when online)."""
    if source == "random":
        return []
    if source.startswith("checkpoint:"):
        return [Path(source[len("checkpoint:"):].strip()).expanduser().resolve()]
    spec = WEIGHT_SPECS.get((source, backbone_name))
    return [] if spec is None else [local_path(spec, weights_dir).resolve()]


_DIGESTS: dict[tuple, str] = {}


def file_sha256(path: str | os.PathLike) -> str | None:
    """sha256 of a file's content (None: no such file); remembered per (path, size, mtime) in this process."""
    import hashlib

    path = Path(path)
    try:
        st = path.stat()
    except OSError:
        return None
    if not path.is_file():
        return None
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:
            return None
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def load_source(backbone, source: str, weights_dir=None, online: bool | None = None, *,
                trusted: bool = False) -> dict:
    """Initialise `backbone` from `source`; returns a report dict (source, path, loaded, ignored,
    resized, missing, unexpected). `trusted=True` (must be named) allows full unpickling."""
    check_source("source", source)
    if source == "random":
        return {"source": "random", "backbone": backbone.name, "path": None, "loaded": 0,
                "missing": [], "unexpected": [], "ignored": [], "resized": []}
    if source.startswith("checkpoint:"):
        path = Path(source[len("checkpoint:"):].strip()).expanduser()
        obj = read_weights_file(path, trusted=trusted)
        sd, arch = _unwrap(obj, path)
        sd, prefix = _strip_checkpoint_prefixes(sd, path)
        if arch is not None and arch != backbone.name:
            raise WeightsError(
                f"checkpoint {path} holds a {arch} backbone but backbone={backbone.name}; use "
                f"backbone={arch} or a checkpoint of {backbone.name}"
            )
        report = load_state_dict_into(backbone, sd, origin=str(path), source=source)
        report["prefix"] = prefix
        return report
    spec = WEIGHT_SPECS.get((source, backbone.name))
    if spec is None:
        raise WeightsError(
            f"source={source} has no weights for backbone={backbone.name}; sources for it: "
            f"{', '.join(available_sources(backbone.name))}, checkpoint:PATH"
        )
    path = _resolve(spec, weights_dir, online)
    obj = read_weights_file(path, trusted=trusted)
    sd, _ = _unwrap(obj, path)
    if all(k.startswith("module.") for k in sd):
        sd = _strip(sd, "module.")
    if spec.prefix:
        sd = _strip(sd, spec.prefix)
    report = load_state_dict_into(backbone, sd, origin=str(path), source=source)
    report["url"] = spec.where
    return report


def export_backbone(backbone, path: str | os.PathLike, *, plain: bool = False,
                    extra: dict | None = None) -> Path:
    """Save the wrapped library model's plain state dict (see module docstring)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().clone() for k, v in backbone.library_model.state_dict().items()}
    obj = sd if plain else {"arch": backbone.name, "library_arch": backbone.library_arch,
                            "state_dict": sd, **(extra or {})}
    atomic_torch_save(obj, path)  # in memory, then temp file + fsync + rename; a full disk: one line
    return path


# ----------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from core.cli import guard

    @guard
    def _main(argv):
        ap = argparse.ArgumentParser(prog="python -m core.weights",
                                     description="Pre-fetch / list pretrained weights for twinseg.")
        sub = ap.add_subparsers(dest="cmd", required=True)
        f = sub.add_parser("fetch", help="download weights into the weights folder")
        f.add_argument("--source", default=None, help="one source (default: all)")
        f.add_argument("--backbone", default=None, help="one backbone (default: all)")
        f.add_argument("--dir", default=None, help="weights folder (default $TWINSEG_WEIGHTS or weights/)")
        ls = sub.add_parser("list", help="list known weight files and whether they are present")
        ls.add_argument("--dir", default=None)
        a = ap.parse_args(argv)
        if a.cmd == "list":
            for spec in WEIGHT_SPECS.values():
                p = local_path(spec, a.dir)
                print(f"{spec.source:22s} {spec.backbone:18s} {'present' if p.is_file() else 'missing':8s} {p}")
            return 0
        if a.source is not None:
            check_source("--source", a.source)
        if a.backbone is not None:
            from core.models.registry import check_backbone_name
            check_backbone_name("--backbone", a.backbone)
        specs = [s for s in WEIGHT_SPECS.values()
                 if (a.source is None or s.source == a.source)
                 and (a.backbone is None or s.backbone == a.backbone)]
        if not specs:
            raise WeightsError(f"no weights known for source={a.source} backbone={a.backbone}; "
                               f"see `python -m core.weights list`")
        for spec in specs:
            print(f"{spec.source} {spec.backbone}: {fetch(spec, a.dir)}")
        return 0

    return _main(argv)


if __name__ == "__main__":
    sys.exit(main())
