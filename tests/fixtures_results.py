"""Builder of fake-but-format-exact grid results folders (ARCHITECTURE.md, "Run folder" and "Grid
results folder"), for testing analysis/report.py without running a grid.

    built = build_results(tmp_path / "smoke-20250101-000000", partial=True)
    built.root, built.trials[id] -> {"stage", "status", "config", "metrics", ...}

Study layout (defaults): Barlow Twins on `vit_nano_patch8` over 2 lambdas x 2 seeds, Barlow Twins on
`resnet_tiny` (for E1) x 2 seeds, DINO on `vit_nano_patch8` x 2 seeds, one VICReg trial on
`vit_nano_patch8` (first seed; no evaluation consumes it); segmentation E1-E5 x 2 seeds (E2 for each
lambda), each depending on the pretraining trial of the same seed. Metric values are deterministic
functions of the variant and seed. Config dicts use the real config field names (defaults read from
the dataclasses without validating, so no model registry is needed).

Format (as experiments/grid.py and core/runs write it now): summary.json entries carry `labels` (the
stage-1 axis values, null where an axis does not apply to the method; segmentation: evaluation +
the consumed trial's labels + `from`), pretraining metrics.json carries `method` and `method_label`
(only Barlow Twins writes `lambd` and the cross-correlation statistics), and config.json nests each
method's options in its own section. `legacy=True` writes a folder as the code did before: no labels,
no method_label, a flat `lambd` in every pretraining config and metrics.json (DINO included), and
null cross-correlation statistics for DINO; no VICReg. Non-legacy pretraining metrics also carry the
collapse monitors (`embedding_std`, `embedding_rank`, `collapsed`, `collapse_reason`: the DINO seed-1 run
collapsed) and the emerging-properties measures (`attn_jaccard`, ViTs only; `dense_probe_miou`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from core.stages import PRETRAIN, SEGMENT, get_stage

VOC_CLASSES = [
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
EVAL_SPEC = {  # evaluation -> (backbone kind, head, fusion, pretraining method)
    "E1": ("cnn", "deeplabv3", "none", "barlow_twins"),
    "E2": ("vit", "setr_pup", "none", "barlow_twins"),
    "E3": ("vit", "setr_pup", "features", "barlow_twins"),
    "E4": ("vit", "setr_pup", "affinity", "barlow_twins"),
    "E5": ("vit", "setr_pup", "affinity", "dino"),
}
EVAL_BASE = {"E1": 30.0, "E2": 40.0, "E3": 44.0, "E4": 47.0, "E5": 45.0}
METHOD_LABEL = {"barlow_twins": "Barlow Twins", "dino": "DINO", "vicreg": "VICReg"}
METHOD_SHORT = {"barlow_twins": "bt", "dino": "dino", "vicreg": "vicreg"}
STAGE1_AXES = ("backbone", "source", "method", "lambd", "seed")  # experiments/engine/axes.py stage1_axes() order


def _defaults(cls_path: str) -> dict:
    """Field defaults of a config dataclass (no validation), JSON-shaped like `to_dict()`."""
    try:
        import importlib

        mod, name = cls_path.rsplit(".", 1)
        cls = getattr(importlib.import_module(mod), name)
        out = {}
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                v = f.default_factory()  # type: ignore[misc]
                out[f.name] = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        return json.loads(json.dumps(out))
    except Exception:  # the config module is not importable: a minimal stand-in
        return {"data": {"dataset": "voc", "root": None, "image_size": 64}}


@dataclass
class Built:
    root: Path
    trials: dict[str, dict] = field(default_factory=dict)  # id -> summary entry (+ "planned_status")

    def ids(self, stage: Optional[str] = None, status: Optional[str] = None) -> list[str]:
        return [i for i, t in self.trials.items()
                if (stage is None or t["stage"] == stage) and (status is None or t["status"] == status)]


def write_png(path: Path, seed: int = 0, size: int = 16) -> None:
    """A small valid RGB PNG (random blue/red heatmap)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    v = rng.random((size, size))
    rgb = np.stack([v, 0.3 * np.ones_like(v), 1 - v], axis=-1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rgb * 255).astype(np.uint8), "RGB").save(path, format="PNG")


