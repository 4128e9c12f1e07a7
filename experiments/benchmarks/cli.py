"""The command line of experiments/bench.py: flags -> `BenchSettings` -> a run, the GPU suite or the loader
suite; a bad flag or value ends in one ``twinseg: error: ...`` line and exit status 2 (`core.cli.guard`)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from core.cli import guard
from core.errors import ConfigError
from experiments.benchmarks.settings import (DEFAULT_BACKBONES, MODES, SEGMENT, SUITES, BenchSettings,
                                             evaluation_name, ssl_method_names)

REPO_ROOT = Path(__file__).resolve().parents[2]
PROG = "python experiments/bench.py"
SUITE_HELP = ("gpu: the fixed GPU check (Barlow Twins ResNet-50 and ViT-S/16 at 224 px, batch 256, bf16, real "
              "pipeline and synthetic batches; DINO ViT-S/16; E1 / E2 steps; 2-process DDP with 2 GPUs; <= 8 min on "
              "one H100/H200; a tiny CPU version without a GPU), prints img/s and MFU and updates --benchmarks; only "
              "--device, --workers, --data-root, --seed, --threads, --compile, --json, --markdown apply to it. "
              "loader: experiments/bench_loader.py (loader img/s per worker per recipe); the other flags go to it")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, no usage dump
        raise ConfigError(f"{message}; see {PROG} --help")


def _int_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in str(text).replace(",", "-").split("-") if v != "")
    except ValueError:
        raise ConfigError(f"--projector {text!r} must be widths joined by '-', e.g. 8192-8192-8192") from None


def _names(values: Optional[Sequence[str]]) -> tuple[str, ...]:
    out: list[str] = []
    for v in values or ():
        out.extend(p for p in str(v).split(",") if p)
    return tuple(out)


def _add_row_flags(p: argparse.ArgumentParser) -> None:
    """What to time: tasks by name (methods, evaluation presets), backbones, modes."""
    p.add_argument("--backbone", nargs="+", default=None,
                   help=f"one or more backbone names (space or comma separated); default {' '.join(DEFAULT_BACKBONES)} "
                        f"(an --evaluation row: the preset's backbone)")
    p.add_argument("--method", nargs="+", default=None,
                   help="SSL methods to time, any name registered in core/methods/registry.py (--help of "
                        "experiments/pretrain.py lists them)")
    p.add_argument("--evaluation", nargs="+", default=None,
                   help="segmentation rows from evaluation presets (core/evaluations.py: E1..E5); the preset sets "
                        "backbone / head / fusion unless --backbone / --seg-head are given")
    p.add_argument("--tasks", nargs="+", default=None,
                   help="registered SSL method names and/or segment (default: all, unless --method / --evaluation)")
    p.add_argument("--mode", default="both", help="model | pipeline | both (default)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--precision", default="32", help="32 (default) | bf16 (autocast)")
    p.add_argument("--device", default="auto", help="auto (default) | cpu | cuda")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="channels_last for CNN backbones (default on, as in training)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone / segmenter (config compile)")
    p.add_argument("--projector", default="512-512-512", help="SSL projector widths (default 512-512-512)")
    p.add_argument("--dino-out-dim", type=int, default=1024)
    p.add_argument("--dino-local-crops", type=int, default=2)
    p.add_argument("--seg-head", default="auto",
                   help="auto (the preset's head, else setr_pup for ViT/Swin, deeplabv3 for CNN) or a head name")
    p.add_argument("--seg-pipeline", default="simple",
                   help="segmentation train pipeline of the pipeline mode: simple or mmseg (paper.yaml's 512 px "
                        "recipe; crop and resize scale = --image-size)")
    p.add_argument("--lightly", action=argparse.BooleanOptionalAction, default=True,
                   help="run lightly's Barlow Twins side by side (default on)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="images/s, peak memory and MFU of one training step of a run config "
                                       "(any registered SSL method, segmentation, evaluation presets), model only "
                                       "and with the data pipeline, next to lightly's Barlow Twins.")
    _add_row_flags(p)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    p.add_argument("--iters", type=int, default=2, help="timed steps per block (default 2)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed blocks, runners interleaved; the median block is reported (default 3)")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers in pipeline mode (default: min(8, CPU cores))")
    p.add_argument("--data-root", default=None, help="VOC root for pipeline mode (default: generated dataset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: one per core); 1 is steadier on a shared, loaded CPU")
    p.add_argument("--suite", default=None, choices=SUITES, help=SUITE_HELP)
    p.add_argument("--benchmarks", default=str(REPO_ROOT / "BENCHMARKS.md"), metavar="PATH",
                   help="--suite gpu: the markdown file whose suite table is replaced (default BENCHMARKS.md)")
    p.add_argument("--no-update", action="store_true", help="--suite gpu: do not touch --benchmarks")
    p.add_argument("--rows", default=None, help="--suite gpu: only these rows, comma separated (default all: "
                                                "bt-r50, bt-vits16, dino-vits16, e1-deeplabv3-r50, e2-setr-vits16, "
                                                "e2-linear-vits16, e2-setr-vits16-mmseg, ddp-2)")
    p.add_argument("--json", default=None, metavar="PATH", help="write the full report as JSON")
    p.add_argument("--markdown", nargs="?", const="-", default=None, metavar="PATH",
                   help="print markdown rows for BENCHMARKS.md (or write them to PATH)")
    return p


def selected_tasks(a: argparse.Namespace) -> Optional[tuple[str, ...]]:
    """--tasks, plus the methods of --method and ``segment`` for --evaluation; None (all) when none is given."""
    methods = _names(a.method)
    known = ssl_method_names() if methods else ()  # the registry imports torch: only when asked
    for m in methods:
        if m not in known:
            raise ConfigError(f"--method {m!r} is not known; choose one of: {', '.join(known)}")
    tasks = _names(a.tasks) if a.tasks is not None else None
    if not methods and not a.evaluation:
        return tasks
    return tuple(dict.fromkeys((tasks or ()) + methods + ((SEGMENT,) if a.evaluation else ())))


def settings_from_args(a: argparse.Namespace) -> BenchSettings:
    mode = str(a.mode)
    workers = a.workers if a.workers is not None else min(8, os.cpu_count() or 1)
    return BenchSettings(
        backbones=None if a.backbone is None else _names(a.backbone), tasks=selected_tasks(a),
        evaluations=tuple(evaluation_name(e) for e in _names(a.evaluation)),
        modes=MODES if mode == "both" else (mode,), image_size=a.image_size, batch_size=a.batch_size,
        precision=str(a.precision), device=str(a.device), channels_last=a.channels_last, compile=a.compile,
        warmup=a.warmup, iters=a.iters, repeats=a.repeats, workers=workers, projector=_int_list(a.projector),
        dino_out_dim=a.dino_out_dim, dino_local_crops=a.dino_local_crops, seg_head=str(a.seg_head),
        seg_pipeline=str(a.seg_pipeline), lightly=a.lightly, data_root=a.data_root, seed=a.seed, threads=a.threads,
    )


def command_line(argv: Optional[Sequence[str]]) -> str:
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([PROG, *map(shlex.quote, args)])


def _suite_of(argv: Sequence[str]) -> Optional[str]:
    for i, v in enumerate(argv):
        if v == "--suite" and i + 1 < len(argv):
            return argv[i + 1]
        if v.startswith("--suite="):
            return v.split("=", 1)[1]
    return None


def _without_suite(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for v in argv:
        if skip:
            skip = False
        elif v == "--suite":
            skip = True
        elif not v.startswith("--suite="):
            out.append(v)
    return out


def run_loader_suite(argv: Sequence[str]) -> int:
    """--suite loader: experiments/bench_loader.py's `main` with the other flags (loader img/s per worker)."""
    from experiments.bench_loader import main as loader_main

    return int(loader_main(list(argv)) or 0)


