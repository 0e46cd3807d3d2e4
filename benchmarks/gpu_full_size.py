#!/usr/bin/env python
"""Full-size AF3 on one GPU with random weights (no download needed): the GPU check of the fine-tuning
issue, plus two figures for serving and batch captioning.

1. `train`: LoRA fine-tuning steps through our own pieces (`add_lora`, `enable_gradient_checkpointing`,
   `deepspeed_config` from the af3 preset with ZeRO-2, `collate`) in bf16 on batches shaped like 10 s
   AudioCaps clips: samples/s, tokens/s, peak GPU memory and model FLOPs utilisation (MFU). Two variants
   side by side (`--variants`): `ours` (the label-only loss of `training.loss` and gradient checkpointing as
   `training.memory` chooses it for `auto`; keys `mb<N>_*`) and `old` (transformers' full-logits loss with
   checkpointing on, as before; keys `old_mb<N>_*`).
2. `encoder`: the padding-free audio encoder (`SoundOnlyEncoder`) against the stock forward at full size in
   bf16: agreement on every clip's valid positions, and time for a batch of 10 s clips.
3. `generate`: greedy decoding throughput (HF `generate`, as the Captioner calls it) at batch 1, 8 and 32:
   what request batching buys when the 7B model, not the CPU around it, is the cost.

    python benchmarks/gpu_full_size.py            # on a GPU machine
    python benchmarks/gpu_full_size.py --size small --steps 2 --warmup 1   # CPU smoke run of the same code

MFU counts model FLOPs only (no recompute from checkpointing): the language model's linear layers 4·N·T
(forward + input gradients; its base weights are frozen, LoRA adds 6·N_lora·T) plus attention
12·T²·d·layers per sequence; the frozen encoder and projector forward only (2·N·T + 4·T²·d·layers). Peak is
the H100/H200 dense bf16 datasheet figure, 989 TFLOP/s; the script also measures a large bf16 matmul.
The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import emit  # noqa: E402

from af3dist.config import load_config  # noqa: E402
from af3dist.data.batching import collate, collate_prompts  # noqa: E402
from af3dist.data.features import IGNORE_INDEX  # noqa: E402
from af3dist.inference import unwrap  # noqa: E402
from af3dist.model.encoder import SoundOnlyEncoder, skip_audio_padding  # noqa: E402
from af3dist.model.loading import add_lora, avoid_cudnn_attention  # noqa: E402
from af3dist.model.loading import enable_gradient_checkpointing  # noqa: E402
from af3dist.training.deepspeed_config import lora_engine  # noqa: E402
from af3dist.training.loss import label_loss_sum  # noqa: E402
from af3dist.training.memory import choose_gradient_checkpointing  # noqa: E402

PEAK_BF16_TFLOPS = 989.0
SOUND_ID, IM_START, IM_END, PAD_ID = 151669, 151644, 151645, 151643
FRAMES_PER_SECOND, WINDOW_FRAMES = 100, 3000
SYSTEM_AND_USER_TOKENS, PROMPT_TOKENS, ASSISTANT_TOKENS = 14, 5, 5  # the AF3 chat template around <sound>


def af3_config(size: str):
    """nvidia/audio-flamingo-3-hf's architecture (NOTES.md), or a small one of the same shape for CPU."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3EncoderConfig, Qwen2Config

    if size == "full":
        audio = dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20, intermediate_size=5120)
        text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                    num_key_value_heads=4)
    else:
        audio = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
        text = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2)
    return AudioFlamingo3Config(
        audio_config=AudioFlamingo3EncoderConfig(num_mel_bins=128, max_source_positions=1500, **audio),
        text_config=Qwen2Config(vocab_size=151672, max_position_embeddings=32768, rope_theta=1_000_000.0,
                                bos_token_id=PAD_ID, eos_token_id=IM_END, pad_token_id=PAD_ID,
                                tie_word_embeddings=False, **text),
        audio_token_id=SOUND_ID)


