"""Batch captioning in the real world, without Ray: the output lock (live, dead, remote, lost), retried
attempts replacing error rows, ids that do not depend on how the input is spelled, outputs inside inputs,
foreign manifest schemes, special files, the default extensions, and OOM batch halving in the actor."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest

from af3dist.captioning.inputs import AUDIO_EXTENSIONS, check_output_outside_input, plan_inputs
from af3dist.captioning.job import CaptionActor, featurize_clip_rows, read_file_rows, run_batch_caption
from af3dist.captioning.lock import LOCK_FILE, LockLost, OutputLock, OutputLocked
from af3dist.captioning.shards import (
    ShardWriter, compact_output, list_shards, read_done_ids, read_output, remove_temp_files,
)
from af3dist.cli import main
from af3dist.config import ConfigError
from test_batch_caption import job, write_clips


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def plant_lock(out: Path, *, host: str, pid: int, age_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    beat = time.time() - age_s
    (out / LOCK_FILE).write_text(json.dumps({"host": host, "pid": pid, "started": beat, "heartbeat": beat,
                                             "token": "theirs"}))
    os.utime(out / LOCK_FILE, (beat, beat))


# ----------------------------------------------------------------------------------------------------------
# The output lock


def test_a_live_lock_refuses_with_its_holder_named_and_is_released(tmp_path):
    out = tmp_path / "out"
    with OutputLock(str(out)) as held:
        assert held.held and (out / LOCK_FILE).exists()
        with pytest.raises(OutputLocked) as err:
            OutputLock(str(out)).acquire()
        message = str(err.value)
        assert str(out / LOCK_FILE) in message and socket.gethostname() in message
        assert f"pid {os.getpid()}" in message and time.strftime("%Y-%m-%dT") in message
    assert not (out / LOCK_FILE).exists()
    with pytest.raises(KeyboardInterrupt), OutputLock(str(out)):  # released on exceptions too
        raise KeyboardInterrupt
    assert not (out / LOCK_FILE).exists()


def test_the_job_and_the_cli_refuse_a_locked_output_without_touching_it(tiny_model_dir, tmp_path, capsys):
    audio = tmp_path / "audio"
    write_clips(audio, 1)
    out = tmp_path / "out"
    temp = out / ".part-20260101-000000000000-abcdef-00000.parquet.tmp-999"  # the holder's shard being written
    out.mkdir()
    temp.write_bytes(b"PAR1 being written")
    with OutputLock(str(out)):
        with pytest.raises(OutputLocked, match=LOCK_FILE):
            run_batch_caption(job(tiny_model_dir, audio, out))
        with pytest.raises(SystemExit) as exit_:
            main(["caption-batch", "--model", tiny_model_dir, "--input", str(audio), "--output", str(out)])
        assert exit_.value.code == 3
        assert "in use by another caption-batch run" in capsys.readouterr().err
    assert temp.exists() and not list_shards(str(out))


def test_stale_locks_are_taken_over_and_fresh_ones_are_not(tmp_path):
    out = tmp_path / "out"
    here = socket.gethostname()
    pid = dead_pid()
    plant_lock(out, host=here, pid=pid, age_s=0)  # a killed run on this host: its pid is gone
    with OutputLock(str(out)) as lock:
        assert f"pid {pid} is not running" in lock.taken_over
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()
    plant_lock(out, host="elsewhere", pid=1, age_s=10)  # another host, heartbeat fresh: alive
    with pytest.raises(OutputLocked, match="host elsewhere, pid 1"):
        OutputLock(str(out), stale_after=300).acquire()
    plant_lock(out, host="elsewhere", pid=1, age_s=1000)  # another host, silent for too long: dead
    with OutputLock(str(out), stale_after=300) as lock:
        assert "no heartbeat for 1000 s" in lock.taken_over
    (out / LOCK_FILE).write_bytes(b"")  # killed between creating and filling the file
    with pytest.raises(OutputLocked):
        OutputLock(str(out), stale_after=300).acquire()
    os.utime(out / LOCK_FILE, (time.time() - 1000,) * 2)
    with OutputLock(str(out), stale_after=300) as lock:
        assert lock.taken_over
    assert not (out / LOCK_FILE).exists() and not (out / f"{LOCK_FILE}.takeover").exists()


def test_the_heartbeat_keeps_a_lock_fresh_and_a_taken_lock_is_noticed(tmp_path):
    out = tmp_path / "out"
    lock = OutputLock(str(out), stale_after=300, heartbeat_every=0.05).acquire()
    try:
        os.utime(out / LOCK_FILE, (time.time() - 1000,) * 2)
        time.sleep(0.5)
        assert time.time() - (out / LOCK_FILE).stat().st_mtime < 5  # refreshed by the heartbeat
        lock.check()
        plant_lock(out, host="elsewhere", pid=1, age_s=0)  # another run took it over
        time.sleep(0.5)
        with pytest.raises(LockLost, match="taken over"):
            lock.check()
    finally:
        lock.release()
    assert json.loads((out / LOCK_FILE).read_text())["token"] == "theirs"  # not ours to delete


def test_a_remote_lock_has_a_heartbeat_and_goes_stale(tmp_path):
    out = f"memory://locks-{uuid.uuid4().hex[:8]}/out"
    fs = fsspec.filesystem("memory")
    path = f"{out.removeprefix('memory:/')}/{LOCK_FILE}"
    with OutputLock(out, stale_after=300, heartbeat_every=0.05):
        first = json.loads(fs.cat_file(path))["heartbeat"]
        with pytest.raises(OutputLocked, match=LOCK_FILE):
            OutputLock(out).acquire()
        time.sleep(0.4)
        assert json.loads(fs.cat_file(path))["heartbeat"] > first
    assert not fs.exists(path)
    beat = time.time() - 1000
    fs.pipe_file(path, json.dumps({"host": "elsewhere", "pid": 1, "started": beat, "heartbeat": beat,
                                   "token": "theirs"}).encode())
    with OutputLock(out, stale_after=300) as lock:
        assert "no heartbeat" in lock.taken_over
        assert json.loads(fs.cat_file(path))["host"] == socket.gethostname()


def test_changing_output_files_needs_the_lock(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".part-r0-00000.parquet.tmp-123").write_bytes(b"half")
    with pytest.raises(RuntimeError, match="needs its lock"):
        remove_temp_files(str(out), OutputLock(str(out)))  # not acquired
    with OutputLock(str(out)) as lock:
        assert remove_temp_files(str(out), lock) == 1


# ----------------------------------------------------------------------------------------------------------
# Retried attempts


def _rows(*specs: tuple[str, str | None]) -> list[dict]:
    return [{"id": i, "path": f"{i}.wav", "caption": None if e else f"caption of {i}", "duration_s": 1.0,
             "model": "m", "prompt": "p", "error": e} for i, e in specs]


def test_the_latest_attempt_replaces_an_error_row_in_reads_and_in_the_files(tmp_path):
    out = str(tmp_path / "out")
    first = ShardWriter(out, "parquet", shard_rows=10, run_id="20260101-000000000000-aaaaaa")
    first.add(_rows(("a", "unreadable: gone"), ("b", None), ("c", "timeout: slow"), ("d", "unreadable: x")))
    first.flush()
    only_retries = ShardWriter(out, "jsonl", shard_rows=10, run_id="20260101-000001000000-bbbbbb")
    only_retries.add(_rows(("e", "unreadable: gone")))
    only_retries.flush()
    retry = ShardWriter(out, "jsonl", shard_rows=10, run_id="20260102-000000000000-cccccc")
    retry.add(_rows(("a", None), ("c", "timeout: slow again"), ("e", None)))
    retry.flush()

    latest = {r["id"]: r for r in read_output(out).to_pylist()}
    assert sorted(latest) == ["a", "b", "c", "d", "e"] and len(read_output(out)) == 5
    assert latest["a"]["caption"] == "caption of a" and latest["a"]["error"] is None  # captioned beats error
    assert latest["c"]["error"] == "timeout: slow again"  # the later attempt wins among errors
    assert sorted(read_done_ids(out)) == ["a", "a", "b", "c", "c", "d", "e", "e"]  # the files, as stored

    with OutputLock(out) as lock:
        assert compact_output(out, lock) == 3
        assert compact_output(out, lock) == 0
    assert sorted(read_done_ids(out)) == ["a", "b", "c", "d", "e"]
    assert {Path(p).name for p in list_shards(out)} == {"part-20260101-000000000000-aaaaaa-00000.parquet",
                                                        "part-20260102-000000000000-cccccc-00000.jsonl"}
    assert {r["id"]: r for r in read_output(out).to_pylist()} == latest


# ----------------------------------------------------------------------------------------------------------
# Inputs


def test_ids_do_not_depend_on_how_the_input_is_spelled(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write_clips(corpus / "a", 2)
    write_clips(corpus / "a" / "deep", 1)
    write_clips(corpus, 1)
    monkeypatch.chdir(tmp_path)
    spellings = [str(corpus), f"{corpus}/", "corpus", "corpus/", "./corpus", "./corpus/", f"{corpus}/./a/..",
                 f"{tmp_path}//corpus", f"file://{corpus}/", "corpus/**/*", f"{corpus}/**/*.*", "./corpus/**"]
    plans = {s: plan_inputs(s) for s in spellings}
    expected = ["a/clip000_16000.wav", "a/clip001_16000.flac", "a/deep/clip000_16000.wav", "clip000_16000.wav"]
    for spelling, plan in plans.items():
        assert plan.ids == expected, spelling
        assert plan.locations == [str(corpus / i) for i in expected], spelling
    assert plan_inputs("corpus/a/*.wav").ids == ["clip000_16000.wav"]  # relative to where the glob starts

    fs = fsspec.filesystem("memory")
    bucket = f"spell-{uuid.uuid4().hex[:8]}"
    for i in expected:
        fs.pipe_file(f"/{bucket}/corpus/{i}", (corpus / i).read_bytes())
    remote = [f"memory://{bucket}/corpus", f"memory://{bucket}/corpus/", f"memory://{bucket}/x/../corpus",
              f"memory://{bucket}/corpus/**/*.*"]
    assert all(plan_inputs(s).ids == expected for s in remote)


def test_an_output_inside_the_input_is_refused(tiny_model_dir, synthetic_dir, tmp_path):
    audio = tmp_path / "audio"
    write_clips(audio, 1)
    for source, output in [(audio, audio / "captions"), (f"{audio}/", audio), (f"{audio}/**/*.wav", audio / "o"),
                           (synthetic_dir, Path(synthetic_dir, "captions")),
                           (Path(synthetic_dir, "data"), Path(synthetic_dir, "data", "out"))]:
        with pytest.raises(ConfigError, match="inside the input folder"):
            check_output_outside_input(str(source), str(output))
    with pytest.raises(ConfigError, match="inside the input folder"):
        check_output_outside_input(synthetic_dir, str(Path(synthetic_dir, "data", "out")), split="test")
    (tmp_path / "link").symlink_to(audio)  # the same folder under another name
    with pytest.raises(ConfigError, match="inside the input folder"):
        check_output_outside_input(str(audio), str(tmp_path / "link" / "out"))
    with pytest.raises(ConfigError, match="inside the input folder"):  # the job refuses before anything runs
        run_batch_caption(job(tiny_model_dir, audio, audio / "captions"))
    assert not (audio / "captions").exists()

    check_output_outside_input(str(audio), str(tmp_path / "audio-captions"))  # a sibling with a shared prefix
    (tmp_path / "m.csv").write_text(f"id,path\nx,{audio}/clip000_16000.wav\n")
    check_output_outside_input(str(tmp_path / "m.csv"), str(tmp_path / "out"))  # a manifest names its files
    check_output_outside_input(str(audio / "clip000_16000.wav"), str(audio / "out"))  # so does one file


def test_manifest_entries_with_foreign_schemes_are_refused(tmp_path):
    write_clips(tmp_path / "clips", 1)
    clip = tmp_path / "clips" / "clip000_16000.wav"
    (tmp_path / "m.csv").write_text(f"id,path\nok,clips/{clip.name}\nurl,file://{clip}\n"
                                    "meta,http://169.254.169.254/latest/meta-data/x.wav\nmem,memory://b/c.wav\n")
    with pytest.raises(ConfigError) as err:
        plan_inputs(str(tmp_path / "m.csv"))
    message = str(err.value)
    assert "2 entries" in message and "line 4: 'http://169.254.169.254" in message and "line 5" in message
    (tmp_path / "m.csv").write_text(f"id,path\nok,clips/{clip.name}\nurl,file://{clip}\nabs,{clip}\n")
    assert plan_inputs(str(tmp_path / "m.csv")).locations == [str(clip)] * 3

    fs = fsspec.filesystem("memory")
    bucket = f"manifest-{uuid.uuid4().hex[:8]}"
    fs.pipe_file(f"/{bucket}/m.jsonl", (json.dumps({"id": "rel", "path": "a.wav"}) + "\n" +
                                        json.dumps({"id": "url", "path": f"memory://{bucket}/b.wav"}) + "\n").encode())
    assert plan_inputs(f"memory://{bucket}/m.jsonl").locations == [f"memory:///{bucket}/a.wav",
                                                                     f"memory:///{bucket}/b.wav"]
    fs.pipe_file(f"/{bucket}/bad.jsonl", json.dumps({"id": "s3", "path": "s3://other/b.wav"}).encode())
    with pytest.raises(ConfigError, match="line 1: 's3://other/b.wav'"):
        plan_inputs(f"memory://{bucket}/bad.jsonl")


def test_default_extensions_cover_the_ffmpeg_decoder(tmp_path):
    wanted = ("wav wave flac mp3 ogg oga opus webm weba mka m4a mp4 m4b aac aif aiff aifc au snd caf w64 wv amr "
              "ac3 wma mp2").split()
    assert set(f".{e}" for e in wanted) <= set(AUDIO_EXTENSIONS)
    for name in ("a.M4A", "b.caf", "c.webm", "d.aifc", "notes.txt", "e.parquet"):
        (tmp_path / name).write_bytes(b"x")
    assert plan_inputs(str(tmp_path)).ids == ["a.M4A", "b.caf", "c.webm", "d.aifc"]


def without_blocking(fn, fifo: Path, timeout: float = 30.0):
    """fn()'s result (or exception), failing the test, not hanging it, when fn blocks on `fifo`."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except Exception as e:
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        with open(fifo, "wb"):  # a writer unblocks the reader, so the test process can end
            pass
        pytest.fail(f"opening the FIFO {fifo} blocked")
    if "error" in box:
        raise box["error"]
    return box["result"]


