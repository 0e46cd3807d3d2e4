"""af3dist.storage: the one place that tells local paths from URLs and writes outputs whole and durably."""

import logging
import os
import uuid

import pytest

from af3dist import storage
from af3dist.training.state import MetricsLog


@pytest.mark.parametrize("location, remote, scheme, stripped", [
    ("/data/audiocaps", False, "file", "/data/audiocaps"),
    ("relative/dir", False, "file", "relative/dir"),
    ("s3://bucket/run", True, "s3", "bucket/run"),
    ("HF://datasets/OpenSound/AudioCaps", True, "hf", "datasets/OpenSound/AudioCaps"),
    ("file:///tmp/x", True, "file", "/tmp/x"),
    ("memory://b/c.wav", True, "memory", "b/c.wav"),
])
def test_one_rule_for_urls(location, remote, scheme, stripped):
    assert storage.is_remote(location) is remote
    assert storage.scheme(location) == scheme
    assert storage.strip_scheme(location) == stripped


def test_join_and_absolute(tmp_path, monkeypatch):
    assert storage.join("s3://bucket/run/", "adapter", "x.json") == "s3://bucket/run/adapter/x.json"
    assert storage.join(str(tmp_path), "a", "b") == str(tmp_path / "a" / "b")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AF3_TEST_DIR", "sub")
    assert storage.absolute("$AF3_TEST_DIR/out") == str(tmp_path / "sub" / "out")
    assert storage.absolute("s3://bucket/$NOT_EXPANDED") == "s3://bucket/$NOT_EXPANDED"


def test_local_write_is_whole_durable_and_leaves_nothing_behind(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    target = tmp_path / "deep" / "out.json"
    storage.write_text(str(target), "old")
    assert target.read_text() == "old" and synced, "flushed to disk before the rename"

    with pytest.raises(RuntimeError):  # a writer that dies half way: the old file stays, no temp file left
        with storage.building_file(target) as tmp:
            tmp.write_text("half of the ne")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_remote_write_read_and_exists():
    base = f"memory://storage-{uuid.uuid4().hex[:8]}"
    path = storage.join(base, "sub", "a.txt")
    assert not storage.exists(path)
    storage.write_text(path, "hello")
    assert storage.exists(path)
    with storage.open_file(path, "r") as f:
        assert f.read() == "hello"


def test_building_folder_puts_back_a_folder_a_kill_left_aside(tmp_path):
    dst = tmp_path / "adapter"
    with storage.building_folder(dst) as tmp:
        (tmp / "w.bin").write_bytes(b"v1")
    # a kill between the two renames of the next swap: dst gone, the old one aside
    os.replace(dst, tmp_path / f".adapter.old-{os.getpid() + 1}")
    with pytest.raises(RuntimeError):
        with storage.building_folder(dst) as tmp:
            raise RuntimeError("killed while building")
    assert (dst / "w.bin").read_bytes() == b"v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_copy_folder_uploads_the_marker_last(tmp_path, monkeypatch):
    src = tmp_path / "adapter"
    (src / "nested").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "nested/tokenizer.json", "z.txt"):
        (src / name).write_text(name)
    order = []
    real = storage.write_bytes
    monkeypatch.setattr(storage, "write_bytes", lambda loc, data: (order.append(loc), real(loc, data))[1])
    dst = f"memory://copy-{uuid.uuid4().hex[:8]}/run/adapter"
    storage.copy_folder(src, dst, last="adapter_config.json")
    assert order[-1] == f"{dst}/adapter_config.json" and len(order) == 4
    with storage.open_file(f"{dst}/nested/tokenizer.json", "r") as f:
        assert f.read() == "nested/tokenizer.json"

    local = tmp_path / "out" / "adapter"
    storage.copy_folder(src, str(local), last="adapter_config.json")
    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "adapter_config.json", "adapter_model.safetensors", "nested/tokenizer.json", "z.txt"]


def test_remote_metrics_log_says_tensorboard_is_skipped(caplog):
    out = f"memory://metrics-{uuid.uuid4().hex[:8]}/run"
    with caplog.at_level(logging.WARNING, logger="af3dist.training.state"):
        metrics = MetricsLog(out)
    assert metrics.writer is None
    assert any("TensorBoard" in r.getMessage() and out in r.getMessage() for r in caplog.records)
    metrics.log({"kind": "train", "step": 1, "loss": 0.5})
    metrics.close()
    assert MetricsLog(out, resume_step=1).records == [{"kind": "train", "step": 1, "loss": 0.5}]