def _write_csv(path: Path, rows: list[dict]) -> None:
    cols: list[str] = []
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def pretrain_metrics(method: str, backbone: str, lambd: float, seed: int, epochs: int, legacy: bool = False) -> dict:
    """metrics.json of a pretraining run. `lambd` is the Barlow Twins option (ignored by the others,
    except that legacy runs wrote it for every method)."""
    bt = method == "barlow_twins"
    if bt:
        knn = 40.0 + 8.0 * math.log10(max(lambd, 1e-4) / 0.001) + 1.5 * seed + (5.0 if backbone.startswith("vit") else 0.0)
        secs = 100.0 + 5.0 * seed
        loss = 120.0 - 10 * seed
    elif method == "dino":
        knn = 52.0 + 1.0 * seed
        secs = 260.0 + 10.0 * seed
        loss = 6.5 - 0.1 * seed
    else:  # vicreg
        knn = 50.0 + 1.0 * seed
        secs = 180.0 + 8.0 * seed
        loss = 22.0 - 0.5 * seed
    m = {"stage": PRETRAIN.name, "method": method}
    if legacy:
        m["lambd"] = lambd
    else:
        m["method_label"] = METHOD_LABEL[method]
    m.update({"backbone": backbone, "source": "random", "seed": seed})
    if bt and not legacy:
        m.update({"lambd": lambd, "cc_diag_mean": 0.8 + 0.01 * seed, "cc_offdiag_rms": 0.02 + 0.001 * seed})
    m.update({
        "knn_acc": knn, "knn_acc_init": 20.0 + seed, "linear_probe_acc": knn + 3.0,
        "dense_rank": 20.0 + seed, "dense_rank_init": 30.0, "dense_local_var": 0.4, "dense_local_var_init": 0.6,
        "final_loss": loss, "epochs": epochs, "wall_time_s": secs * 1.1, "device_seconds": secs, "device": "cpu",
        "images_per_s": 96 * epochs / secs, "peak_mem_mb": {"barlow_twins": 300.0, "dino": 500.0}.get(method, 350.0),
        "backbone_path": "",  # filled with the trial path
    })
    if not legacy:  # the collapse monitors and the emerging-properties measures (attention: ViTs only)
        collapsed = method == "dino" and seed == 1  # one collapsed run: a uniform DINO teacher
        m.update({
            "embedding_std": 0.02 if collapsed else 0.5 + 0.05 * seed, "embedding_rank": 12.0 + seed,
            "collapsed": collapsed,
            "collapse_reason": "uniform collapse: teacher_entropy 5.0 >= 0.9 x ln K" if collapsed else None,
            "attn_jaccard": (20.0 + knn / 10) if backbone.startswith("vit") else None,  # percent
            "dense_probe_miou": 10.0 + knn / 5,
        })
    if legacy:  # the old writer: cross-correlation statistics for every method, null unless Barlow Twins
        m["cc_diag_mean"] = 0.8 + 0.01 * seed if bt else None
        m["cc_offdiag_rms"] = 0.02 + 0.001 * seed if bt else None
    return m


def pretrain_config(cfg0: dict, method: str, backbone: str, lambd: float, seed: int, epochs: int,
                    legacy: bool = False) -> dict:
    """config.json of a pretraining run: the method options in per-method sections (the grid sets
    the lambd axis only in the Barlow Twins section; the other runs keep its default there), or, for a
    legacy run, a flat `lambd` and no sections."""
    cfg = {**cfg0, "method": method, "backbone": backbone, "source": "random", "seed": seed, "epochs": epochs}
    if legacy:
        for sec in METHOD_LABEL:
            cfg.pop(sec, None)
        cfg["lambd"] = lambd
        return cfg
    cfg["barlow_twins"] = {"lambd": 0.0051, "scale": 1.0, **(cfg0.get("barlow_twins") or {})}
    cfg.setdefault("dino", {"out_dim": 1024})
    cfg.setdefault("vicreg", {"sim_coeff": 25.0, "std_coeff": 25.0, "cov_coeff": 1.0})
    if method == "barlow_twins":
        cfg["barlow_twins"] = {**cfg["barlow_twins"], "lambd": lambd}
    return cfg


