"""How a `BenchReport` is shown: the console table, markdown rows, and the GPU suite's BENCHMARKS.md block
(replaced between its ``<!-- bench-suite KIND -->`` markers, atomically; nothing else in the file changes)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from experiments.benchmarks.measure import BenchReport, BenchRow

SUITE_BEGIN = "<!-- bench-suite {kind} -->"
SUITE_END = "<!-- /bench-suite {kind} -->"
MD_HEADER = ("| date | machine | torch | task | impl | mode | backbone | px | batch | prec | ch-last | compile "
             "| img/s | GFLOP/img | MFU | step ms | best ms | CPU ms | peak MB | data wait | command |")
MD_SEP = "|" + "---|" * 21


def fmt_wait(v: Optional[float]) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def fmt_gflop(v: Optional[float]) -> str:
    return "-" if not v else f"{v / 1e9:.3g}"


def fmt_mfu(v: Optional[float]) -> str:
    """MFU in percent; '-' on the CPU or an unknown GPU (no peak to compare with)."""
    return "-" if v is None else f"{100 * v:.1f}%"


def task_label(r: BenchRow) -> str:
    """The task, with its evaluation preset for a segmentation row (``segment E2``)."""
    return f"{r.task} {r.evaluation}" if r.evaluation else r.task


def markdown_rows(rep: BenchReport, header: bool = True) -> str:
    lines = [MD_HEADER, MD_SEP] if header else []
    for r in rep.rows:
        mem = f"{r.peak_mem_mb:.0f}" + (" (RSS)" if r.mem_kind == "cpu_peak_rss" else "")
        lines.append(
            f"| {r.date} | {r.machine} | {r.torch} | {task_label(r)} | {r.impl} | {r.mode} | {r.backbone} "
            f"| {r.image_size} | {r.batch_size} | {r.precision} | {'yes' if r.channels_last else 'no'} "
            f"| {'yes' if r.compile else 'no'} | {r.img_per_s:.1f} | {fmt_gflop(r.flops_per_image)} | {fmt_mfu(r.mfu)} "
            f"| {r.step_ms:.1f} | {r.best_step_ms:.1f} | {r.cpu_ms:.0f} | {mem} "
            f"| {fmt_wait(r.data_wait_frac)} | `{r.command}` |")
    return "\n".join(lines)


def suite_markdown(rep: BenchReport, gpu: bool) -> str:
    """The BENCHMARKS.md block of a suite run: machine, date, command, one row per measurement."""
    lines = [f"Measured {rep.date} on {rep.machine}, torch {rep.torch}; command `{rep.command}`.", "",
             "| row | task | mode | backbone | px | batch/GPU | prec | img/s | GFLOP/img | MFU | step ms | "
             "peak MB | data wait | detail |", "|" + "---|" * 14]
    for r in rep.rows:
        lines.append(f"| {r.suite_item} | {r.task} | {r.mode} | {r.backbone} | {r.image_size} | {r.batch_size} "
                     f"| {r.precision} | {r.img_per_s:.1f} | {fmt_gflop(r.flops_per_image)} | {fmt_mfu(r.mfu)} "
                     f"| {r.step_ms:.1f} | {r.peak_mem_mb:.0f} | {fmt_wait(r.data_wait_frac)} | {r.detail} |")
    for sk in rep.skipped:
        lines.append(f"\nSkipped: {sk}.")
    if not gpu:
        lines.append("\nCPU fallback (no GPU visible): tiny backbones, 64 px, one timed step per row; it checks that "
                     "every code path of the suite runs, its numbers are not GPU figures.")
    return "\n".join(lines)


def update_benchmarks(path: Path, block: str, gpu: bool) -> None:
    """Replace (or append) the suite's block in BENCHMARKS.md, between its markers, atomically."""
    from core.io import atomic_write_text

    kind = "gpu" if gpu else "cpu-fallback"
    begin, end = SUITE_BEGIN.format(kind=kind), SUITE_END.format(kind=kind)
    text = path.read_text() if path.is_file() else "# twinseg benchmarks\n"
    new = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + new + rest.split(end, 1)[1]
    else:
        title = "## GPU suite (`python experiments/bench.py --suite gpu`)" if gpu else \
            "## GPU suite, CPU fallback (`python experiments/bench.py --suite gpu` without a GPU)"
        text = text.rstrip("\n") + f"\n\n{title}\n\n{new}\n"
    atomic_write_text(path, text)


