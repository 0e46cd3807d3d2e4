#!/usr/bin/env python
"""Data-plane throughput: clips/s for decode + resample + log-mel + chat template/tokenize, three ways.

    .venv/bin/python benchmarks/data_pipeline.py [--clips 400] [--seconds 10] [--set data.decode_batch_size=8]

Builds into a temp dir (kept with --keep / --workdir) a tiny AF3 (`build_tiny_model`) and synthetic
AudioCaps-layout shards `data/train-0000K-of-0000N.parquet` (columns audio{bytes,path}, caption,
audiocap_id, youtube_id, start_time) of 10 s, 48 kHz FLAC clips, plus a small `warmup` split, then measures:

  bare   one process, one torch thread, no framework: decode + downmix + resample + Whisper log-mel
         (and, as an extra, the whole `Featurizer.training_example`), the per-core cost of the work itself;
  seed   the upstream HF recipe's shape: `datasets` streaming parquet + `cast_column("audio",
         Audio(sampling_rate=16000))`, a torch DataLoader (num_workers=0, as the HF Trainer's default) and
         a collator calling `processor.apply_chat_template(..., tokenize=True, output_labels=True)`, all in
         the training process. If `datasets` cannot decode audio here (torchcodec), the same shape with
         soundfile + soxr (HQ) decoding in `.map`, said so in `seed_decoder`;
  ray_1  `build_dataset` on a local Ray with num_cpus=1, consumed through `iter_bucketed` + `collate`;
  ray_n  the same with num_cpus=os.cpu_count().

Each way runs in its own subprocess (a fresh Ray for each Ray run). Each first does a warm-up pass over the
`warmup` split (imports, Ray worker start, processor load in every worker), then a timed pass over the
`train` split: the clock runs from the start of iteration to the last collated batch (so Ray Data's
per-epoch planning and pipeline fill/drain are in; Ray init and first-task processor load are not).
The same batch size is used by all ways. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "Describe the audio."
# Config overrides the Ray runs use unless --set replaces them: what a user would set for a data-only
# job on a small machine (one CPU per data task: a task is single-threaded decode/resample/STFT work).
DEFAULT_OVERRIDES = ["data.cpus_per_data_task=1"]


# ----------------------------------------------------------------------------------------- building inputs

def _encode_one(args: tuple) -> tuple[bytes, str]:
    import numpy as np

    from af3dist.data.synthetic import SOUND_CLASSES, encode_audio, generate_clip

    index, seed, seconds, sr, channels, fmt = args
    label = SOUND_CLASSES[index % len(SOUND_CLASSES)]
    rng = np.random.default_rng([seed, index])
    samples = generate_clip(rng, label, seconds, sr, channels)
    return encode_audio(samples, sr, fmt), label


def build_split(data_dir: Path, split: str, n_clips: int, n_shards: int, args, id_base: int, pool) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from af3dist.data.synthetic import AUDIOCAPS_SCHEMA, captions_for, shard_file_name

    jobs = [(id_base + i, args.seed, args.seconds, args.sample_rate, args.channels, args.format)
            for i in range(n_clips)]
    encoded = pool.map(_encode_one, jobs, chunksize=8)
    n_shards = max(1, min(n_shards, n_clips))
    bounds = np.linspace(0, n_clips, n_shards + 1).round().astype(int)
    for k in range(n_shards):
        rows = range(bounds[k], bounds[k + 1])
        cols = {"audio": [], "caption": [], "audiocap_id": [], "youtube_id": [], "start_time": []}
        for i in rows:
            data, label = encoded[i]
            captions = captions_for(label)
            cols["audio"].append({"bytes": data, "path": f"{split}_{i:06d}.{args.format}"})
            cols["caption"].append(captions[i % len(captions)])
            cols["audiocap_id"].append(id_base + i + 1)
            cols["youtube_id"].append(f"yt{id_base + i:09d}"[-11:])
            cols["start_time"].append((i * 10) % 600)
        table = pa.Table.from_pydict(cols, schema=AUDIOCAPS_SCHEMA)
        pq.write_table(table, data_dir / shard_file_name(split, k, n_shards), row_group_size=32,
                       compression="snappy")


def build_inputs(root: Path, args) -> dict:
    from multiprocessing import get_context

    from af3dist.assets import tokenizer_corpus
    from af3dist.config import TinyModelConfig
    from af3dist.model.tiny import build_tiny_model

    t0 = time.perf_counter()
    model_dir = build_tiny_model(root / "tiny-af3", TinyModelConfig(), tokenizer_corpus(PROMPT))
    data_dir = root / "audiocaps" / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    with get_context("spawn").Pool(os.cpu_count()) as pool:
        build_split(data_dir, "train", args.clips, args.shards, args, 0, pool)
        build_split(data_dir, "warmup", args.warmup_clips, args.shards, args, 10_000_000, pool)
    size = sum(p.stat().st_size for p in data_dir.glob("train-*.parquet"))
    return {"model": str(model_dir), "source": str(root / "audiocaps"), "build_s": time.perf_counter() - t0,
            "train_bytes": size}


# ------------------------------------------------------------------------------------- measured workloads

def _progress(tag: str, n: int, total: int, t0: float) -> None:
    el = time.perf_counter() - t0
    print(f"  [{tag}] {n}/{total} clips, {el:.1f} s, {n / el if el else 0:.1f} clips/s", flush=True)


def _rates(marks: list[tuple[float, int]], t0: float) -> dict:
    """marks: (time, clips so far) after every batch. Whole pass and first-batch-to-last rates."""
    n, t_end = marks[-1][1], marks[-1][0]
    out = {"clips": n, "elapsed_s": round(t_end - t0, 3), "clips_per_s": round(n / (t_end - t0), 2),
           "first_batch_s": round(marks[0][0] - t0, 3)}
    if len(marks) > 1 and t_end > marks[0][0]:
        out["after_first_batch_clips_per_s"] = round((n - marks[0][1]) / (t_end - marks[0][0]), 2)
    return out


def run_bare(ctx: dict) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from af3dist.data.audio import load_waveform
    from af3dist.data.features import Featurizer

    torch.set_num_threads(1)
    files = sorted(glob.glob(os.path.join(ctx["source"], "data", "train-*.parquet")))
    clips = []
    for f in files:
        t = pq.read_table(f, columns=["audio", "caption"])
        clips += [(a["bytes"], c) for a, c in zip(t["audio"].to_pylist(), t["caption"].to_pylist())]
    clips = clips[: ctx["bare_clips"]]
    featurizer = Featurizer.from_pretrained(ctx["model"], PROMPT)
    fe = featurizer.processor.feature_extractor
    quality = ctx["resample_quality"]

    def mel(w):
        return fe([w], sampling_rate=16000, return_attention_mask=True, return_tensors="np")

    for data, caption in clips[:4]:  # warm-up
        featurizer.training_example(load_waveform(data, quality=quality), caption)
    t_dec = t_mel = t_full = 0.0
    for data, caption in clips:
        a = time.perf_counter()
        w = load_waveform(data, quality=quality)
        b = time.perf_counter()
        feats = mel(w)
        c = time.perf_counter()
        featurizer.training_example(w, caption)
        d = time.perf_counter()
        t_dec, t_mel, t_full = t_dec + (b - a), t_mel + (c - b), t_full + (d - c)
        assert feats["input_features"].shape[1:] == (128, 3000)
    n = len(clips)
    return {"clips": n, "torch_threads": torch.get_num_threads(),
            "decode_resample_ms": round(t_dec / n * 1e3, 2), "log_mel_ms": round(t_mel / n * 1e3, 2),
            "training_example_ms": round(t_full / n * 1e3, 2),
            "clips_per_s": round(n / (t_dec + t_mel), 2),
            "full_featurize_clips_per_s": round(n / (t_dec + t_full), 2)}


def run_seed(ctx: dict) -> dict:
    import io

    import soundfile as sf
    import soxr
    import torch
    from datasets import Audio, load_dataset
    from torch.utils.data import DataLoader
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ctx["model"])
    quality = ctx["resample_quality"]

    def decode_soundfile(example):
        # What Audio(sampling_rate=16000) would give: a mono 16 kHz float32 array.
        samples, sr = sf.read(io.BytesIO(example["audio"]["bytes"]), dtype="float32", always_2d=True)
        mono = samples.mean(axis=1, dtype="float32")
        if sr != 16000:
            mono = soxr.resample(mono, sr, 16000, quality=quality)
        return {"audio": {"array": mono, "sampling_rate": 16000}}

    def as_array(audio):
        if isinstance(audio, dict):  # our fallback, or datasets < 4
            return audio["array"]
        samples = audio.get_all_samples()  # datasets >= 4: a torchcodec AudioDecoder
        return samples.data.mean(dim=0).numpy()

    def collator(examples):
        conversations = [[
            {"role": "user", "content": [{"type": "audio", "audio": as_array(ex["audio"])},
                                         {"type": "text", "text": PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": ex["caption"]}]},
        ] for ex in examples]
        return processor.apply_chat_template(conversations, tokenize=True, return_dict=True, output_labels=True)

    decoder = {"name": None}

    def stream(split: str):
        pattern = os.path.join(ctx["source"], "data", f"{split}-*.parquet")
        ds = load_dataset("parquet", data_files={split: pattern}, split=split, streaming=True)
        if decoder["name"] is None:  # probe once, outside the timed pass
            try:
                next(iter(ds.cast_column("audio", Audio(sampling_rate=16000))))
                decoder["name"] = "datasets Audio(sampling_rate=16000) (torchcodec)"
            except Exception as e:  # noqa: BLE001 - report whatever stops it
                msg = f"{type(e).__name__}: {e}".splitlines()[0][:160]
                decoder["name"] = f"soundfile + soxr {quality} in datasets .map (torchcodec unavailable: {msg})"
                decoder["fallback"] = True
        if decoder.get("fallback"):
            return ds.cast_column("audio", Audio(decode=False)).map(decode_soundfile)
        return ds.cast_column("audio", Audio(sampling_rate=16000))

    def one_pass(split: str, total: int) -> dict:
        loader = DataLoader(stream(split), batch_size=ctx["batch_size"], collate_fn=collator, num_workers=0)
        t0 = time.perf_counter()
        marks, n, shapes = [], 0, None
        for batch in loader:
            n += batch["input_ids"].shape[0]
            marks.append((time.perf_counter(), n))
            shapes = shapes or {k: list(v.shape) for k, v in batch.items()}
            if len(marks) % 10 == 0:
                _progress("seed", n, total, t0)
        return {**_rates(marks, t0), "batch_shapes": shapes}

    one_pass("warmup", ctx["warmup_clips"])
    out = one_pass("train", ctx["clips"])
    return {**out, "decoder": decoder["name"], "torch_threads": torch.get_num_threads()}


def run_ray(ctx: dict, num_cpus: int) -> dict:
    import ray

    from af3dist.cluster import init_ray
    from af3dist.config import load_config
    from af3dist.data.batching import collate, iter_bucketed
    from af3dist.data.errors import ErrorLedger
    from af3dist.data.features import load_processor
    from af3dist.data.pipeline import build_dataset

    cfg = load_config("tiny", [f"model.name_or_path={ctx['model']}", "model.build_tiny=null",
                               f"data.source={ctx['source']}", "data.synthetic=null",
                               f"ray.num_cpus={num_cpus}", *ctx["overrides"]])
    os.environ.pop("RAY_ADDRESS", None)
    t_init = time.perf_counter()
    init_ray(cfg.ray)  # the library's own path: a local instance with cfg.ray.num_cpus
    ray.data.DataContext.get_current().enable_progress_bars = False
    init_s = time.perf_counter() - t_init
    pad_id = load_processor(cfg.model.name_or_path).tokenizer.pad_token_id
    ledger = ErrorLedger.remote(cfg.data.error_rate_ceiling, cfg.data.min_rows_before_ceiling)
    tag = f"ray_{num_cpus}"

    def one_pass(split: str, total: int) -> dict:
        ds = build_dataset(cfg.data, cfg.model.name_or_path, split, ledger=ledger)
        t0 = time.perf_counter()
        marks, n, shapes = [], 0, None
        for rows in iter_bucketed(ds, ctx["batch_size"], cfg.data.bucket_pool_batches, cfg.data.seed):
            batch = collate(rows, pad_id)
            n += len(rows)
            marks.append((time.perf_counter(), n))
            shapes = shapes or {k: list(v.shape) for k, v in batch.items()}
            if len(marks) % 10 == 0:
                _progress(tag, n, total, t0)
        return {**_rates(marks, t0), "batch_shapes": shapes}

    one_pass("warmup", ctx["warmup_clips"])
    out = one_pass(cfg.data.train_split, ctx["clips"])
    counts = ray.get(ledger.get_summary.remote())
    data_cfg = cfg.data.model_dump(include={"decode_batch_size", "cpus_per_data_task", "max_data_tasks",
                                            "bucket_pool_batches", "resample_quality", "shuffle"})
    ray.shutdown()
    return {**out, "ray_num_cpus": num_cpus, "ray_init_s": round(init_s, 2), "data_config": data_cfg,
            "rows_dropped": counts["rows_dropped"]}


def child_main(mode: str, ctx: dict) -> None:
    if mode == "bare":
        result = run_bare(ctx)
    elif mode == "seed":
        result = run_seed(ctx)
    elif mode == "ray_1":
        result = run_ray(ctx, 1)
    elif mode == "ray_n":
        result = run_ray(ctx, ctx["n_workers"])
    else:
        raise SystemExit(f"unknown mode {mode}")
    print("RESULT " + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------- orchestration

def run_child(mode: str, ctx: dict, timeout: float) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", RAY_DEDUP_LOGS="0", PYTHONWARNINGS="ignore",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", mode, "--_ctx", json.dumps(ctx)]
    print(f"== {mode}", flush=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    result, tail = None, []
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip("\n")
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
        elif line.startswith("  [") or ctx.get("verbose"):
            print(line, flush=True)
        else:
            tail = (tail + [line])[-30:]
        if time.perf_counter() - t0 > timeout:
            proc.kill()
            break
    proc.wait()
    if result is None:
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"{mode} failed (exit code {proc.returncode})")
    result["process_s"] = round(time.perf_counter() - t0, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=400, help="clips in the timed train split")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--sample-rate", type=int, default=48000)
    p.add_argument("--channels", type=int, default=2, choices=(1, 2))
    p.add_argument("--format", default="flac", choices=("flac", "wav", "ogg", "mp3"))
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--warmup-clips", type=int, default=32)
    p.add_argument("--bare-clips", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="training batch size, the same for every way")
    p.add_argument("--n-workers", type=int, default=os.cpu_count(), help="num_cpus of the ray_n run")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the Ray runs (repeatable), e.g. data.decode_batch_size=4")
    p.add_argument("--modes", default="bare,seed,ray_1,ray_n")
    p.add_argument("--workdir", help="build inputs here and keep them (default: a temp dir, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="per-way limit in seconds")
    p.add_argument("--verbose", action="store_true", help="show the children's full output")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_ctx", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        child_main(args._child, json.loads(args._ctx))
        return

    t_start = time.perf_counter()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from af3dist.config import load_config

    keys = {o.split("=", 1)[0] for o in args.set}
    overrides = [o for o in DEFAULT_OVERRIDES if o.split("=", 1)[0] not in keys] + args.set
    resample_quality = load_config("tiny", overrides).data.resample_quality  # validates the overrides too

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="af3dist-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        print(f"building tiny AF3 + {args.clips} train / {args.warmup_clips} warm-up clips "
              f"({args.seconds:g} s, {args.sample_rate} Hz, {args.channels} ch, {args.format}, "
              f"{args.shards} shards) in {root}", flush=True)
        built = build_inputs(root, args)
        print(f"  built in {built['build_s']:.1f} s ({built['train_bytes'] / 2**20:.1f} MiB of train parquet)",
              flush=True)
        print(f"Ray config overrides: {' '.join(overrides)}; batch size {args.batch_size}", flush=True)
        ctx = {"model": built["model"], "source": built["source"], "clips": args.clips,
               "warmup_clips": args.warmup_clips, "bare_clips": min(args.bare_clips, args.clips),
               "batch_size": args.batch_size, "n_workers": args.n_workers, "overrides": overrides,
               "resample_quality": resample_quality, "verbose": args.verbose}
        results = {m: run_child(m, ctx, args.timeout) for m in args.modes.split(",")}
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    def rate(m, key="clips_per_s"):
        return results.get(m, {}).get(key)

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    print()
    print(f"{'way':<8} {'clips':>6} {'clips/s':>9} {'after 1st batch':>16} {'1st batch s':>12}  notes")
    for m, r in results.items():
        note = {"bare": f"decode+resample {r.get('decode_resample_ms')} ms + log-mel {r.get('log_mel_ms')} ms"
                        f" a clip; with the full training_example {r.get('full_featurize_clips_per_s')} clips/s",
                "seed": f"decoder: {r.get('decoder')}"}.get(m, f"Ray num_cpus={r.get('ray_num_cpus')}, "
                                                             f"{r.get('data_config')}")
        print(f"{m:<8} {r['clips']:>6} {r['clips_per_s']:>9} {str(r.get('after_first_batch_clips_per_s', '')):>16}"
              f" {str(r.get('first_batch_s', '')):>12}  {note}")
    summary = {
        "seed_clips_per_s": rate("seed"),
        "ray_1_clips_per_s": rate("ray_1"),
        "ray_n_clips_per_s": rate("ray_n"),
        "n_workers": args.n_workers,
        "vs_seed": ratio(rate("ray_n"), rate("seed")),
        "scaling": ratio(rate("ray_n"), rate("ray_1")),
        "bare_one_core_clips_per_s": rate("bare"),
        "ray_1_vs_bare": ratio(rate("ray_1"), rate("bare")),
        "bare_full_featurize_clips_per_s": rate("bare", "full_featurize_clips_per_s"),
        "seed_decoder": results.get("seed", {}).get("decoder"),
        "seed_after_first_batch_clips_per_s": rate("seed", "after_first_batch_clips_per_s"),
        "ray_1_after_first_batch_clips_per_s": rate("ray_1", "after_first_batch_clips_per_s"),
        "ray_n_after_first_batch_clips_per_s": rate("ray_n", "after_first_batch_clips_per_s"),
        "clips": args.clips, "seconds": args.seconds, "sample_rate": args.sample_rate,
        "channels": args.channels, "format": args.format, "shards": args.shards,
        "batch_size": args.batch_size, "config_overrides": overrides, "cpu_count": os.cpu_count(),
        "rows_dropped": {m: r.get("rows_dropped") for m, r in results.items() if "rows_dropped" in r},
        "total_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