def pretrain_labels(method: str, backbone: str, lambd: float, seed: int) -> dict:
    """summary.json labels of a pretraining trial: every stage-1 axis, null where it does not apply."""
    vals = {"backbone": backbone, "source": "random", "method": method,
            "lambd": lambd if method == "barlow_twins" else None, "seed": seed}
    return {k: vals[k] for k in STAGE1_AXES}


CONTROL_OFFSET = {"random": -6.0, "imagenet": -2.0}  # mIoU of a control below the pretrained rows (others: -1)
DATASET_OFFSET = {"voc": 0.0, "coco_stuff": -15.0}


def control_jitter(seed: int) -> float:
    """A control's seed-to-seed noise, unlike the pretrained rows' (so a difference has a spread)."""
    return (0.0, 1.3, -0.4, 0.9)[seed % 4]


def segment_metrics(evaluation: str, backbone: str, head: str, fusion: str, source: str, seed: int,
                    lambd: Optional[float], dataset: str = "voc", control: Optional[str] = None) -> dict:
    """metrics.json of a segmentation run; `control`: the weight source of a trial that used no stage-1 run."""
    base = EVAL_BASE[evaluation] + 2.0 * seed + (10.0 * lambd if lambd is not None else 0.0) + DATASET_OFFSET[dataset]
    if control is not None:
        base += CONTROL_OFFSET.get(control, -1.0) + control_jitter(seed)
    iou = [round(base + ((7 * i + 3 * seed) % 11) - 5.0, 4) for i in range(len(VOC_CLASSES))]
    miou = float(np.mean(iou))
    return {
        "stage": SEGMENT.name, "evaluation": evaluation, "backbone": backbone, "head": head, "fusion": fusion,
        "source": source, "dataset": dataset, "mode": "finetune", "seed": seed, "mIoU": miou, "aAcc": 70.0 + miou / 4,
        "mAcc": miou + 5.0, "IoU": iou, "class_names": list(VOC_CLASSES),
        "wall_time_s": 50.0 + seed, "device_seconds": 45.0 + seed, "device": "cpu", "images_per_s": 80.0,
        "peak_mem_mb": 250.0,
    }


def _pretrain_history(m: dict) -> list[dict]:
    rows, step = [], 0
    e = m["epochs"]
    for ep in range(e):
        frac = (ep + 1) / e
        for _ in range(2):
            rows.append({"epoch": ep, "step": step, "train/loss_step": m["final_loss"] * (2 - frac) + 1.0})
            step += 1
        row = {"epoch": ep, "step": step - 1, "train/loss_epoch": m["final_loss"] * (2 - frac),
               "knn_acc": m["knn_acc_init"] + (m["knn_acc"] - m["knn_acc_init"]) * frac, "lr-LARS": 0.1 * (1 - frac)}
        if m.get("cc_diag_mean") is not None:
            row["cc_diag_mean"] = m["cc_diag_mean"] * frac
            row["cc_offdiag_rms"] = m["cc_offdiag_rms"] * (2 - frac)
        rows.append(row)
    return rows


def _segment_history(m: dict, epochs: int) -> list[dict]:
    rows = []
    for ep in range(epochs):
        frac = (ep + 1) / epochs
        rows.append({"epoch": ep, "step": ep * 3 + 2, "train/loss_epoch": 2.0 - frac,
                     "val/mIoU": m["mIoU"] * frac, "val/aAcc": m["aAcc"] * frac})
    return rows


