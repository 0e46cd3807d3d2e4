#!/usr/bin/env python
"""Training throughput: this trainer (Ray Train + DeepSpeed ZeRO-2 + Ray Data) against the upstream recipe
(HF `Trainer` + peft, the guide's LoRA settings, decoding and `apply_chat_template` in a collator inside the
training process) on the same tiny AF3, the same synthetic AudioCaps, global batch and number of steps.

    .venv/bin/python benchmarks/train_throughput.py [--steps 40] [--workdir DIR]

Both sides are timed over their steady state: the first `--skip` optimizer steps (start-up, JIT, pipeline
fill) are excluded on both. The last line is one JSON object with `seed_samples_per_s`,
`ours_samples_per_s`, `vs_seed` and `data_wait_fraction` (the share of our step time spent waiting for data).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import emit, machine_note  # noqa: E402

GLOBAL_BATCH = 16
from af3dist.config import DEFAULT_PROMPT as PROMPT  # noqa: E402

SEED = r'''
import io, json, sys, time, glob
import numpy as np, soundfile as sf, soxr, torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor, Trainer, TrainingArguments, TrainerCallback
model_dir, data_dir, steps, skip, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
processor = AutoProcessor.from_pretrained(model_dir)
model = AudioFlamingo3ForConditionalGeneration.from_pretrained(model_dir)
# the guide's LoRA: these names also match the encoder's q/k/v (as upstream)
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
ds = load_dataset("parquet", data_files=sorted(glob.glob(data_dir + "/data/train-*.parquet")), split="train", streaming=True)
ds = ds.repeat(100) if hasattr(ds, "repeat") else ds
from datasets import Audio
ds = ds.cast_column("audio", Audio(decode=False))  # bytes as stored; decoded in the collator (below)

def collate(rows):
    # torchcodec (datasets' Audio decoder) does not import beside this CPU torch: decode as the recipe
    # would after cast_column, in the training process, with soundfile + soxr.
    convs, audios = [], []
    for r in rows:
        x, sr = sf.read(io.BytesIO(r["audio"]["bytes"]), dtype="float32", always_2d=True)
        audios.append(soxr.resample(x.mean(1), sr, 16000))
        convs.append([{"role": "user", "content": [{"type": "text", "text": "%s"}, {"type": "audio", "audio": audios[-1]}]},
                      {"role": "assistant", "content": [{"type": "text", "text": r["caption"]}]}])
    texts = processor.apply_chat_template(convs, tokenize=False)
    return processor(text=texts, audio=audios, output_labels=True)

times = []
class Clock(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        times.append(time.perf_counter())

args = TrainingArguments(output_dir=out, per_device_train_batch_size=%d, gradient_accumulation_steps=1,
    max_steps=steps, learning_rate=1e-4, logging_steps=10**6, save_strategy="no", report_to=[],
    remove_unused_columns=False, dataloader_num_workers=0, use_cpu=True,
    # accelerate's batch dispatching slices every tensor to the batch size: it would cut the extra log-mel
    # window of a clip over 30 s (input_features has one row per window, not per clip)
    accelerator_config={"dispatch_batches": False})
Trainer(model=model, args=args, train_dataset=ds, data_collator=collate, callbacks=[Clock()]).train()
steady = (len(times) - 1 - skip) * %d / (times[-1] - times[skip])
print(json.dumps({"samples_per_s": steady}))
''' % (PROMPT, GLOBAL_BATCH, GLOBAL_BATCH)


def run_seed(model_dir: str, data_dir: str, steps: int, skip: int, work: Path) -> float:
    out = subprocess.run([sys.executable, "-c", SEED, model_dir, data_dir, str(steps), str(skip), str(work / "seed")],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])["samples_per_s"]


def run_ours(model_dir: str, data_dir: str, steps: int, skip: int, work: Path,
             overrides: list[str]) -> tuple[float, float]:
    from af3dist.config import load_config
    from af3dist.training.finetune import finetune

    shutil.rmtree(work / "ours", ignore_errors=True)  # a leftover run would be resumed, not measured
    cfg = load_config("tiny", [f"model.name_or_path={model_dir}", "model.build_tiny=null", f"data.source={data_dir}",
                               "data.synthetic=null", f"output_dir={work / 'ours'}", f"train.max_steps={steps}",
                               "train.num_workers=2", f"train.micro_batch_size={GLOBAL_BATCH // 2}",
                               f"train.eval_every={steps}", f"train.checkpoint_every={steps}", "train.log_every=1",
                               "train.eval_caption_clips=0", *overrides])
    finetune(cfg)
    records = [json.loads(l) for l in (work / "ours" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    # samples_per_s is cumulative from the loop's start: steady rate from the difference of two points
    a, b = train[skip - 1], train[-1]
    t_a = a["step"] * GLOBAL_BATCH / a["samples_per_s"]
    t_b = b["step"] * GLOBAL_BATCH / b["samples_per_s"]
    # the same steady window for the data wait: the pipeline's fill before the first batch is start-up
    wait = (b["data_wait_s"] - a["data_wait_s"]) / (b["data_wait_s"] + b["compute_s"] - a["data_wait_s"] - a["compute_s"])
    return (b["step"] - a["step"]) * GLOBAL_BATCH / (t_b - t_a), wait


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--skip", type=int, default=10)
    parser.add_argument("--workdir")
    parser.add_argument("--set", action="append", default=[], metavar="section.field=value",
                        help="config overrides for our run (default: the tiny preset as it is)")
    parser.add_argument("--skip-seed", action="store_true", help="measure only ours (no vs_seed)")
    args = parser.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="af3dist-train-bench-"))
    from af3dist.embedded.assets import tokenizer_corpus
    from af3dist.config import TinyModelConfig
    from af3dist.embedded.audiocaps import make_synthetic_audiocaps
    from af3dist.embedded.tiny_model import ensure_tiny_model

    model_dir = str(ensure_tiny_model(work / "tiny-af3", TinyModelConfig(), tokenizer_corpus(PROMPT)))
    data_dir = str(work / "audiocaps")
    if not (work / "audiocaps" / "data").is_dir():
        make_synthetic_audiocaps(data_dir, train_clips=256, validation_clips=8, test_clips=8)
    print(f"[bench] upstream recipe (HF Trainer + peft), {args.steps} steps of {GLOBAL_BATCH}", flush=True)
    seed = float("nan") if args.skip_seed else run_seed(model_dir, data_dir, args.steps, args.skip, work)
    print(f"[bench] seed: {seed:.2f} samples/s", flush=True)
    print(f"[bench] af3dist (Ray Train + DeepSpeed ZeRO-2, 2 workers x {GLOBAL_BATCH // 2})", flush=True)
    ours, wait = run_ours(model_dir, data_dir, args.steps, args.skip, work, args.set)
    print(f"[bench] ours: {ours:.2f} samples/s, data wait {wait:.0%}", flush=True)
    emit("train_throughput", {"seed_samples_per_s": round(seed, 3), "ours_samples_per_s": round(ours, 3),
                              "vs_seed": round(ours / seed, 3), "data_wait_fraction": round(wait, 3),
                              "global_batch": GLOBAL_BATCH, "steps": args.steps, "skipped_steps": args.skip,
                              "overrides": args.set, **machine_note()})


if __name__ == "__main__":
    main()