def test_a_fifo_is_unreadable_and_never_opened(tmp_path):
    audio = tmp_path / "audio"
    write_clips(audio, 1)
    os.mkfifo(audio / "x.wav")  # opening it for reading would block until a writer comes
    plan = plan_inputs(str(audio))
    assert plan.ids == ["clip000_16000.wav", "x.wav"]
    batch = {"id": np.array(plan.ids, object), "path": np.array(plan.paths, object),
             "location": np.array(plan.locations, object)}
    result = without_blocking(lambda: read_file_rows(batch, max_bytes=2**20), audio / "x.wav")
    assert result["error"][0] == "" and len(result["bytes"][0]) > 0
    assert result["error"][1].startswith("unreadable: not a regular file") and result["bytes"][1] == b""

    parquet = tmp_path / "parquet"
    parquet.mkdir()
    os.mkfifo(parquet / "x.parquet")  # the planner reads parquet footers: it must not open this one
    with pytest.raises(ConfigError, match="x.parquet: parquet input is not a regular file"):
        without_blocking(lambda: plan_inputs(str(parquet)), parquet / "x.parquet")


# ----------------------------------------------------------------------------------------------------------
# Out of memory in the captioning actor


class OomAbove:
    """A predictor that raises torch.cuda.OutOfMemoryError for batches over `limit` clips (or always, with
    limit 0) and otherwise calls the real one; it records every batch size it was given."""

    def __init__(self, real, limit: int):
        self.real, self.limit, self.sizes = real, limit, []

    def __call__(self, batch):
        import torch

        self.sizes.append(len(batch["id"]))
        if len(batch["id"]) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.real(batch)