def build_results(
    root: Path,
    *,
    grid: str = "smoke",
    vit: str = "vit_nano_patch8",
    cnn: str = "resnet_tiny",
    lambdas: Iterable[float] = (0.0051, 0.05),
    seeds: Iterable[int] = (0, 1),
    evaluations: Iterable[str] = ("E1", "E2", "E3", "E4", "E5"),
    epochs: int = 3,
    partial: bool = False,
    summary: bool = True,
    dir_style: str = "absolute",  # how summary.json spells "dir": absolute | relative
    vicreg: bool = True,  # one VICReg pretraining trial (first seed); never in a legacy folder
    legacy: bool = False,  # the format written before summary labels (see the module docstring)
    datasets: Iterable[str] = ("voc",),  # stage-2 datasets: every segmentation trial once per dataset
    controls: Iterable[tuple[str, str]] = (),  # (evaluation, source) of `from: none` trials, one per seed
) -> Built:
    """Write a results folder under `root`; return what was written.

    partial=True: the DINO seed-1 run failed (so its E5 trial is skipped), E4 seed 1 is pending,
    and E3 seed 1 is "done" in the summary but its metrics.json is missing (killed while writing).
    """
    root = Path(root)
    (root / "trials").mkdir(parents=True, exist_ok=True)
    lambdas, seeds, evaluations = list(lambdas), list(seeds), list(evaluations)
    built = Built(root)
    pre_cfg0 = _defaults("core.config.PretrainConfig")
    seg_cfg0 = _defaults("core.config.SegmentConfig")
    entries: list[dict] = []

    def add(tid: str, stage: str, cfg: dict, metrics: Optional[dict], history: list[dict], figs: list[str],
            status: str = "done", reason: str = "", depends_on: Optional[list] = None, write_metrics: bool = True,
            labels: Optional[dict] = None):
        d = root / "trials" / tid
        (d / "checkpoints").mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(cfg, indent=2))
        if history:
            _write_csv(d / "history.csv", history)
        for i, name in enumerate(figs):
            write_png(d / "figures" / name, seed=len(entries) * 10 + i)
        if status == "done":
            (d / "checkpoints" / "last.ckpt").write_bytes(b"fake")
            (d / get_stage(stage).artifact).write_bytes(b"fake")
            if write_metrics and metrics is not None:
                (d / "metrics.json").write_text(json.dumps(metrics, indent=2))
        entry = {"id": tid, "stage": stage, "status": status, "reason": reason or None,
                 "depends_on": depends_on or [], "config": cfg,
                 "metrics": metrics if status == "done" and write_metrics else None,
                 "dir": str(d) if dir_style == "absolute" else f"trials/{tid}"}
        if not legacy:
            entry["resources"] = {"cpu": 1, "gpu": 0}
            entry["labels"] = labels
        entries.append(entry)
        built.trials[tid] = {**entry, "metrics": metrics if status == "done" else None, "has_metrics_file":
                             status == "done" and write_metrics}

    # ------------------------------------------------------------------ stage 1
    pre_ids: dict[tuple, str] = {}
    pre_labels: dict[str, dict] = {}
    plan = [("barlow_twins", vit, lam, seeds) for lam in lambdas] + [("barlow_twins", cnn, lambdas[0], seeds)]
    plan += [("dino", vit, lambdas[0], seeds)]
    if vicreg and not legacy:
        plan += [("vicreg", vit, lambdas[0], seeds[:1])]
    for method, backbone, lam, method_seeds in plan:
        for s in method_seeds:
            short = METHOD_SHORT[method]
            tid = f"pretrain_{short}_{backbone}" + (f"_l{lam:g}" if method == "barlow_twins" else "") + f"_s{s}"
            cfg = pretrain_config(pre_cfg0, method, backbone, lam, s, epochs, legacy)
            m = pretrain_metrics(method, backbone, lam, s, epochs, legacy)
            pre_labels[tid] = pretrain_labels(method, backbone, lam, s)
            m["backbone_path"] = str(root / "trials" / tid / "backbone.pt")
            figs = [f"erf_{backbone}_block1.png"]
            if method == "barlow_twins":
                figs += [f"crosscorr_epoch{e:03d}.png" for e in (1, 2, 10)]
            if backbone.startswith("vit"):
                figs += ["attention_epoch002.png"]
            status, reason = "done", ""
            if partial and method == "dino" and s == seeds[-1]:
                status, reason = "failed", "CUDA out of memory at epoch 2 (RuntimeError)"
            add(tid, PRETRAIN.name, cfg, m, _pretrain_history(m) if status == "done" else _pretrain_history(m)[:3],
                figs if status == "done" else [], status, reason, labels=pre_labels[tid])
            pre_ids[(method, backbone, lam, s)] = tid

    # ------------------------------------------------------------------ stage 2
    datasets = list(datasets)
    for ds in datasets:
        _stage2(add, root, ds, "" if len(datasets) == 1 else f"_{ds}", evaluations, vit, cnn, lambdas, seeds, epochs,
                partial, pre_ids, pre_labels, seg_cfg0, list(controls))

    if summary:
        (root / "summary.json").write_text(json.dumps(
            {"grid": grid, "created": "2025-01-01T00:00:00+00:00", "trials": entries}, indent=2))
        (root / "grid.yaml").write_text(f"name: {grid}\n")
    return built


