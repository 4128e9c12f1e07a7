"""experiments/bench_loader.py: one loader worker's img/s per recipe on a tiny set; bad flags."""

from __future__ import annotations

import json

import pytest

from experiments import bench_loader


def test_bench_loader_runs_on_a_tiny_set(voc_root, tmp_path, capsys):
    out = tmp_path / "loader.json"
    rc = bench_loader.main(["--root", str(voc_root), "--images", "8", "--batch-size", "4", "--image-size", "32",
                            "--local-size", "16", "--local-crops", "2", "--crop-size", "40", "--json", str(out)])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert [r["recipe"] for r in rep["results"]] == list(bench_loader.RECIPES)
    for r in rep["results"]:
        assert r["images"] >= 8 and r["img_per_s_per_worker"] > 0 and "uint8" in r["dtypes"]
        if r["recipe"] == "seg_mmseg":  # uint8 source regions; its float32 is the resize taps (6 x crop per image)
            assert r["bytes_per_image"] < 3 * 4 * 40 * 40  # less than one float32 crop
        else:
            assert "float32" not in r["dtypes"]  # the loaders hand uint8 to the device
        assert r["ratio"] == pytest.approx(r["img_per_s_per_worker"] / bench_loader.TARGET)
    text = capsys.readouterr().out
    assert "img/s/worker" in text and "seg_mmseg" in text


@pytest.mark.parametrize("argv, needle", [
    (["--recipes", "bt,fancy"], "fancy"),
    (["--images", "0"], "--images"),
    (["--workers", "0"], "--workers"),
    (["--target", "-1"], "--target"),
    (["--no-such-flag"], "--no-such-flag"),
    (["--images", "many"], "many"),
    (["--root", "/nonexistent/voc"], "/nonexistent/voc"),
    (["--json", "/nonexistent/dir/x.json"], "/nonexistent/dir"),
])
def test_bench_loader_bad_flags_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as e:
        bench_loader.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("twinseg: error:") and "\n" not in err and needle in err and "Traceback" not in err