def test_out_of_memory_halves_the_batch_and_captions_match(tiny_model_dir, tmp_path):
    names = write_clips(tmp_path, 8, seconds=1.0, seed=7)
    read = {"id": np.array(names, object), "path": np.array(names, object), "error": np.array([""] * 8, object),
            "bytes": np.array([(tmp_path / n).read_bytes() for n in names], object)}
    batch = featurize_clip_rows(read, processor=tiny_model_dir, prompt="Describe the audio.", max_seconds=4)
    actor = CaptionActor(tiny_model_dir, None, "auto", max_new_tokens=8, batch_size=8, threads=1)
    expected = actor(batch)
    assert all(expected["caption"]) and not any(expected["error"])

    real = actor.predictor
    actor.predictor = OomAbove(real, limit=2)
    halved = actor(batch)
    assert list(halved["caption"]) == list(expected["caption"]) and not any(halved["error"])
    assert actor.predictor.sizes == [8, 4, 2, 2, 4, 2, 2]

    actor.predictor = OomAbove(real, limit=0)  # not even one clip fits: generation_failed, not corrupt
    failed = actor(batch)
    assert not any(failed["caption"])
    assert all(e.startswith("generation_failed: OutOfMemoryError at batch size 1") for e in failed["error"])

    def cpu_oom(batch):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9 GB")

    sizes: list[int] = []
    actor.predictor = lambda b: (sizes.append(len(b["id"])), real(b))[1] if len(b["id"]) <= 4 else cpu_oom(b)
    assert list(actor(batch)["caption"]) == list(expected["caption"]) and sizes == [4, 4]