def _stage2(add, root: Path, ds: str, suffix: str, evaluations, vit, cnn, lambdas, seeds, epochs, partial, pre_ids,
            pre_labels, seg_cfg0, controls) -> None:
    """The segmentation trials of one dataset (`suffix` ends their ids when there are several datasets)."""
    cfg_ds = {**seg_cfg0, "data": {**(seg_cfg0.get("data") or {}), "dataset": ds}}
    for ev, source in controls:  # controls: no stage-1 trial, weights from `source`
        kind, head, fusion, _ = EVAL_SPEC[ev]
        backbone = cnn if kind == "cnn" else vit
        for s in seeds:
            tid = f"seg-{ev}-{source}-{backbone}-s{s}{suffix}"
            cfg = {**cfg_ds, "evaluation": ev, "backbone": backbone, "head": head, "fusion": fusion, "source": source,
                   "seed": s, "epochs": epochs}
            m = segment_metrics(ev, backbone, head, fusion, source, s, None, ds, control=source)
            add(tid, SEGMENT.name, cfg, m, _segment_history(m, epochs), ["predictions_epoch002.png"],
                labels={"evaluation": ev, "from": None})
    for ev in evaluations:
        kind, head, fusion, method = EVAL_SPEC[ev]
        backbone = cnn if kind == "cnn" else vit
        lams = lambdas if ev == "E2" else [lambdas[0]]
        for lam in lams:
            for s in seeds:
                pid = pre_ids[(method, backbone, lam, s)]
                tid = (f"segment_{ev}_{backbone}" + (f"_l{lam:g}" if method == "barlow_twins" else "_dino")
                       + f"_s{s}{suffix}")
                source = f"checkpoint:{root / 'trials' / pid / 'backbone.pt'}"
                cfg = {**cfg_ds, "evaluation": ev, "backbone": backbone, "head": head, "fusion": fusion,
                       "source": source, "seed": s, "epochs": epochs}
                m = segment_metrics(ev, backbone, head, fusion, source, s,
                                    lam if method == "barlow_twins" else None, ds)
                status, reason, write_metrics = "done", "", True
                if partial and s == seeds[-1]:
                    if ev == "E5":
                        status, reason = "skipped", f"dependency {pid} failed"
                    elif ev == "E4":
                        status = "pending"
                    elif ev == "E3":
                        write_metrics = False
                figs = ["predictions_epoch002.png"] + (["attention_epoch002.png"] if fusion != "none" else [])
                add(tid, SEGMENT.name, cfg, m, _segment_history(m, epochs) if status == "done" else [],
                    figs if status == "done" else [], status, reason, [pid], write_metrics,
                    labels={"evaluation": ev, **pre_labels[pid], "from": pid})
