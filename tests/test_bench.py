"""experiments/bench.py (experiments/benchmarks/): rows are run configs built by name (any registered SSL
method, evaluation presets) plus a measurement; in-process runs on tiny settings, twinseg vs lightly loss
agreement, the GPU suite's CPU fallback, bad flags."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.benchmarks import cli, report, rows, run, settings, suites  # noqa: E402
from experiments.benchmarks.settings import BenchSettings  # noqa: E402

TINY = dict(image_size=32, batch_size=4, warmup=1, iters=1, repeats=1, device="cpu", workers=0,
            projector=(64, 64, 64), dino_out_dim=64, dino_local_crops=2)


def _check_rows(rows, expected):
    assert len(rows) == expected
    for r in rows:
        assert r.img_per_s > 0 and math.isfinite(r.img_per_s), r
        assert r.step_ms > 0 and r.best_step_ms > 0
        assert r.peak_mem_mb > 0, r
        assert r.mem_kind == "cpu_peak_rss"
        assert math.isfinite(r.loss), r
        assert r.machine and r.torch and r.command and r.date
        assert r.flops_per_image and r.flops_per_image > 0 and r.mfu is None  # FLOPs counted; no MFU on a CPU


def test_model_mode_all_tasks_and_lightly_side_by_side():
    s = BenchSettings(backbones=("vit_nano_patch8",), modes=("model",), **TINY)  # tasks: every registered one
    rep = run.run_bench(s, command="python experiments/bench.py --test")
    # one row per registered SSL method (barlow_twins also lightly's) and segment
    assert settings.task_names() == settings.ssl_method_names() + ("segment",)
    assert {"barlow_twins", "dino", "vicreg"} <= set(settings.ssl_method_names())
    _check_rows(rep.rows, len(settings.task_names()) + 1)
    assert {(r.task, r.impl) for r in rep.rows} == {("barlow_twins", "lightly")} | {
        (t, "twinseg") for t in settings.task_names()}
    assert all(r.data_wait_frac is None for r in rep.rows)
    for r in rep.rows:  # each row carries its run config
        assert r.stage == ("segment" if r.task == "segment" else "pretrain") and r.config["backbone"] == r.backbone
        if r.stage == "pretrain":
            assert r.config["method"] == r.task
    tw, lt = (next(r for r in rep.rows if r.task == "barlow_twins" and r.impl == i) for i in ("twinseg", "lightly"))
    # same backbone, same projector widths (biases are not counted): the same forward + backward FLOPs
    assert tw.flops_per_image == lt.flops_per_image
    (ratio,) = rep.ratios
    assert ratio["ratio"] > 0 and ratio["backbone"] == "vit_nano_patch8" and ratio["mode"] == "model"
    (check,) = rep.loss_checks
    assert check["rel_diff"] < 1e-5
    md = report.markdown_rows(rep)
    assert "GFLOP/img | MFU" in report.MD_HEADER
    assert md.startswith(report.MD_HEADER) and md.count("\n") == 1 + len(rep.rows)
    json.dumps(rep.to_dict(), default=str)  # serialisable


def test_pipeline_mode_on_generated_voc(voc_root):
    s = BenchSettings(backbones=("resnet_tiny",), tasks=("barlow_twins", "segment"), modes=("pipeline",),
                      data_root=str(voc_root), **dict(TINY, image_size=64))
    rep = run.run_bench(s)
    _check_rows(rep.rows, 3)
    for r in rep.rows:
        assert r.mode == "pipeline" and 0.0 <= r.data_wait_frac <= 1.0


@pytest.mark.parametrize("n,d", [(8, 32), (64, 128)])
def test_twinseg_and_lightly_losses_agree(n, d):
    c = run.compare_bt_losses(n, d, seed=1)
    # same definition (batch-normalised with biased variance, eps 1e-5; same lambda): equal values
    assert c["rel_diff"] < 1e-5, c
    assert c["factor"] == pytest.approx(1.0, rel=1e-5)


def test_main_writes_json_and_markdown(tmp_path, capsys):
    out = tmp_path / "b.json"
    md = tmp_path / "b.md"
    rc = cli.main(["--backbone", "vit_nano_patch8", "--tasks", "barlow_twins", "--mode", "model",
                     "--image-size", "32", "--batch-size", "4", "--warmup", "0", "--iters", "1", "--repeats", "1",
                     "--projector", "32-32-32", "--device", "cpu", "--json", str(out), "--markdown", str(md)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["command"].startswith("python experiments/bench.py --backbone vit_nano_patch8")
    assert len(data["rows"]) == 2 and data["ratios"][0]["ratio"] > 0
    assert md.read_text().startswith(report.MD_HEADER)
    assert "twinseg/lightly" in capsys.readouterr().out


BAD_FLAGS = {  # name: (flags, a word the one-line message must contain)
    "negative_batch": (["--batch-size", "-4"], "--batch-size"),
    "unknown_backbone": (["--backbone", "no_such_net"], "no_such_net"),
    "size_not_divisible_by_patch": (["--backbone", "vit_nano_patch8", "--image-size", "60"], "divisible"),
    "not_an_int": (["--iters", "many"], "--iters"),
    "unknown_suite": (["--suite", "nope"], "--suite"),
    "unknown_suite_row": (["--suite", "gpu", "--rows", "bt-r50,nope"], "nope"),
    "loader_suite_bad_recipe": (["--suite", "loader", "--recipes", "nope"], "--recipes"),
    "unknown_seg_pipeline": (["--seg-pipeline", "fancy"], "--seg-pipeline"),
}


def test_bad_flags_exit_2_with_one_line():
    # started together: each pays the interpreter + torch import once, in parallel
    procs = {k: subprocess.Popen([sys.executable, str(REPO / "experiments" / "bench.py"), *v[0]], cwd=str(REPO),
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, v in BAD_FLAGS.items()}
    for k, p in procs.items():
        out, err = p.communicate(timeout=240)
        assert p.returncode == 2, (k, p.returncode, err)
        assert "Traceback" not in err and "Traceback" not in out, (k, err)
        lines = [ln for ln in err.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("twinseg: error: "), (k, err)
        assert BAD_FLAGS[k][1] in lines[0], (k, lines[0])


@pytest.mark.parametrize("argv, needle", [
    (["--method", "vicreg,simclr"], "simclr"),
    (["--evaluation", "E9"], "E9"),
    (["--tasks", "segment,nope"], "nope"),
    (["--method", "dino", "--backbone", "no_such_net"], "no_such_net"),
])
def test_bad_names_exit_2_with_one_line(argv, needle, capsys):
    # in process (the registries are imported already): the same guard as the subprocess test above
    with pytest.raises(SystemExit) as e:
        cli.main([*argv, "--device", "cpu", "--mode", "model"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("twinseg: error:") and "\n" not in err and needle in err and "Traceback" not in err


def test_settings_map_onto_method_sections_and_registry():
    # bench keeps its flat --dino-* settings; they become PretrainConfig's `dino` section; the config is built
    # as the CLIs build theirs (the method's registry defaults under the given values)
    from core.config import PretrainConfig
    from core.data.transforms import default_local_size
    from core.methods.registry import get_method

    s = BenchSettings(backbones=("vit_nano_patch8",), **TINY)
    cfg = rows.pretrain_config(s, "dino", "vit_nano_patch8")
    assert cfg.method == "dino" and cfg.dino.out_dim == 64 and cfg.dino.local_crops == 2
    assert cfg.optimizer == "adamw" and cfg.data.image_size == s.image_size
    assert cfg.lr == get_method("dino").defaults["lr"]  # the registry's recipe, as PretrainConfig.from_dict
    assert PretrainConfig.from_dict(cfg.to_dict()) == cfg  # what a grid trial would build from this row
    bt = rows.pretrain_config(s, "barlow_twins", "vit_nano_patch8")
    assert bt.barlow_twins.lambd == get_method("barlow_twins").options().lambd and bt.barlow_twins.scale == 1.0
    assert bt.projector == (64, 64, 64)
    vic = rows.pretrain_config(s, "vicreg", "resnet_tiny")
    assert (vic.method, vic.backbone, vic.projector) == ("vicreg", "resnet_tiny", (64, 64, 64))
    views = get_method("dino").views(cfg, False)
    assert len(views.sizes) == 2 + s.dino_local_crops
    assert views.sizes[2] == default_local_size(s.image_size)


def test_segment_rows_from_evaluation_presets():
    from core.config import SegmentConfig
    from core.evaluations import EVALUATIONS

    # no --backbone: each preset's own backbone / head / fusion; E5's DINO weights are not loaded
    s = BenchSettings(tasks=("segment",), evaluations=("E1", "E5"), modes=("model",), **TINY)
    e1, e5 = rows.plan(s)
    assert (e1.evaluation, e1.config.backbone, e1.config.head) == ("E1", "resnet50", "deeplabv3")
    assert (e5.config.fusion, e5.config.source) == (EVALUATIONS["E5"]["config"]["fusion"], "random")
    assert SegmentConfig.from_dict(e1.config.to_dict()) == e1.config
    # explicit values win over the preset, as in experiments/segment.py
    s = BenchSettings(backbones=("resnet_tiny",), tasks=("segment",), evaluations=("E1",), seg_head="linear", **TINY)
    (case,) = [c for c in rows.plan(s) if c.mode == "model"]
    assert (case.config.backbone, case.config.head, case.config.evaluation) == ("resnet_tiny", "linear", "E1")


def test_segmentation_row_by_evaluation_name_runs(tmp_path):
    js = tmp_path / "e4.json"
    rc = cli.main(["--evaluation", "e4", "--backbone", "vit_nano_patch8", "--mode", "model", "--image-size", "32",
                   "--batch-size", "2", "--warmup", "0", "--iters", "1", "--repeats", "1", "--device", "cpu",
                   "--json", str(js)])
    assert rc == 0
    (row,) = json.loads(js.read_text())["rows"]
    assert (row["task"], row["evaluation"], row["stage"]) == ("segment", "E4", "segment")
    assert row["config"]["fusion"] == "affinity" and row["config"]["head"] == "setr_pup"
    assert row["img_per_s"] > 0 and row["flops_per_image"] > 0


def test_vicreg_row_by_name_runs_on_cpu(tmp_path, capsys):
    js = tmp_path / "vicreg.json"
    rc = cli.main(["--method", "vicreg", "--backbone", "resnet_tiny", "--mode", "model", "--image-size", "32",
                   "--batch-size", "4", "--warmup", "1", "--iters", "1", "--repeats", "1", "--projector", "32-32-32",
                   "--device", "cpu", "--json", str(js), "--markdown"])
    assert rc == 0
    data = json.loads(js.read_text())
    (row,) = data["rows"]  # --method alone: only that method's rows (no lightly: it is Barlow Twins')
    assert (row["task"], row["impl"], row["config"]["method"]) == ("vicreg", "twinseg", "vicreg")
    assert row["img_per_s"] > 0 and math.isfinite(row["loss"]) and row["flops_per_image"] > 0
    assert "| vicreg | twinseg | model | resnet_tiny |" in capsys.readouterr().out


def test_settings_validation_in_process():
    from core.errors import ConfigError

    with pytest.raises(ConfigError, match="batch-size"):
        BenchSettings(batch_size=1).validate()
    with pytest.raises(ConfigError, match="no_such_net"):
        BenchSettings(backbones=("no_such_net",)).validate()
    with pytest.raises(ConfigError, match="lightly"):
        BenchSettings(projector=(64, 32, 16)).validate()
    with pytest.raises(ConfigError, match="simclr"):
        BenchSettings(tasks=("simclr",)).validate()
    with pytest.raises(ConfigError, match="E9"):
        settings.evaluation_name("E9")
    with pytest.raises(ConfigError, match="divisible"):
        for case in rows.plan(BenchSettings(backbones=("vit_nano_patch8",), image_size=60)):
            rows.check_case(case)


def test_gpu_suite_plan_is_the_paper_sizes():
    plan = dict(suites.suite_plan(gpu=True, workers=16, data_root="/data/voc"))
    assert list(plan) == [k for k, _ in suites.SUITE_ITEMS]
    bt = plan["bt-r50"]
    assert (bt.backbones, bt.image_size, bt.batch_size, bt.precision, bt.channels_last) == (("resnet50",), 224, 256,
                                                                                              "bf16", True)
    assert bt.modes == ("model", "pipeline") and bt.projector == (8192,) * 3 and bt.workers == 16
    assert plan["bt-vits16"].backbones == ("vit_small_patch16",)
    assert plan["dino-vits16"].tasks == ("dino",) and plan["dino-vits16"].dino_local_crops == 6
    assert (plan["e1-deeplabv3-r50"].seg_head, plan["e1-deeplabv3-r50"].image_size) == ("deeplabv3", 512)
    assert plan["e2-setr-vits16"].seg_head == "setr_pup" and plan["e2-linear-vits16"].seg_head == "linear"
    assert plan["e1-deeplabv3-r50"].evaluations == ("E1",) and plan["e2-setr-vits16"].evaluations == ("E2",)
    e1 = rows.plan(plan["e1-deeplabv3-r50"])[0].config  # the preset's run config: dilated ResNet-50 at 512 px
    assert (e1.evaluation, e1.backbone, e1.head, e1.data.image_size, e1.precision) == ("E1", "resnet50", "deeplabv3",
                                                                                       512, "bf16-mixed")
    mm = plan["e2-setr-vits16-mmseg"]  # the paper's segmentation data path: worker regions, device crops
    assert (mm.seg_pipeline, mm.modes, mm.image_size, mm.data_root) == ("mmseg", ("pipeline",), 512, "/data/voc")


def test_gpu_suite_cpu_fallback_updates_benchmarks(tmp_path):
    """Without a GPU, --suite gpu runs the tiny CPU version of the same rows and writes its own block."""
    md, js = tmp_path / "BENCHMARKS.md", tmp_path / "suite.json"
    md.write_text("# twinseg benchmarks\n\nintro\n")
    rc = cli.main(["--suite", "gpu", "--device", "cpu", "--rows", "bt-vits16,e2-linear-vits16,e2-setr-vits16-mmseg",
                     "--threads", "1", "--benchmarks", str(md), "--json", str(js)])
    assert rc == 0
    data = json.loads(js.read_text())
    assert [r["suite_item"] for r in data["rows"]] == ["bt-vits16", "bt-vits16", "e2-linear-vits16",
                                                      "e2-setr-vits16-mmseg"]
    assert [r["mode"] for r in data["rows"]] == ["model", "pipeline", "model", "pipeline"]
    assert all(r["flops_per_image"] > 0 and r["mfu"] is None for r in data["rows"])
    text = md.read_text()
    assert text.startswith("# twinseg benchmarks\n\nintro\n") and "| bt-vits16 | barlow_twins | pipeline |" in text
    assert "CPU fallback" in text and "<!-- bench-suite gpu -->" not in text
    # a second run replaces its block, nothing else
    report.update_benchmarks(md, "NEW BLOCK", gpu=False)
    text2 = md.read_text()
    assert text2.count("<!-- bench-suite cpu-fallback -->") == 1 and "NEW BLOCK" in text2
    assert "| bt-vits16 |" not in text2 and text2.startswith("# twinseg benchmarks\n\nintro\n")


def test_suite_help_exits_0():
    p = subprocess.run([sys.executable, str(REPO / "experiments" / "bench.py"), "--suite", "gpu", "--help"],
                       cwd=str(REPO), capture_output=True, text=True, timeout=240)
    assert p.returncode == 0 and "--suite" in p.stdout and "MFU" in p.stdout