COLUMNS = ("task", "impl", "mode", "backbone", "px", "batch", "prec", "img/s", "GFLOP/img", "MFU", "step ms",
           "best ms", "CPU ms", "peak MB", "data wait", "loss", "detail")
NUMERIC = ("px", "batch", "img/s", "GFLOP/img", "MFU", "step ms", "best ms", "CPU ms", "peak MB", "data wait", "loss")


def _cells(r: BenchRow) -> tuple[str, ...]:
    return (task_label(r), r.impl, r.mode, r.backbone, str(r.image_size), str(r.batch_size), r.precision,
            f"{r.img_per_s:.1f}", fmt_gflop(r.flops_per_image), fmt_mfu(r.mfu), f"{r.step_ms:.1f}",
            f"{r.best_step_ms:.1f}", f"{r.cpu_ms:.0f}", f"{r.peak_mem_mb:.0f}", fmt_wait(r.data_wait_frac),
            f"{r.loss:.4g}", r.detail)


def print_report(rep: BenchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    if not con.is_terminal:
        con = Console(width=200)
    t = Table(title=f"twinseg bench - {rep.machine} - torch {rep.torch} - {rep.date}")
    for col in COLUMNS:
        t.add_column(col, justify="right" if col in NUMERIC else "left")
    for r in rep.rows:
        t.add_row(*_cells(r))
    con.print(t)
    mem_note = ("peak MB = torch.cuda.max_memory_allocated" if any(r.mem_kind == "cuda_max_allocated" for r in rep.rows)
                else "peak MB = peak resident set size of the whole process during the timed steps")
    con.print(f"[dim]{mem_note}; GFLOP/img = forward + backward of one image, all views (core/flops.py); MFU = "
              f"GFLOP/img x img/s / the GPU's dense bf16 peak ('-': CPU or a GPU not in core/flops.py); "
              f"command: {rep.command}[/dim]")
    for line in comparison_lines(rep):
        con.print(line)


def comparison_lines(rep: BenchReport) -> list[str]:
    """twinseg / lightly ratios, pipeline / model img/s of the same row, and the loss agreement checks."""
    out = [f"Barlow Twins twinseg/lightly img/s ({q['backbone']}, {q['mode']}): {q['twinseg_img_s']:.1f} / "
           f"{q['lightly_img_s']:.1f} = [bold]{q['ratio']:.2f}x[/bold] (best block {q['ratio_best']:.2f}x, "
           f"CPU time {q['ratio_cpu'] or float('nan'):.2f}x)" for q in rep.ratios]
    by = {(task_label(r), r.impl, r.backbone, r.mode): r for r in rep.rows}
    for (task, impl, bb, mode), r in by.items():
        m = by.get((task, impl, bb, "model"))
        if mode == "pipeline" and m is not None:
            out.append(f"pipeline/model img/s ({task}, {impl}, {bb}): {r.img_per_s:.1f} / {m.img_per_s:.1f} = "
                       f"{r.img_per_s / m.img_per_s:.2f} (data wait {fmt_wait(r.data_wait_frac)})")
    out.extend(f"loss check (N={c['batch_size']}, D={c['dim']}, lambda={c['lambd']}): twinseg {c['twinseg']:.6g} "
               f"lightly {c['lightly']:.6g} rel diff {c['rel_diff']:.2e}" for c in rep.loss_checks)
    return out
