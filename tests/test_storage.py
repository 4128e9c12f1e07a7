"""core/storage.py against a local folder and a real S3-compatible server (SeaweedFS on loopback,
tests/s3_server.py): round trips, metrics.json persisted last, fetch for resume, the attempt token, and
the one-line errors of `check()`."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import pytest

from core.errors import StorageError
from core.storage import ATTEMPT_FILE, RunPersister, Storage, bench, local_files, parse_uri
from tests import s3_server


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """A fresh, empty Storage root: a local folder, or a unique prefix in the test bucket."""
    if request.param == "local":
        return Storage(tmp_path / "results")
    server = request.getfixturevalue("s3")
    return Storage(f"s3://{server.bucket}/t-{uuid.uuid4().hex[:8]}/results", env=server.env())


def one_line_error(fn) -> str:
    with pytest.raises(StorageError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


def make_run(folder: Path, finished: bool = True) -> Path:
    """A run folder as core.runs writes one, plus the files that must never travel."""
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "figures").mkdir()
    (folder / "config.json").write_text(json.dumps({"backbone": "vit_nano_patch8"}))
    (folder / "checkpoints" / "last.ckpt").write_bytes(os.urandom(300_000))
    (folder / "backbone.pt").write_bytes(os.urandom(100_000))
    (folder / "figures" / "attention_0.png").write_bytes(b"\x89PNG" + os.urandom(1000))
    (folder / "accounting.json").write_text("{}")
    (folder / ".lock").write_text("123 2026-01-01 pretrain run")
    (folder / ".metrics.json.abc123.tmp").write_text("{half")
    if finished:
        (folder / "metrics.json").write_text(json.dumps({"stage": "pretrain", "knn_acc": 0.5}))
    return folder


TRAVELLING = ["accounting.json", "backbone.pt", "checkpoints/last.ckpt", "config.json", "figures/attention_0.png"]


# ----- URIs
@pytest.mark.parametrize("uri, needle", [
    ("ftp://x/y", "unsupported scheme 'ftp://'"),
    ("s3://", "names no bucket"),
    ("s3:///prefix", "names no bucket"),
    ("s3://Bad_Bucket/p", "not a valid bucket name"),
    ("s3://bucket/a/../b", "'..' are not allowed"),
    ("s3://bucket/p?endpoint_override=x", "AWS_ENDPOINT_URL"),
    ("", "empty storage URI"),
])
def test_bad_uris_are_one_line_errors(uri, needle):
    assert needle in one_line_error(lambda: Storage(uri))


def test_uri_forms(tmp_path):
    assert parse_uri("s3://bucket/a//b/") == ("s3", "bucket", "bucket/a/b")
    assert parse_uri("gs://bucket") == ("gs", "bucket", "bucket")
    assert parse_uri(f"file://{tmp_path}") == ("local", None, str(tmp_path))
    s = Storage("s3://bucket/pre", env={})
    assert s.join("trials", "t1") == "s3://bucket/pre/trials/t1"
    assert s.child("trials/t1").join("metrics.json") == "s3://bucket/pre/trials/t1/metrics.json"
    assert Storage(tmp_path).child("a").join("b") == str(tmp_path / "a" / "b")
    with pytest.raises(ValueError):
        s.join("../escape")


# ----- round trips
def test_round_trip_bytes_json_and_folders(store, tmp_path):
    data = os.urandom(70_000)
    store.write_bytes("a/blob.bin", data)
    store.write_json("a/x.json", {"k": [1, 2]})
    store.write_text("b.txt", "héllo")
    assert store.read_bytes("a/blob.bin") == data
    assert store.read_json("a/x.json") == {"k": [1, 2]}
    assert store.read_text("b.txt") == "héllo"
    assert store.exists("a") and store.exists("a/x.json") and not store.exists("nope.json")
    assert store.list() == ["a/blob.bin", "a/x.json", "b.txt"]
    assert store.list("a") == ["blob.bin", "x.json"]
    with pytest.raises(FileNotFoundError):
        store.read_bytes("nope.json")

    run = make_run(tmp_path / "run")
    assert store.upload_dir(run, "up") == TRAVELLING + ["metrics.json"]
    assert store.list("up") == TRAVELLING + ["metrics.json"]
    back = tmp_path / "back"
    assert store.download_dir("up", back) == TRAVELLING + ["metrics.json"]
    for f in TRAVELLING:
        assert (back / f).read_bytes() == (run / f).read_bytes()
    assert not any(p.name.startswith(".") for p in back.rglob("*"))  # no temp file left by the atomic writes

    store.delete("a/blob.bin")
    assert store.list("a") == ["x.json"]
    store.delete("up")
    assert store.list("up") == [] and not store.exists("up")
    store.delete("never-there")


def test_a_failed_upload_leaves_no_partial_object(store):
    store.write_bytes("x.bin", b"old")
    with pytest.raises(TypeError):
        store.write_bytes("x.bin", object())  # fails once the upload has started (no buffer to send)
    if store.is_local:
        assert store.read_bytes("x.bin") == b"old"  # core.io: the old file stays
    else:
        assert not store.exists("x.bin")  # pyarrow completes what was sent; it is deleted at once


# ----- run folders
def test_persist_uploads_metrics_last_and_only_travelling_files(store, tmp_path):
    run = make_run(tmp_path / "run")
    seen = []

    def snapshot(f):
        seen.append((f, store.list("trials/t1")))

    sent = store.child("trials", "t1").persist_run(run, final=True, progress=snapshot)
    assert sent == TRAVELLING + ["metrics.json"]
    assert [f for f, _ in seen] == sent
    for f, remote in seen:
        assert "metrics.json" not in remote
    assert seen[-1] == ("metrics.json", TRAVELLING)  # everything else is there before the marker
    assert store.list("trials/t1") == TRAVELLING + ["metrics.json"]
    assert store.child("trials", "t1").read_metrics() == {"stage": "pretrain", "knn_acc": 0.5}


def test_an_interrupted_persist_is_not_a_result_and_checkpoints_travel(store, tmp_path):
    run = make_run(tmp_path / "run", finished=False)
    t1 = store.child("t1")

    def stop_after_two(f, n=[]):
        n.append(f)
        if len(n) > 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        t1.persist_run(run, progress=stop_after_two)
    assert t1.list() == TRAVELLING[:2] and t1.read_metrics() is None

    assert t1.persist_run(run) == TRAVELLING[2:]  # at a checkpoint save: what is missing or changed
    assert t1.persist_run(run) == []
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(os.urandom(300_000))
    os.utime(ckpt, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert t1.persist_run(run) == ["checkpoints/last.ckpt"]
    assert t1.read_bytes("checkpoints/last.ckpt") == ckpt.read_bytes() and t1.read_metrics() is None

    with pytest.raises(ValueError):
        t1.persist_run(run, final=True)  # no metrics.json yet
    ckpt.unlink()  # a finished run deletes its checkpoint (keep_checkpoints off)
    (run / "metrics.json").write_text(json.dumps({"stage": "pretrain"}))
    assert t1.persist_run(run, final=True) == ["metrics.json"]
    assert t1.list() == [f for f in TRAVELLING if f != "checkpoints/last.ckpt"] + ["metrics.json"]


def test_a_rerun_clears_the_old_finished_marker(store, tmp_path):
    t1 = store.child("t1")
    t1.persist_run(make_run(tmp_path / "old"), final=True)
    assert t1.read_metrics() is not None
    Storage(store.uri, env=store._env).child("t1").persist_run(make_run(tmp_path / "new", finished=False))
    assert t1.read_metrics() is None


def test_fetch_run_for_resume_and_a_stage2_backbone(store, tmp_path):
    run = make_run(tmp_path / "run", finished=False)
    store.child("t1").persist_run(run)
    node2 = tmp_path / "node2"
    assert store.fetch_run("t1", node2) == TRAVELLING
    assert sorted(local_files(node2)) == TRAVELLING
    assert (node2 / "checkpoints" / "last.ckpt").read_bytes() == (run / "checkpoints" / "last.ckpt").read_bytes()
    stage2 = tmp_path / "stage2"
    assert store.fetch_run("t1", stage2, files=["backbone.pt"]) == ["backbone.pt"]
    assert (stage2 / "backbone.pt").read_bytes() == (run / "backbone.pt").read_bytes()
    with pytest.raises(FileNotFoundError):
        store.fetch_run("t1", stage2, files=["model.pt"])


def test_working_in_the_storage_folder_itself_persists_nothing(tmp_path):
    store = Storage(tmp_path)
    run = make_run(tmp_path / "t1")
    assert store.persist_run(run, "t1", final=True) == [] and store.fetch_run("t1", run) == []
    assert (run / ".lock").exists()


def test_superseded_attempt_writes_no_finished_marker(store, tmp_path):
    t1 = store.child("t1")
    first = t1.claim(owner="trial")
    assert t1.claimant()["token"] == first and t1.claimant()["pid"] == os.getpid()
    run = make_run(tmp_path / "run")
    t1.persist_run(run, token=first)
    second = t1.claim(owner="trial retry")
    msg = one_line_error(lambda: t1.persist_run(run, final=True, token=first))
    assert "claimed by another trial retry" in msg
    assert t1.read_metrics() is None
    assert t1.persist_run(run, final=True, token=second)[-1] == "metrics.json"
    assert ATTEMPT_FILE in [f.rsplit("/", 1)[-1] for f in t1.list()] and t1.read_metrics() is not None
    assert ATTEMPT_FILE not in store.fetch_run("t1", tmp_path / "back")
    t1.delete()
    assert "the folder was cleared" in one_line_error(lambda: t1.persist_run(run, token=second))


def test_background_persister_ends_with_the_final_folder(store, tmp_path):
    run = make_run(tmp_path / "run", finished=False)
    t1 = store.child("t1")
    persister = RunPersister(t1, run, token=t1.claim())
    ckpt = run / "checkpoints" / "last.ckpt"
    for epoch in range(4):  # saves arriving while an upload runs are folded into one more pass
        ckpt.write_bytes(os.urandom(300_000))
        os.utime(ckpt, ns=(time.time_ns(), time.time_ns() + epoch * 10**9))
        persister.save()
    persister.wait()
    assert t1.read_bytes("checkpoints/last.ckpt") == ckpt.read_bytes() and t1.read_metrics() is None
    (run / "metrics.json").write_text(json.dumps({"stage": "pretrain"}))
    assert persister.finish()[-1] == "metrics.json"
    assert t1.read_metrics() == {"stage": "pretrain"}

    superseded = RunPersister(t1, run, token="not-the-claim")
    superseded.save()  # fails in the background, raised in the caller's thread
    assert "is now claimed by another trial" in one_line_error(superseded.wait)


# ----- check()
def test_check_passes_on_working_storage(store):
    store.check()
    assert store.list() == []  # the probe object is gone


def test_check_local_errors(tmp_path):
    (tmp_path / "f").write_text("x")
    assert "is a file, not a folder" in one_line_error(lambda: Storage(tmp_path / "f").check())
    assert "not writable" in one_line_error(lambda: Storage(tmp_path / "f" / "sub").check())


def test_check_missing_credentials(s3, tmp_path):
    env = {"AWS_ENDPOINT_URL": s3.endpoint, "HOME": str(tmp_path)}
    msg = one_line_error(lambda: Storage(f"s3://{s3.bucket}/p", env=env).check())
    assert "no S3 credentials" in msg and "AWS_ACCESS_KEY_ID" in msg
    half = s3.env()
    del half["AWS_SECRET_ACCESS_KEY"]
    assert "AWS_SECRET_ACCESS_KEY is not" in one_line_error(lambda: Storage(f"s3://{s3.bucket}/p", env=half).check())


def test_check_unreachable_endpoint_fails_fast(s3):
    env = s3.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_server.closed_port()}")
    t = time.monotonic()
    msg = one_line_error(lambda: Storage(f"s3://{s3.bucket}/p", env=env).check())
    assert time.monotonic() - t < 10
    assert "cannot reach the object store" in msg and "AWS_ENDPOINT_URL" in msg


def test_check_missing_bucket(s3):
    msg = one_line_error(lambda: Storage("s3://no-such-bucket/p", env=s3.env()).check())
    assert "bucket 'no-such-bucket' does not exist" in msg and "create it" in msg


def test_check_wrong_secret_and_unknown_key(s3):
    msg = one_line_error(lambda: Storage(f"s3://{s3.bucket}/p", env=s3.env(AWS_SECRET_ACCESS_KEY="wrong")).check())
    assert "AWS_SECRET_ACCESS_KEY does not match" in msg
    msg = one_line_error(lambda: Storage(f"s3://{s3.bucket}/p", env=s3.env(AWS_ACCESS_KEY_ID="nobody")).check())
    assert "does not know the access key 'nobody'" in msg


def test_check_read_only_credentials(s3):
    env = s3.env(AWS_ACCESS_KEY_ID=s3_server.READONLY_KEY, AWS_SECRET_ACCESS_KEY=s3_server.READONLY_SECRET)
    msg = one_line_error(lambda: Storage(f"s3://{s3.bucket}/p", env=env).check())
    assert "may read but not write" in msg


def test_unreachable_store_never_reads_as_unfinished(s3):
    env = s3.env(AWS_ENDPOINT_URL=f"http://127.0.0.1:{s3_server.closed_port()}")
    store = Storage(f"s3://{s3.bucket}/p", env=env)
    store._fs = store._make_fs(probe=True)  # no retries: the same error, sooner
    assert "cannot reach" in one_line_error(lambda: store.read_metrics("t1"))


def test_bench_measures_and_cleans_up(store, tmp_path):
    out = bench(store, size_mb=2, run_dir=make_run(tmp_path / "run"), repeats=1)
    assert out["upload_mb_s"] > 0 and out["download_mb_s"] > 0
    assert out["run_files"] == len(TRAVELLING) + 1
    assert {"persist_checkpoint_s", "persist_checkpoint_blocking_s", "persist_final_s", "fetch_s"} <= set(out)
    assert store.list() == []
