#!/usr/bin/env python
"""The real fine-tuning job on one GPU: `ray_jobs.finetune` itself (Ray Train V2 worker, NCCL, bf16, DeepSpeed
ZeRO-2, checkpoints, resume), not our components called directly as `gpu_full_size.py` does.

    python benchmarks/gpu_real_job.py                       # on a GPU machine: full-size random AF3
    python benchmarks/gpu_real_job.py --size small --steps 4  # CPU smoke run of the same path (gloo, fp32)

1. Builds a random-weight AF3 with the real dimensions (the real classes; the embedded stand-in's tokenizer
   and processor, so no download) in bf16, and synthetic AudioCaps in the hub layout.
2. Runs `python -m ray_jobs.finetune --config af3 ...` with one GPU worker for `--steps` steps, checkpointing
   halfway and at the end; then reruns it with `--more` extra steps, which must resume from the last
   checkpoint (training longer is the same run).
3. Reads the job's own metrics.jsonl: samples/s and tokens/s of the steady steps, the gradient-checkpointing
   choice from the log, and an MFU lower bound from tokens/s (4 x the language model's linear parameters a
   token: forward + input gradients of the frozen base; attention and the frozen encoder are not counted).

Everything is under `--timeout` seconds. The last line is one JSON object (also written to $OUT when set).
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import emit  # noqa: E402

PEAK_BF16_TFLOPS = 989.0  # H100/H200 dense bf16 datasheet
FULL = dict(audio_hidden_size=1280, audio_layers=32, audio_heads=20, audio_intermediate_size=5120,
            text_hidden_size=3584, text_layers=28, text_heads=28, text_kv_heads=4, text_intermediate_size=18944)


def build(workdir: Path, size: str, clips: int) -> tuple[Path, Path, float]:
    import torch

    from af3dist.embedded.assets import tokenizer_corpus
    from af3dist.config import DEFAULT_PROMPT, TinyModelConfig
    from af3dist.embedded.audiocaps import make_synthetic_audiocaps
    from af3dist.embedded.tiny_model import build_tiny_model

    start = time.perf_counter()
    sizes = FULL if size == "full" else {}
    model = build_tiny_model(workdir / "model", TinyModelConfig(**sizes), tokenizer_corpus(DEFAULT_PROMPT),
                             dtype=torch.bfloat16 if size == "full" else torch.float32)
    data = workdir / "audiocaps"
    make_synthetic_audiocaps(data, train_clips=clips, validation_clips=8, test_clips=8, shards=2, long_clips=0)
    return model, data, time.perf_counter() - start


def run_job(model: Path, data: Path, out: Path, steps: int, on_gpu: bool, timeout: float) -> tuple[int, str, float]:
    overrides = [f"model.name_or_path={model}", "model.build_tiny=null", f"data.source={data}",
                 "data.synthetic=null", "train.num_workers=1", f"train.use_gpu={str(on_gpu).lower()}",
                 f"train.max_steps={steps}", f"train.checkpoint_every={max(steps // 2, 1)}",
                 f"train.eval_every={steps}", "train.eval_caption_clips=0", "train.log_every=1",
                 "train.warmup_steps=1", "train.cpus_per_worker=1",
                 f"train.precision={'bf16' if on_gpu else 'fp32'}"]
    cmd = [sys.executable, "-m", "ray_jobs.finetune", "--config", "af3", "--output-dir", str(out), *overrides]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          cwd=Path(__file__).resolve().parents[1])
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start


def lm_linear_params(model: Path) -> int:
    cfg = json.loads((model / "config.json").read_text())["text_config"]
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (h // cfg["num_attention_heads"])
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * cfg["vocab_size"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=("full", "small"), default="full")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--more", type=int, default=4, help="steps the resumed rerun adds")
    p.add_argument("--clips", type=int, default=256)
    p.add_argument("--workdir")
    p.add_argument("--timeout", type=float, default=540)
    args = p.parse_args()
    import torch

    deadline = time.monotonic() + args.timeout
    on_gpu = torch.cuda.is_available()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="af3dist-gpu-job-"))
    result: dict = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "size": args.size,
                    "torch": torch.__version__}
    model, data, result["build_s"] = build(workdir, args.size, args.clips)
    out = workdir / "out"
    for phase, steps in (("first", args.steps), ("resumed", args.steps + args.more)):
        rc, log, seconds = run_job(model, data, out, steps, on_gpu, max(deadline - time.monotonic(), 30))
        result[f"{phase}_rc"], result[f"{phase}_s"] = rc, round(seconds, 1)
        choice = re.search(r"gradient checkpointing (on|off) \((.*)\)\s*$", log, re.M)
        if choice:
            result["gradient_checkpointing"] = f"{choice.group(1)}: {choice.group(2)}"
        resumed = re.search(r"resumed from step (\d+)", log)
        result[f"{phase}_resumed_from"] = int(resumed.group(1)) if resumed else None
        if rc != 0:
            result[f"{phase}_log_tail"] = log[-2000:]
            break
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    train = [r for r in records if r.get("kind") == "train" and "tokens_per_s" in r]
    if train:
        last = train[-1]
        result.update(steps_done=last["step"], samples_per_s=round(last["samples_per_s"], 2),
                      tokens_per_s=round(last["tokens_per_s"], 1),
                      data_wait_fraction=round(last["data_wait_fraction"], 3))
        flops = 4 * lm_linear_params(model) * last["tokens_per_s"]
        result["mfu_lower_bound"] = round(flops / 1e12 / PEAK_BF16_TFLOPS, 4) if on_gpu else None
    checkpoints = sorted(p.name for p in (out / "ray_results").rglob("checkpoint_*") if p.is_dir())
    result["checkpoints"] = checkpoints
    emit("gpu_real_job", result)


if __name__ == "__main__":
    main()
