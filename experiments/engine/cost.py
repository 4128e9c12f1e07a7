"""What a grid will cost before it runs: device-hours and disk, per stage (`grid.py --dry-run` prints it,
and a real start prints its one-line summary). What depends on the stage (the split it trains on, whether
it reads the SSL images, steps instead of epochs, the parameters trained besides the backbone) is read
from its `core.stages` entry.

    device-hours of a trial = epochs x training images / throughput (images/s) / 3600 x devices

with the throughput read from `THROUGHPUT`, the ONE table of training speeds (per backbone, device kind
and stage, at a reference image size; scaled by pixel count to the trial's size). Every row says where
its number comes from (`source`): measured on this project's CPU (BENCHMARKS.md), or "not measured:
estimate from <reference>". **No GPU has been measured yet**: every GPU row is an estimate, and the
printed estimate says so. Evaluation, k-NN, figures and start-up time are not counted (small next to
training on real data, dominant on the tiny CPU grids: read the CPU numbers as a lower bound).

Disk of a finished trial: its weights (`backbone.pt` = backbone parameters x 4 bytes; `model.pt` =
backbone + head) plus `FIGURES_MB`; the Lightning checkpoint (weights + optimiser state, ~3x the
trained parameters) exists only while the trial runs (removed on success), so it is counted as the
peak of the running trials, not as what stays.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Optional

from core.config import SEG_DATASETS  # the generated datasets (root none): VOC and COCO-Stuff layouts
from core.stages import get_stage, stages

BYTES_PER_PARAM = 4  # fp32 state dicts
CKPT_FACTOR = 3  # last.ckpt: weights + two optimiser moments (AdamW; LARS keeps one: an upper bound)
FIGURES_MB = 2.0
"""Figures per trial (attention / ERF / cross-correlation / prediction PNGs): not measured, an allowance."""


@dataclass(frozen=True)
class Throughput:
    """Training images per second of one device for `backbone` at `image_size` px (one row of THROUGHPUT)."""

    backbone: str
    device: str  # "cpu" | "gpu"
    stage: str  # a stage name (core.stages) | "any"
    images_per_s: float
    image_size: int
    source: str  # where the number comes from (measured where, or "not measured: estimate from ...")


_SMOKE = ("measured: `make run` on this project's 2-core CPU (the smoke grid's metrics.json images_per_s, 64 px, "
          "two trials at once, one core each; Barlow Twins pretraining, fine-tuning segmentation)")
_BENCH224 = "measured on this project's 2-core CPU (BENCHMARKS.md, 224 px, batch 16, model mode)"
_H100 = ("not measured: estimate from BENCHMARKS.md's H100 target (>= 1500 img/s, bf16, 224 px, pipeline "
         "included), a target, not a measurement")
_DINO = ("not measured: estimate = the H100 target x the {ratio} throughput ratio of {name} to ViT-S/16 in "
         "Caron et al. 2021 (DINO), Table 2 im/s (V100 inference: ViT-S/16 1007, {name} {ims})")

THROUGHPUT: tuple[Throughput, ...] = (
    Throughput("vit_nano_patch8", "cpu", "pretrain", 68.0, 64, _SMOKE),
    Throughput("vit_nano_patch8", "cpu", "segment", 33.0, 64, _SMOKE + "; E2-E5 with the smoke grid's 128-wide "
               "SETR-PUP head (34-36 img/s; E3 21)"),
    Throughput("resnet_tiny", "cpu", "pretrain", 20.0, 64, _SMOKE),
    Throughput("resnet_tiny", "cpu", "segment", 28.7, 64, _SMOKE),
    Throughput("swin_nano", "cpu", "any", 13.0, 64,
               "not measured: estimate, assumed like vit_nano_patch8's segmentation on this CPU"),
    Throughput("resnet50", "cpu", "any", 0.58, 224, _BENCH224),
    Throughput("vit_small_patch16", "cpu", "any", 0.60, 224, _BENCH224),
    Throughput("resnet50", "gpu", "any", 1500.0, 224, _H100),
    Throughput("vit_small_patch16", "gpu", "any", 1500.0, 224, _H100),
    Throughput("vit_base_patch16", "gpu", "any", 465.0, 224, _DINO.format(ratio="0.31", name="ViT-B/16", ims=312)),
    Throughput("vit_small_patch8", "gpu", "any", 268.0, 224, _DINO.format(ratio="0.18", name="ViT-S/8", ims=180)),
    Throughput("vit_base_patch8", "gpu", "any", 94.0, 224, _DINO.format(ratio="0.06", name="ViT-B/8", ims=63)),
    Throughput("swin_tiny", "gpu", "any", 1500.0, 224,
               "not measured: estimate, assumed equal to ResNet-50's H100 target (similar FLOPs: 4.5 vs 4.1 GFLOPs)"),
)
"""The one table of training speeds. A backbone / device without a row is scaled from the row of the
same device with the closest parameter count (by parameter count and pixels), and says so."""

DATASET_IMAGES = {  # (dataset, split) -> training images of the real dataset
    ("voc", "train"): 1464,
    ("voc", "trainaug"): 10582,
    ("voc", "all_but_val"): 15676,
    ("coco_stuff", "train"): 118287,
}
"""Training images of the real datasets (VOC2012 train 1464, SBD trainaug 10582, the 17125 VOC2012
images minus the 1449 val; COCO-Stuff 164k train 118287). Generated data: `synthetic_n_train`."""


@functools.lru_cache(maxsize=None)
def param_count(backbone: str) -> int:
    """Parameters of a backbone (built on torch's meta device: no memory, no weights)."""
    import torch

    from core.models.registry import create_backbone

    with torch.device("meta"):
        return sum(p.numel() for p in create_backbone(backbone).parameters())


def _params(backbone: str) -> Optional[int]:
    try:
        return param_count(backbone)
    except Exception:  # noqa: BLE001 - an unknown name is the grid's problem, not the estimate's
        return None


def throughput(backbone: str, device: str, stage: str, image_size: int) -> tuple[float, str]:
    """(images/s, source) for one trial: its row scaled to `image_size`, or the closest row's."""
    rows = [r for r in THROUGHPUT if r.device == device and r.stage in (stage, "any")]
    own = [r for r in rows if r.backbone == backbone]
    if own:
        r = own[0]
        return r.images_per_s * (r.image_size / image_size) ** 2, r.source
    n = _params(backbone)
    if not rows:
        return 1.0, "not measured: no row for this device kind (1 img/s assumed)"
    if n is None:
        r = rows[0]
        return r.images_per_s * (r.image_size / image_size) ** 2, f"not measured: {r.backbone}'s row used"
    r = min(rows, key=lambda x: abs((_params(x.backbone) or n) - n))
    ips = r.images_per_s * (r.image_size / image_size) ** 2 * (_params(r.backbone) or n) / n
    return ips, f"not measured: scaled from {r.backbone} by parameter count and pixels"


def train_images(cfg: dict, stage: str) -> tuple[int, str]:
    """Training images per epoch of a trial's config dict, and how they were counted: the split its stage
    trains on (`StageSpec.train_split`), or `data.ssl_root` for a stage reading the SSL images."""
    data = cfg.get("data") or {}
    st = get_stage(stage)
    if data.get("root") is None and data.get("dataset", "voc") in SEG_DATASETS and not data.get("ssl_root"):
        n, how = int(data.get("synthetic_n_train", 400)), "generated"
    else:
        split = st.train_split(cfg)
        key = (data.get("dataset", "voc"), split if data.get("dataset", "voc") == "voc" else "train")
        if data.get("ssl_root") and st.trains_on_ssl_images:
            n, how = 1_281_167, "ssl_root assumed ImageNet-1k sized"
        else:
            n, how = DATASET_IMAGES.get(key, 10_000), f"{key[0]} {key[1]}"
    if data.get("limit_train"):
        n = min(n, int(data["limit_train"]))
    return n, how


@dataclass
class TrialCost:
    id: str
    stage: str
    device: str
    images: int  # images processed by training (epochs x images, or max_iters x batch)
    device_hours: float
    keep_mb: float  # what stays after success
    peak_mb: float  # extra while running (the checkpoint)
    source: str


@dataclass
class GridCost:
    trials: list[TrialCost] = field(default_factory=list)

    def stage(self, stage: str) -> list[TrialCost]:
        return [t for t in self.trials if t.stage == stage]

    def totals(self, stage: Optional[str] = None) -> tuple[float, float, float]:
        ts = self.trials if stage is None else self.stage(stage)
        return (sum(t.device_hours for t in ts), sum(t.keep_mb for t in ts), max([t.peak_mb for t in ts] + [0.0]))

    def sources(self) -> list[str]:
        out: list[str] = []
        for t in self.trials:
            if t.source not in out:
                out.append(t.source)
        return out

    def text(self) -> str:
        """The dry run's cost block: one line per stage, the total, and where the speeds come from."""
        out = []
        for stage in stages():
            ts = self.stage(stage)
            if not ts:
                continue
            h, keep, peak = self.totals(stage)
            dev = "/".join(sorted({t.device for t in ts}))
            out.append(f"cost     {stage:<8} {len(ts)} trial(s), {sum(t.images for t in ts):,} training images in all: "
                        f"~{_hours(h)} {dev} device-hours; disk kept {_mb(keep)} (+ up to {_mb(peak)} per running "
                        "trial for its checkpoint)")
        h, keep, _ = self.totals()
        gpu_est = any(t.device == "gpu" for t in self.trials)
        out.append(f"cost     all      ~{_hours(h)} device-hours, {_mb(keep)} kept on disk (training only; evaluation "
                   "and start-up not counted)" + ("; GPU speeds are NOT measured yet (estimates)" if gpu_est else ""))
        for i, src in enumerate(self.sources(), 1):
            out.append(f"  speed [{i}] {src}")
        return "\n".join(out)

    def short(self) -> str:
        """One line for the start of a real run."""
        h, keep, peak = self.totals()
        parts = []
        for stage in stages():
            if self.stage(stage):
                parts.append(f"{stage} ~{_hours(self.totals(stage)[0])} h")
        measured = all(not t.source.startswith("not measured") for t in self.trials)
        return (f"cost     estimate ~{_hours(h)} device-hours ({', '.join(parts)}), {_mb(keep)} kept on disk; "
                + ("speeds measured on this CPU" if measured else "some speeds are estimates (--dry-run lists them)"))


def _hours(h: float) -> str:
    return f"{h:.3g}" if h < 100 else f"{h:,.0f}"


def _mb(mb: float) -> str:
    return f"{mb / 1024:.3g} GB" if mb >= 1024 else f"{mb:.3g} MB"


def estimate_trial(t) -> TrialCost:
    """The cost of one `experiments.engine.spec.TrialSpec`."""
    cfg, stage = t.config, t.stage
    st = get_stage(stage)
    device = "gpu" if float((t.resources or {}).get("gpu", 0) or 0) > 0 else "cpu"
    workers = int((t.resources or {}).get("workers", 1))
    size = int((cfg.get("data") or {}).get("image_size", 64))
    n, _how = train_images(cfg, stage)
    if st.iterations_field and cfg.get(st.iterations_field):  # a budget in steps: steps x global batch
        images = int(cfg[st.iterations_field]) * int(cfg.get("batch_size", 1)) * workers
    else:
        images = int(cfg.get("epochs", 1)) * n
    ips, source = throughput(str(cfg.get("backbone")), device, stage, size)
    hours = images / max(ips, 1e-9) / 3600.0  # device-seconds: N workers at N x speed = the same total
    params = _params(str(cfg.get("backbone"))) or 0
    weights_mb = params * BYTES_PER_PARAM / 2**20
    trained_mb = (params + st.head_params(cfg)) * BYTES_PER_PARAM / 2**20
    return TrialCost(t.id, stage, device, images, hours, weights_mb + FIGURES_MB, trained_mb * CKPT_FACTOR, source)


def estimate_grid(spec) -> GridCost:
    """The cost of every trial of an `experiments.engine.spec.GridSpec`."""
    return GridCost([estimate_trial(t) for t in spec.trials])
