"""Throughput benchmarks: a benchmark row is a run config plus a measurement.

A row's config is the `PretrainConfig` / `SegmentConfig` a real run of it would use, built by name as the CLIs
and grid trials build theirs (any registered SSL method, backbone or evaluation preset; `rows`); its module,
loaders and backbone come from core/runs (`runners`); the measurement is img/s, step time, CPU time, peak
memory, data wait, FLOPs per image and MFU (`measure`). Modules:

- `settings`: `BenchSettings` (the flags) and their checks, without importing torch;
- `rows`: `plan(settings) -> [BenchCase(task, stage, mode, config)]`, `check_case`;
- `runners`: one timed runner per row (the project's LightningModule stepped as Lightning does; lightly's
  Barlow Twins side by side);
- `measure`: timing, peak memory, FLOPs / MFU, `BenchRow` / `BenchReport`;
- `run`: `run_bench(settings) -> BenchReport`;
- `suites`: ``--suite gpu`` (`suite_plan`, `run_suite`, the 2-process DDP check);
- `report`: console table, markdown rows, the BENCHMARKS.md suite block;
- `cli`: the flags of experiments/bench.py (``--suite loader`` runs experiments/bench_loader.py).
"""
