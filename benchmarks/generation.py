#!/usr/bin/env python
"""New tokens per second: `model.generate` (what every caller ran before) against the shared generation engine
(af3dist.generation), greedy, at batch 1, 8 and 32, and whether both give the same tokens for every row.

Default: the tiny stand-in AF3 on CPU, built locally, on featurized synthetic clips of 1.5-10 s.
`--size full`: nvidia/audio-flamingo-3-hf's architecture with random weights in bf16 on the GPU, on rows
shaped like 10 s AudioCaps clips, as benchmarks/gpu_full_size.py builds them (it imports that module).
Each figure is the best of `--repeats` timed runs after a warm-up (the CPU may be shared). Both sides count
only real new tokens (no padding, nothing after <|im_end|>), so they count the same tokens when they agree.

    python benchmarks/generation.py [--max-tokens 32] [--batches 1 8 32] [--repeats 3]
    python benchmarks/generation.py --size full          # on a GPU machine

The last line is one JSON object: hf_b<N>_tok_s, engine_b<N>_tok_s, engine_vs_hf_b<N> and tokens_equal
("equal/total" rows). CPU targets (tiny): engine_vs_hf_b1 >= 2.5, engine_vs_hf_b32 >= 1.5.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from af3dist.config import DEFAULT_PROMPT  # noqa: E402
from harness import best_of, emit, machine_note  # noqa: E402
from af3dist.data.batching import collate_prompts  # noqa: E402
from af3dist.generation import GenerationEngine, GenRequest  # noqa: E402
from af3dist.inference import generate_tokens  # noqa: E402


def tiny_setup(n: int):
    """(model, tokenizer, n featurized rows) with the tiny AF3 on CPU."""
    from af3dist.embedded.assets import tokenizer_corpus
    from af3dist.config import TinyModelConfig
    from af3dist.data.features import Featurizer, load_processor
    from af3dist.embedded.captions import all_labels
    from af3dist.embedded.sounds import generate_clip
    from af3dist.model.loading import load_model
    from af3dist.embedded.tiny_model import build_tiny_model

    folder = Path(tempfile.mkdtemp(prefix="af3dist-genbench-")) / "tiny-af3"
    build_tiny_model(folder, TinyModelConfig(), tokenizer_corpus(DEFAULT_PROMPT))
    processor = load_processor(str(folder))
    featurizer = Featurizer(processor, DEFAULT_PROMPT)
    rng, labels = np.random.default_rng(0), all_labels()
    seconds = rng.uniform(1.5, 10, n)
    rows = [featurizer.generation_inputs(_mono(generate_clip(rng, labels[i % len(labels)], float(seconds[i]),
                                                             16000, 1)))
            for i in range(n)]
    return load_model(str(folder)).eval(), processor.tokenizer, rows, torch.device("cpu")


def _mono(clip: np.ndarray) -> np.ndarray:
    return clip.mean(axis=1).astype(np.float32) if clip.ndim == 2 else clip.astype(np.float32)


def full_setup(n: int):
    """(model, tokenizer stand-in, n rows) with the full-size architecture, random weights, bf16, on CUDA."""
    from gpu_full_size import IM_END, PAD_ID, af3_config, clip_row, random_af3

    class Tokens:  # the ids the engine needs; text is not decoded meaningfully with random weights
        pad_token_id = PAD_ID

        @staticmethod
        def convert_tokens_to_ids(token: str) -> int:
            assert token == "<|im_end|>"
            return IM_END

        @staticmethod
        def decode(ids, skip_special_tokens: bool = True) -> str:
            return " ".join(map(str, ids))

    device = torch.device("cuda")
    model = random_af3(af3_config("full"), device, torch.bfloat16).eval()
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(n):
        r = clip_row(rng, 10.0, 0)
        r.pop("labels")
        r["input_ids"] = r["input_ids"][:-1]  # the generation prompt, no answer
        rows.append(r)
    return model, Tokens(), rows, device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", choices=["tiny", "full"], default="tiny")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, rows, device = (tiny_setup if args.size == "tiny" else full_setup)(max(args.batches))
    model = model.to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    dtype = next(model.parameters()).dtype
    figures: dict = {"size": args.size, "max_tokens": args.max_tokens, "device": device.type}
    equal = total = 0
    for b in args.batches:
        batch = rows[:b]
        inputs = collate_prompts(batch, pad)
        inputs = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else None) for k, v in inputs.items()}
        engine = GenerationEngine(model, tok, max_batch_size=b, isolate_failures=False)
        hf = lambda: generate_tokens(model, inputs, args.max_tokens, eos, pad)  # noqa: E731
        ours = lambda: engine.generate([GenRequest(r, args.max_tokens) for r in batch])  # noqa: E731
        hf(), ours()  # warm-up (and the engine's KV cache)
        hf_s, hf_out = best_of(hf, args.repeats, sync)
        en_s, en_out = best_of(ours, args.repeats, sync)
        hf_tokens = sum(len(t) for t, _ in hf_out)
        en_tokens = sum(len(r.token_ids) for r in en_out)
        same = sum(r.token_ids == t for r, (t, _) in zip(en_out, hf_out))
        equal, total = equal + same, total + b
        figures[f"hf_b{b}_tok_s"] = round(hf_tokens / hf_s, 1)
        figures[f"engine_b{b}_tok_s"] = round(en_tokens / en_s, 1)
        figures[f"engine_vs_hf_b{b}"] = round(figures[f"engine_b{b}_tok_s"] / figures[f"hf_b{b}_tok_s"], 2)
        print(f"batch {b:3d}: generate {hf_s * 1e3:8.1f} ms ({hf_tokens} tokens), engine {en_s * 1e3:8.1f} ms "
              f"({en_tokens} tokens), {same}/{b} rows equal", flush=True)
    figures["tokens_equal"] = f"{equal}/{total}"
    emit("generation", {**figures, **machine_note()})


if __name__ == "__main__":
    main()
