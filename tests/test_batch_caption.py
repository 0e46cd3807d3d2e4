"""Batch captioning: input planning, atomic shards, and the Ray Data job end to end on real encoded files
(every codec and rate, planted bad files, a FIFO), a manifest and a parquet input, resume after SIGKILL
with the output lock held by the killed run, and `--retry-errors` for a file that was briefly unreadable."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from af3dist.captioning.inputs import plan_inputs
from af3dist.captioning.job import error_reason, run_batch_caption
from af3dist.config import CaptionBatchConfig
from af3dist.captioning.lock import LOCK_FILE, OutputLock, OutputLocked
from af3dist.captioning.shards import (
    OUTPUT_COLUMNS, SUMMARY_FILE, ShardWriter, list_shards, read_done_ids, read_output, remove_temp_files,
)
from af3dist.config import ConfigError
from af3dist.embedded.captions import SOUND_CLASSES
from af3dist.embedded.encoding import FORMATS, encode_audio
from af3dist.embedded.plan import SAMPLE_RATES
from af3dist.embedded.sounds import generate_clip

TOKENS = 8  # max_new_tokens: enough to compare captions, cheap on 2 busy cores

# planted bad inputs -> the reason their row must carry (max_seconds=4 in these runs)
BAD = {"bad_text.wav": "unsupported_codec", "bad_truncated.flac": "corrupt", "bad_empty.wav": "empty_audio",
       "bad_long.wav": "too_long", "bad_dangling.ogg": "unreadable", "bad_fifo.wav": "unreadable"}


def write_clips(folder: Path, n: int, seconds: float = 1.0, seed: int = 0) -> list[str]:
    """`n` clips cycling through every codec x sampling rate (mono and stereo); returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for k in range(n):
        fmt, rate = FORMATS[k % len(FORMATS)], SAMPLE_RATES[(k // len(FORMATS)) % len(SAMPLE_RATES)]
        samples = generate_clip(rng, SOUND_CLASSES[k % len(SOUND_CLASSES)], seconds, rate, 1 + k % 2)
        name = f"clip{k:03d}_{rate}.{fmt}"
        (folder / name).write_bytes(encode_audio(samples, rate, fmt))
        names.append(name)
    return names


def plant_bad_files(folder: Path) -> None:
    rng = np.random.default_rng(1)
    (folder / "bad_text.wav").write_bytes(b"this is a text file, not audio")
    flac = encode_audio(generate_clip(rng, SOUND_CLASSES[0], 2.0, 44100, 2), 44100, "flac")
    (folder / "bad_truncated.flac").write_bytes(flac[: len(flac) // 3])
    (folder / "bad_empty.wav").write_bytes(encode_audio(np.zeros((0, 1), np.float32), 16000, "wav"))
    (folder / "bad_long.wav").write_bytes(encode_audio(generate_clip(rng, SOUND_CLASSES[1], 5.0, 16000, 1),
                                                       16000, "wav"))
    os.symlink(folder / "does-not-exist.ogg", folder / "bad_dangling.ogg")
    os.mkfifo(folder / "bad_fifo.wav")  # opening it would block its read task forever


def job(tiny_model_dir, input, output, **kw) -> CaptionBatchConfig:
    kw = {"max_new_tokens": TOKENS, "max_seconds": 4, "progress_seconds": 2, **kw}
    return CaptionBatchConfig.make(model=tiny_model_dir, input=str(input), output=str(output), **kw)


def reference_captions(tiny_model_dir, files: dict[str, Path]) -> dict[str, str]:
    """The Captioner's one-by-one greedy captions (batch size 1, no Ray)."""
    from af3dist.inference import Captioner

    captioner = Captioner.load(tiny_model_dir, max_new_tokens=TOKENS)
    return {k: captioner.caption(p.read_bytes()) for k, p in files.items()}


def assert_exactly_once(output: Path, ids: set[str]) -> None:
    done = read_done_ids(str(output))
    assert len(done) == len(set(done)), "an id appears twice in the output"
    assert set(done) == ids


# ----------------------------------------------------------------------------------------------------------
# Without Ray


def test_plans_folders_globs_and_manifests(tmp_path):
    audio = tmp_path / "audio"
    write_clips(audio / "a", 2)
    write_clips(audio / "b", 1)
    (audio / "notes.txt").write_text("not an input")
    folder = plan_inputs(str(audio))
    assert folder.kind == "files" and folder.ids == ["a/clip000_16000.wav", "a/clip001_16000.flac",
                                                     "b/clip000_16000.wav"]
    assert all(Path(p).is_file() for p in folder.locations)
    glob = plan_inputs(str(audio / "*" / "*.flac"))
    assert glob.ids == ["a/clip001_16000.flac"]
    assert plan_inputs(f"file://{audio}/a").ids == ["clip000_16000.wav", "clip001_16000.flac"]

    (tmp_path / "m.csv").write_text("id,path\nx,audio/a/clip000_16000.wav\ny,/nowhere.wav\nx,audio/b/clip000_16000.wav\n"
                                    "z,\n")
    csv_plan = plan_inputs(str(tmp_path / "m.csv"))
    assert csv_plan.ids == ["x", "y", "z"] and csv_plan.duplicates == 1
    assert csv_plan.locations == [str(audio / "a" / "clip000_16000.wav"), "/nowhere.wav", ""]
    (tmp_path / "m.jsonl").write_text(json.dumps({"uri": "audio/b/clip000_16000.wav"}) + "\n\n"
                                      + json.dumps({"id": 7, "uri": f"file://{audio}/a/../b/c.wav"}) + "\n")
    jsonl = plan_inputs(str(tmp_path / "m.jsonl"))
    assert jsonl.ids == ["audio/b/clip000_16000.wav", "7"] and jsonl.locations[1] == str(audio / "b" / "c.wav")
    (tmp_path / "broken.jsonl").write_text('{"id": 1}\nnot json\n')
    with pytest.raises(ValueError, match="broken.jsonl:2"):
        plan_inputs(str(tmp_path / "broken.jsonl"))
    with pytest.raises(FileNotFoundError):
        plan_inputs(str(tmp_path / "missing"))


def test_plans_audiocaps_parquet_one_row_per_clip(synthetic_dir):
    plan = plan_inputs(synthetic_dir, split="test")
    table = pq.read_table(next(Path(synthetic_dir, "data").glob("test-*.parquet")),
                          columns=["youtube_id", "start_time"])
    assert plan.kind == "parquet" and plan.key_column == "audiocap_id"
    assert len(plan) == 6 and plan.duplicates == 24  # five reference rows per clip, captioned once
    assert set(plan.ids) >= {f"{y}_{s}" for y, s in zip(table["youtube_id"].to_pylist(),
                                                         table["start_time"].to_pylist())}
    assert len(plan_inputs(str(Path(synthetic_dir, "data", "*.parquet")))) == 24 + 6 + 6


def test_shards_appear_whole_and_temp_files_are_ignored(tmp_path, monkeypatch):
    out = tmp_path / "out"
    writer = ShardWriter(str(out), "parquet", shard_rows=2, run_id="r1")
    rows = [{"id": str(i), "path": f"{i}.wav", "caption": "a dog", "duration_s": 1.0, "model": "m", "prompt": "p",
             "error": None} for i in range(5)]
    writer.add(rows)
    assert [Path(p).name for p in list_shards(str(out))] == ["part-r1-00000.parquet", "part-r1-00001.parquet"]
    # a write that dies halfway leaves no shard behind, and a temp file of a killed run is never read
    import af3dist.storage as storage  # the one writer every shard goes through

    def dying_replace(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(storage.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        writer.flush()
    monkeypatch.undo()
    (out / ".part-r0-00000.parquet.tmp-123").write_bytes(b"PAR1 half a file")
    assert len(list_shards(str(out))) == 2 and read_done_ids(str(out)) == ["0", "1", "2", "3"]
    with OutputLock(str(out)) as lock:
        assert remove_temp_files(str(out), lock) == 1
    assert not list(out.glob(".*"))
    jsonl = ShardWriter(str(out), "jsonl", shard_rows=10, run_id="r2")
    jsonl.add(rows[4:])
    jsonl.flush()
    table = read_output(str(out))
    assert table.column_names == OUTPUT_COLUMNS and sorted(table["id"].to_pylist()) == ["0", "1", "2", "3", "4"]


def test_bad_settings_fail_with_the_field_named(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="actors"):
        job(tiny_model_dir, tmp_path, tmp_path / "o", actors="3,1")
    with pytest.raises(ConfigError, match="batch_size"):
        job(tiny_model_dir, tmp_path, tmp_path / "o", batch_size=0)
    assert job(tiny_model_dir, tmp_path, tmp_path / "o", actors="1,4").actors == (1, 4)
    assert error_reason("corrupt: truncated flac: 3 of 9") == "corrupt"


# ----------------------------------------------------------------------------------------------------------
# The job on a local Ray instance


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_every_codec_and_rate_with_bad_files_captions_like_the_captioner(tiny_model_dir, tmp_path):
    audio = tmp_path / "audio"
    names = write_clips(audio, len(FORMATS) * len(SAMPLE_RATES), seconds=1.0)
    plant_bad_files(audio)
    out = tmp_path / "out"
    summary = run_batch_caption(job(tiny_model_dir, audio, out, batch_size=4, shard_rows=5))

    assert summary["complete"] and summary["inputs"] == len(names) + len(BAD)
    assert summary["captioned"] == len(names) and summary["errors"] == len(BAD)
    assert summary["errors_by_reason"] == dict(Counter(BAD.values()))
    assert json.loads((out / SUMMARY_FILE).read_text())["captioned"] == len(names)
    assert_exactly_once(out, set(names) | set(BAD))
    rows = {r["id"]: r for r in read_output(str(out)).to_pylist()}
    for name, reason in BAD.items():
        assert rows[name]["caption"] is None and error_reason(rows[name]["error"]) == reason, rows[name]
    # lossless formats to the sample; Ogg Vorbis within one block of FFmpeg's end trimming of libsndfile's files
    assert all(rows[n]["error"] is None and rows[n]["duration_s"] == pytest.approx(
        1.0, abs=1e-2 if n.endswith(".ogg") else 1e-3) for n in names)
    assert {rows[n]["model"] for n in names} == {tiny_model_dir}
    assert {rows[n]["prompt"] for n in names} == {"Describe the audio."}
    # batched, length-bucketed, in an actor pool: the same tokens as the Captioner one clip at a time
    expected = reference_captions(tiny_model_dir, {n: audio / n for n in names})
    assert {n: rows[n]["caption"] for n in names} == expected

    lines: list[str] = []  # a rerun finds nothing left to do, and says when the output used another prompt
    again = run_batch_caption(job(tiny_model_dir, audio, out, prompt="What do you hear?"), printer=lines.append)
    assert again["skipped"] == len(rows) and again["captioned"] == again["errors"] == 0 and again["complete"]
    assert any("another model or prompt" in line for line in lines)
    assert len(read_done_ids(str(out))) == len(rows)


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_manifest_input_with_jsonl_output(tiny_model_dir, tmp_path):
    names = write_clips(tmp_path / "clips", 4, seconds=1.5, seed=3)
    lines = [{"id": f"m{i}", "path": f"clips/{n}"} for i, n in enumerate(names)]
    lines += [{"id": "gone", "path": "clips/never-written.wav"}, {"id": "m0", "path": f"clips/{names[1]}"},
              {"id": "nopath"}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(l) + "\n" for l in lines))
    out = tmp_path / "out"
    summary = run_batch_caption(job(tiny_model_dir, manifest, out, format="jsonl", actors="1,2"))
    assert summary["complete"] and summary["duplicate_ids_in_input"] == 1
    assert summary["errors_by_reason"] == {"unreadable": 1, "missing_audio": 1}
    assert all(p.endswith(".jsonl") for p in list_shards(str(out)))
    rows = {r["id"]: r for r in read_output(str(out)).to_pylist()}
    assert set(rows) == {"m0", "m1", "m2", "m3", "gone", "nopath"}
    expected = reference_captions(tiny_model_dir, {f"m{i}": tmp_path / "clips" / n for i, n in enumerate(names)})
    assert {k: rows[k]["caption"] for k in expected} == expected
    assert rows["m0"]["path"] == f"clips/{names[0]}"  # the first line of a repeated id wins


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_audiocaps_parquet_input(tiny_model_dir, synthetic_dir, tmp_path):
    out = tmp_path / "out"
    summary = run_batch_caption(job(tiny_model_dir, synthetic_dir, out, split="test", max_seconds=30.0))
    plan = plan_inputs(synthetic_dir, split="test")
    assert summary["complete"] and summary["inputs"] == 6
    assert_exactly_once(out, set(plan.ids))
    rows = read_output(str(out)).to_pylist()
    long = [r for r in rows if r["error"]]  # the split's one clip over 30 s
    assert [error_reason(r["error"]) for r in long] == ["too_long"]
    assert all(r["caption"] and r["path"].startswith("Y") for r in rows if not r["error"])


RESUME_ARGS = ["--batch-size", "2", "--shard-rows", "4", "--max-new-tokens", "32", "--max-seconds", "4"]


@pytest.mark.slow
@pytest.mark.usefixtures("ray_local")
def test_killed_run_resumes_and_every_clip_is_written_exactly_once(tiny_model_dir, tmp_path):
    import ray

    audio = tmp_path / "audio"
    # Enough clips that the kill lands mid-run even when results arrive a block at a time.
    names = write_clips(audio, 120, seconds=1.0, seed=5)
    plant_bad_files(audio)
    store = tmp_path / "share"  # flaky.wav lives on a share that is away during the first two runs
    os.symlink(store / "flaky.wav", audio / "flaky.wav")
    everything = set(names) | set(BAD) | {"flaky.wav"}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ray_jobs.batch_caption", "--model", tiny_model_dir, "--input", str(audio),
           "--output", str(out), *RESUME_ARGS]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    first = subprocess.Popen(cmd, env=env, cwd=Path(__file__).parents[1], stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list_shards(str(out)) and first.poll() is None:
        time.sleep(0.05)
    assert first.poll() is None, f"the first run ended before it could be killed: {first.stderr.read()[-2000:]}"

    # a second run on the same output while the first is running refuses at once, naming the holder
    cfg = CaptionBatchConfig.make(model=tiny_model_dir, input=str(audio), output=str(out), batch_size=2,
                                  shard_rows=4, max_new_tokens=32, max_seconds=4)
    started = time.time()
    with pytest.raises(OutputLocked, match=f"pid {first.pid},"):
        run_batch_caption(cfg)
    assert time.time() - started < 10 and first.poll() is None
    first.send_signal(signal.SIGKILL)
    first.wait()
    time.sleep(2)  # let Ray tear down the dead driver's actors

    assert (out / LOCK_FILE).exists()  # a killed run cannot release its lock: the next run takes it over
    before = read_done_ids(str(out))
    assert 4 <= len(before) < len(everything) and len(before) == len(set(before))
    for shard in list_shards(str(out)):  # whatever a reader sees is a whole shard
        assert pq.read_table(shard).num_rows == 4

    lines: list[str] = []
    summary = run_batch_caption(cfg, printer=lines.append)
    assert any("took over the stale lock" in line and f"pid {first.pid} is not running" in line for line in lines)
    assert summary["skipped"] == len(before) and summary["complete"]
    assert summary["captioned"] + summary["errors"] == len(everything) - len(before)
    assert_exactly_once(out, everything)
    assert not list(out.glob(".part-*")) and not (out / LOCK_FILE).exists()
    rows = {r["id"]: r for r in read_output(str(out)).to_pylist()}
    assert {n for n, r in rows.items() if r["error"]} == set(BAD) | {"flaky.wav"}
    assert error_reason(rows["flaky.wav"]["error"]) == "unreadable"
    # the captions of both runs match the Captioner's on a sample
    sample = sorted(names)[::10]
    from af3dist.inference import Captioner

    captioner = Captioner.load(tiny_model_dir, max_new_tokens=32)
    assert {n: rows[n]["caption"] for n in sample} == {n: captioner.caption((audio / n).read_bytes()) for n in sample}

    # the share is back: a plain rerun keeps the error (errors count as done); --retry-errors captions it
    write_clips(store, 1, seconds=1.0, seed=9)
    (store / "clip000_16000.wav").rename(store / "flaky.wav")
    assert run_batch_caption(cfg)["skipped"] == len(everything)
    transient = {n for n, reason in BAD.items() if reason == "unreadable"} | {"flaky.wav"}
    retried = run_batch_caption(cfg.model_copy(update={"retry_errors": True}))
    assert retried["retried_errors"] == len(transient) and retried["skipped"] == len(everything) - len(transient)
    assert retried["captioned"] == 1 and retried["errors_by_reason"] == {"unreadable": len(transient) - 1}
    assert retried["superseded_rows_removed"] == len(transient) and retried["complete"]
    assert_exactly_once(out, everything)  # in the files themselves, not only as read back
    after = {r["id"]: r for r in read_output(str(out)).to_pylist()}
    assert after["flaky.wav"]["error"] is None
    assert after["flaky.wav"]["caption"] == captioner.caption((store / "flaky.wav").read_bytes())
    assert {n: r for n, r in after.items() if n not in transient} == {n: r for n, r in rows.items()
                                                                      if n not in transient}