def sound_tokens(frames: int) -> int:
    return ((frames - 1) // 2 + 1 - 2) // 2 + 1


def clip_row(rng: np.random.Generator, seconds: float, caption_tokens: int) -> dict[str, np.ndarray]:
    """One featurized row in the data plane's layout: a 30 s log-mel window, its mask, the chat-template
    token layout with one <sound> per audio position, labels on the caption and its <|im_end|> only."""
    frames = int(seconds * FRAMES_PER_SECOND)
    features = np.full((1, 128, WINDOW_FRAMES), -0.8, dtype=np.float32)
    features[0, :, :frames] = rng.uniform(-1.0, 1.0, (128, frames))
    mask = np.zeros((1, WINDOW_FRAMES), dtype=np.int32)
    mask[0, :frames] = 1
    text = lambda n: rng.integers(0, 151000, n).tolist()  # noqa: E731
    prompt = ([IM_START] + text(SYSTEM_AND_USER_TOKENS) + [SOUND_ID] * sound_tokens(frames) + text(PROMPT_TOKENS)
              + [IM_END] + [IM_START] + text(ASSISTANT_TOKENS - 2))
    answer = text(caption_tokens) + [IM_END]
    ids = np.array(prompt + answer, dtype=np.int64)
    labels = np.array([IGNORE_INDEX] * len(prompt) + answer, dtype=np.int64)
    return {"input_ids": ids, "labels": labels, "input_features": features, "input_features_mask": mask,
            "num_windows": np.int64(1), "num_tokens": np.int64(len(ids))}


def linear_params(module: torch.nn.Module, skip_lora: bool = True) -> int:
    return sum(m.weight.numel() for n, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and not (skip_lora and "lora_" in n))


def model_flops(model, batch: dict[str, torch.Tensor], cfg) -> float:
    """Model FLOPs of one training micro step (see the module docstring for what is counted)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm, enc, proj = base.model.language_model, base.model.audio_tower, base.model.multi_modal_projector
    t, a = cfg.text_config, cfg.audio_config
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    lm_linear = linear_params(lm) + base.lm_head.weight.numel()
    tokens = batch["attention_mask"].sum(1).double()
    lm_flops = float((4 * lm_linear + 6 * lora) * tokens.sum()
                     + 12 * t.hidden_size * t.num_hidden_layers * (tokens ** 2).sum())
    frames = batch["input_features_mask"].sum(-1).double()
    enc_positions = (frames - 1) // 2 + 1
    enc_flops = float(2 * linear_params(enc) * enc_positions.sum()
                      + 4 * a.hidden_size * a.num_hidden_layers * (enc_positions ** 2).sum()
                      + 2 * 3 * 128 * a.hidden_size * enc_positions.sum() * 2      # conv1 (k=3, stride 1)
                      + 2 * 3 * a.hidden_size ** 2 * enc_positions.sum())          # conv2 (k=3, stride 2)
    audio_tokens = float((batch["input_ids"] == SOUND_ID).sum())
    return lm_flops + enc_flops + 2 * linear_params(proj) * audio_tokens


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - start) / 1e12


def random_af3(config, device: torch.device, dtype: torch.dtype):
    """AF3 with random weights, created on `device`, with the padding-free encoder as load_model gives it."""
    from transformers import AudioFlamingo3ForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        return skip_audio_padding(AudioFlamingo3ForConditionalGeneration._from_config(config, dtype=dtype))


def build_engine(args, device: torch.device, dtype: torch.dtype):
    cfg = load_config("af3", ["train.zero_stage=2", f"train.micro_batch_size={args.micro_batch}",
                              f"train.grad_accum_steps={args.grad_accum}", "train.max_steps=1000",
                              "train.warmup_steps=2", "train.gradient_checkpointing=true"])
    config = af3_config(args.size)
    start = time.perf_counter()
    model = random_af3(config, device, dtype)
    built_s = time.perf_counter() - start
    engine, _ = lora_engine(model, cfg.lora, cfg.train, 1, dtype, bool(cfg.train.gradient_checkpointing))
    return engine, config, cfg, built_s


def micro_loss(engine, batch: dict, label_only: bool) -> torch.Tensor:
    """A micro batch's token-mean loss: the label-only loss of training.loss, or transformers' full one."""
    if label_only:
        loss_sum, n = label_loss_sum(engine, batch)
        return loss_sum / max(n, 1)
    return engine(**batch).loss


def set_checkpointing(engine, on: bool) -> None:
    model = engine.module
    if on:
        enable_gradient_checkpointing(model)
    else:
        model.get_base_model().activation_checkpointing_disable()


def train_figures(engine, config, device, dtype, args, rng) -> dict:
    """Warm up, then time micro steps per micro-batch size and variant; every engine.step() is a real
    optimizer step at each grad_accum boundary."""
    figures: dict = {}
    for micro_batch in args.micro_batches:
        def batch():
            rows = [clip_row(rng, args.clip_seconds, int(rng.integers(8, 20))) for _ in range(micro_batch)]
            b = collate(rows, PAD_ID)
            return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in b.items()}

        batches = [batch() for _ in range(args.steps)]
        tokens_per_batch = max(int(b["attention_mask"].shape[1]) * micro_batch for b in batches)
        for variant in args.variants:
            label_only = variant == "ours"
            if label_only:
                checkpointing, why = choose_gradient_checkpointing("auto", config.text_config, tokens_per_batch,
                                                                   device)
            else:
                checkpointing, why = True, "old: always on"
            set_checkpointing(engine, checkpointing)
            key = f"mb{micro_batch}" if label_only else f"old_mb{micro_batch}"
            figures[f"{key}_gradient_checkpointing"] = checkpointing
            print(f"[train] {key}: label-only loss {label_only}, checkpointing {checkpointing} ({why})", flush=True)
            try:
                figures.update(time_micro_steps(engine, batches, config, device, args, key, label_only))
            except torch.cuda.OutOfMemoryError as err:
                figures[f"{key}_error"] = f"OutOfMemoryError: {str(err)[:200]}"
                torch.cuda.empty_cache()
    set_checkpointing(engine, True)
    return figures


def time_micro_steps(engine, batches, config, device, args, key: str, label_only: bool) -> dict:
    figures: dict = {}
    micro_batch = len(batches[0]["input_ids"])
    for b in batches[: args.warmup]:
        engine.backward(micro_loss(engine, b, label_only))
        engine.step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    losses, start = [], time.perf_counter()
    for b in batches[args.warmup:]:
        loss = micro_loss(engine, b, label_only)
        engine.backward(loss)
        engine.step()
        losses.append(loss.detach())
    sync(device)
    elapsed = time.perf_counter() - start
    timed = batches[args.warmup:]
    figures.update(phase_split(engine, timed[:3], device, key, label_only))
    if args.profile and micro_batch == args.micro_batches[-1] and label_only:
        profile_steps(engine, timed[:2], label_only)
    samples = micro_batch * len(timed)
    tokens = sum(int(b["attention_mask"].sum()) for b in timed)
    flops = sum(model_flops(engine.module, b, config) for b in timed)
    figures[f"{key}_samples_per_s"] = round(samples / elapsed, 2)
    figures[f"{key}_tokens_per_s"] = round(tokens / elapsed, 1)
    figures[f"{key}_step_s"] = round(elapsed / len(timed), 4)
    figures[f"{key}_model_tflops"] = round(flops / elapsed / 1e12, 1)
    figures[f"{key}_mfu"] = round(flops / elapsed / 1e12 / PEAK_BF16_TFLOPS, 4)
    figures[f"{key}_loss_first_last"] = [round(float(losses[0]), 3), round(float(losses[-1]), 3)]
    if device.type == "cuda":
        figures[f"{key}_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    print(f"[train] {key}: " + ", ".join(f"{k[len(key) + 1:]}={v}" for k, v in figures.items()
                                         if k.startswith(key + "_")), flush=True)
    return figures


def phase_split(engine, batches, device, key: str, label_only: bool) -> dict:
    """Forward / backward / optimizer-step seconds of a micro step, synchronised between phases."""
    totals = np.zeros(3)
    for b in batches:
        marks = [time.perf_counter()]
        loss = micro_loss(engine, b, label_only)
        sync(device)
        marks.append(time.perf_counter())
        engine.backward(loss)
        sync(device)
        marks.append(time.perf_counter())
        engine.step()
        sync(device)
        marks.append(time.perf_counter())
        totals += np.diff(marks)
    fwd, bwd, step = (totals / len(batches)).round(4).tolist()
    return {f"{key}_forward_s": fwd, f"{key}_backward_s": bwd, f"{key}_engine_step_s": step}


def profile_steps(engine, batches, label_only: bool) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for b in batches:
            engine.backward(micro_loss(engine, b, label_only))
            engine.step()
        torch.cuda.synchronize()
    table = prof.key_averages()
    for sort in ("self_cuda_time_total", "cpu_time_total"):
        text = table.table(sort_by=sort, row_limit=14, max_name_column_width=60)
        print(text, flush=True)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], f"profile_{sort}.txt").write_text(text)


@torch.no_grad()
def encoder_figures(model, device, dtype, rng) -> dict:
    """Padding-free encoder vs the stock forward at full size: same valid outputs, and the time saved."""
    from transformers.models.audioflamingo3.modeling_audioflamingo3 import AudioFlamingo3Encoder

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    encoder = base.model.audio_tower
    assert isinstance(encoder, SoundOnlyEncoder)
    encoder.eval()
    seconds = [3.0, 10.0, 24.5, 30.0]
    rows = [clip_row(rng, s, 10) for s in seconds]
    feats = torch.from_numpy(np.concatenate([r["input_features"] for r in rows])).to(device, dtype)
    mask = torch.from_numpy(np.concatenate([r["input_features_mask"] for r in rows])).to(device)
    ours = encoder(feats, mask).last_hidden_state.float()
    stock = AudioFlamingo3Encoder.forward(encoder, feats, mask).last_hidden_state.float()
    worst = 0.0
    for i, s in enumerate(seconds):
        n = sound_tokens(int(s * FRAMES_PER_SECOND))
        a, b = ours[i, :n], stock[i, :n]
        worst = max(worst, float((a - b).norm() / b.norm()))

    ten = [clip_row(rng, 10.0, 10) for _ in range(32)]
    feats = torch.from_numpy(np.concatenate([r["input_features"] for r in ten])).to(device, dtype)
    mask = torch.from_numpy(np.concatenate([r["input_features_mask"] for r in ten])).to(device)

    def timed(fn) -> float:
        fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(3):
            fn()
        sync(device)
        return (time.perf_counter() - start) / 3

    ours_s = timed(lambda: encoder(feats, mask))
    stock_s = timed(lambda: AudioFlamingo3Encoder.forward(encoder, feats, mask))
    figures = {"encoder_valid_rel_err_max": round(worst, 5), "encoder_b32_10s_stock_ms": round(stock_s * 1e3, 1),
               "encoder_b32_10s_ours_ms": round(ours_s * 1e3, 1), "encoder_speedup": round(stock_s / ours_s, 2)}
    print(f"[encoder] {figures}", flush=True)
    return figures


@torch.no_grad()
def generate_figures(model, device, dtype, rng, args) -> dict:
    model.eval()
    if args.merge:  # what `af3dist merge` serves: LoRA folded into the base weights
        model = model.merge_and_unload()
    figures: dict = {"gen_merged": args.merge}
    for batch_size in args.gen_batches:
        rows = [clip_row(rng, args.clip_seconds, 0) for _ in range(batch_size)]
        for r in rows:  # prompts only: the generation prompt, no caption
            r["labels"] = np.full(len(r["input_ids"]), IGNORE_INDEX)
            r["input_ids"] = r["input_ids"][:-1]
        b = collate_prompts(rows, PAD_ID)
        b = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in b.items()}
        # A random-weight model may emit <|im_end|> at once: force every row to the full length
        # (min_new_tokens) so that each batch size decodes the same number of steps.
        run = lambda n: unwrap(model).generate(  # noqa: E731
            **b, max_new_tokens=n, min_new_tokens=n, do_sample=False, num_beams=1, eos_token_id=IM_END,
            pad_token_id=PAD_ID, use_cache=True)
        run(4)  # warm-up
        sync(device)
        start = time.perf_counter()
        out = run(args.gen_tokens)
        sync(device)
        elapsed = time.perf_counter() - start
        new_tokens = (out.shape[1] - b["input_ids"].shape[1]) * batch_size
        figures[f"gen_b{batch_size}_clips_per_s"] = round(batch_size / elapsed, 2)
        figures[f"gen_b{batch_size}_new_tokens_per_s"] = round(new_tokens / elapsed, 1)
        print(f"[generate] batch {batch_size}: {elapsed:.2f} s for {new_tokens} new tokens", flush=True)
    first, last = args.gen_batches[0], args.gen_batches[-1]
    figures[f"gen_b{last}_vs_b{first}"] = round(
        figures[f"gen_b{last}_clips_per_s"] / figures[f"gen_b{first}_clips_per_s"], 2)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["full", "small"], default="full")
    parser.add_argument("--micro-batches", type=lambda s: [int(x) for x in s.split(",")], default=[4, 16, 32])
    parser.add_argument("--grad-accum", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="micro steps per micro-batch size, warm-up included")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--clip-seconds", type=float, default=10.0)
    parser.add_argument("--gen-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of two micro steps")
    parser.add_argument("--cudnn-attention", action="store_true",
                        help="keep cuDNN among the SDPA backends (torch's default; load_model takes it out)")
    parser.add_argument("--merge", action="store_true", help="generate with the LoRA merged into the base")
    parser.add_argument("--phases", type=lambda s: s.split(","), default=["train", "encoder", "generate"])
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["ours", "old"],
                        help="ours: label-only loss + checkpointing by memory; old: full logits + checkpointing")
    args = parser.parse_args()
    args.micro_batch = args.micro_batches[0]

    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda:0" if on_gpu else "cpu")
    dtype = torch.bfloat16 if on_gpu else torch.float32
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": "29533"}.items():
        os.environ.setdefault(key, value)
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")

    result: dict = {"device": torch.cuda.get_device_name(0) if on_gpu else "cpu", "size": args.size,
                    "dtype": str(dtype).removeprefix("torch."), "clip_seconds": args.clip_seconds,
                    "torch": torch.__version__}
    if not args.cudnn_attention:
        avoid_cudnn_attention()  # as load_model does: this script builds its model from a config instead
    result["cudnn_attention"] = bool(on_gpu and torch.backends.cuda.cudnn_sdp_enabled())
    result["matmul_bf16_tflops"] = matmul_tflops(device)
    rng = np.random.default_rng(0)
    try:
        engine, config, cfg, built_s = build_engine(args, device, dtype)
    except Exception as err:  # keep going: the encoder and generation figures need no DeepSpeed
        traceback.print_exc()
        result["train_error"] = f"{type(err).__name__}: {err}"
        engine, config, cfg, built_s = None, af3_config(args.size), load_config("af3"), 0.0
    model = engine.module if engine is not None else add_lora(random_af3(config, device, dtype), cfg.lora)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result.update(params_b=round(total / 1e9, 3), trainable_m=round(trainable / 1e6, 2), build_s=round(built_s, 1),
                  zero_stage=cfg.train.zero_stage, lora_r=cfg.lora.r, label_only_loss="ours" in args.variants,
                  gradient_checkpointing="auto (per micro batch: mb<N>_gradient_checkpointing)")
    print(f"[setup] {result}", flush=True)
    phases = [("train", lambda: train_figures(engine, config, device, dtype, args, rng) if engine else {}),
              ("encoder", lambda: encoder_figures(model, device, dtype, rng)),
              ("generate", lambda: generate_figures(model, device, dtype, rng, args))]
    for name, phase in phases:
        if name not in args.phases:
            continue
        try:
            result.update(phase())
        except Exception as err:
            traceback.print_exc()
            result[f"{name}_error"] = f"{type(err).__name__}: {err}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    emit("gpu_full_size", result)


if __name__ == "__main__":
    main()