def _check_paths(a: argparse.Namespace) -> None:
    if a.json and not Path(a.json).expanduser().parent.is_dir():
        raise ConfigError(f"--json {a.json}: folder {Path(a.json).expanduser().parent} does not exist; create it "
                          f"or choose another path")
    bp = Path(a.benchmarks).expanduser()
    if a.suite == "gpu" and not a.no_update and not bp.parent.is_dir():
        raise ConfigError(f"--benchmarks {a.benchmarks}: folder {bp.parent} does not exist; choose another path")


def _run_gpu_suite(a: argparse.Namespace, s: BenchSettings, argv, say):
    from experiments.benchmarks.measure import resolve_device
    from experiments.benchmarks.report import suite_markdown, update_benchmarks
    from experiments.benchmarks.suites import run_suite, suite_rows

    rows = suite_rows(a.rows)
    gpu = resolve_device(s.device).type == "cuda"
    workers = a.workers if a.workers is not None else (min(16, os.cpu_count() or 1) if gpu else 0)
    rep = run_suite(gpu, workers, command_line(argv), data_root=a.data_root, seed=a.seed, compile_=a.compile,
                    threads=a.threads, ddp=None if gpu else True, rows=rows, log=say)  # CPU: the DDP path on gloo
    if not a.no_update:
        bp = Path(a.benchmarks).expanduser()
        update_benchmarks(bp, suite_markdown(rep, gpu), gpu)
        say(f"updated {bp}")
    return rep


def _write_outputs(a: argparse.Namespace, rep) -> None:
    from experiments.benchmarks.report import markdown_rows

    if a.json:
        Path(a.json).expanduser().write_text(json.dumps(rep.to_dict(), indent=2, default=str) + "\n")
    if a.markdown is not None:
        md = markdown_rows(rep)
        if a.markdown == "-":
            print(md)
        else:
            Path(a.markdown).expanduser().write_text(md + "\n")


@guard
def main(argv: Optional[Sequence[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if _suite_of(args) == "loader" and not ({"-h", "--help"} & set(args)):
        return run_loader_suite(_without_suite(args))
    a = build_parser().parse_args(args)
    if a.suite == "gpu":
        from experiments.benchmarks.suites import suite_rows

        suite_rows(a.rows)  # a bad row name: one line before anything runs
    s = settings_from_args(a)
    if a.suite is None:
        s.validate()
    else:
        s.validate_numbers()
        s.validate_device()
    _check_paths(a)
    from rich.console import Console

    from experiments.benchmarks.report import print_report

    con = Console(stderr=True)
    t0 = time.perf_counter()
    say = lambda m: con.print(f"[dim]{m}[/dim]")  # noqa: E731
    if a.suite == "gpu":
        rep = _run_gpu_suite(a, s, argv, say)
    else:
        from experiments.benchmarks.run import run_bench

        rep = run_bench(s, command_line(argv), log=say)
    print_report(rep)
    con.print(f"[dim]total {time.perf_counter() - t0:.1f} s[/dim]")
    _write_outputs(a, rep)
    return 0
