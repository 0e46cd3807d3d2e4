"""Batch captioning throughput: the Ray Data job against the upstream guide's loop, tiny AF3, CPU.

    python benchmarks/batch_caption.py [--clips 1000] [--naive-clips 200] [--max-new-tokens 64] [--batch-size 8]

Clips are the synthetic AudioCaps distribution (every codec, 16-48 kHz, mono/stereo, 1-10 s), written as
files. The naive loop does what the upstream guide's inference section does: load the model once, then for
each file build the chat input with `processor.apply_chat_template(..., tokenize=True)` (which loads and
resamples the file) and `generate` one clip at a time (greedy, same max_new_tokens). The job runs on a local
Ray instance with all CPUs, with 1 and then 2 captioning actors, after a small warm-up run that starts the
worker processes. The naive loop's model load is not timed; the job's counterpart, actor start-up (a new
process, imports, model load: seconds, once per run), is left out of `ours_clips_per_s` and
`scaling_2_vs_1`, which use the steady rate after the first results arrive; the `*_end_to_end_*` figures
include it. The naive loop captions the first 200 clips (the issue's size); the job captions 1000 of the same
distribution, because in a shorter run every clip is read and featurized while the actors are still
starting, and the "steady" rate would then leave the CPU stages out. `*_cpu_busy` is the share of the
machine's cores busy during each run: when one actor already keeps every core busy, a second one cannot
add much. Last line: one JSON object with naive_clips_per_s, ours_clips_per_s (2 actors), vs_naive and
scaling_2_vs_1, plus the end-to-end rates and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import emit, machine_note  # noqa: E402


def write_clips(folder: Path, n: int, seed: int) -> list[Path]:
    from af3dist.embedded.plan import plan_clips

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for spec in plan_clips("train", n, seed, long_clips=0):
        path = folder / spec.path
        path.write_bytes(spec.encode())
        paths.append(path)
    return paths


def naive_loop(model_dir: str, files: list[Path], prompt: str, max_new_tokens: int) -> tuple[float, list[str]]:
    """The upstream guide: apply_chat_template loads each file; generate one clip at a time (greedy, as the job)."""
    import torch
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    captions = []
    start = time.perf_counter()
    for path in files:
        conversation = [{"role": "user", "content": [{"type": "text", "text": prompt},
                                                      {"type": "audio", "path": str(path)}]}]
        inputs = processor.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True,
                                               return_dict=True)
        with torch.no_grad():  # plain greedy: the checkpoint's generation_config samples with a repetition penalty
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                                 eos_token_id=eos, pad_token_id=processor.tokenizer.pad_token_id)
        new = out[:, inputs["input_ids"].shape[1]:]
        captions.append(processor.batch_decode(new, skip_special_tokens=True)[0].strip())
    return time.perf_counter() - start, captions


def job_run(model_dir: str, folder: Path, out: Path, actors: int, batch_size: int, max_new_tokens: int,
            limit: int | None = None) -> dict:
    import psutil

    from af3dist.captioning.job import run_batch_caption
    from af3dist.config import CaptionBatchConfig

    shutil.rmtree(out, ignore_errors=True)
    cfg = CaptionBatchConfig.make(model=model_dir, input=str(folder), output=str(out), actors=actors,
                                  batch_size=batch_size, max_new_tokens=max_new_tokens, limit=limit,
                                  progress_seconds=5)
    psutil.cpu_percent()  # starts the machine-wide measurement
    summary = run_batch_caption(cfg, printer=lambda line: print(line, file=sys.stderr, flush=True))
    return {**summary, "cpu_busy": round(psutil.cpu_percent() / 100, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=1000, help="clips the job captions")
    parser.add_argument("--naive-clips", type=int, default=200, help="the first this many for the naive loop")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from af3dist.embedded.assets import prepare_embedded
    from af3dist.config import load_config

    cfg = load_config("tiny")
    prepare_embedded(cfg.model_copy(update={"data": cfg.data.model_copy(update={"synthetic": None})}))
    model_dir = cfg.model.name_or_path
    work = Path(tempfile.mkdtemp(prefix="af3dist-batch-caption-bench-"))
    try:
        files = write_clips(work / "clips", args.clips, args.seed)
        naive_files = files[: args.naive_clips] if args.naive_clips else files
        print(f"{len(files)} clips in {work / 'clips'}; naive loop over {len(naive_files)}", file=sys.stderr)
        naive_s, naive_captions = naive_loop(model_dir, naive_files, cfg.data.prompt, args.max_new_tokens)
        naive_rate = len(naive_files) / naive_s
        print(f"naive: {naive_rate:.2f} clips/s", file=sys.stderr, flush=True)

        import ray

        ray.init(include_dashboard=False, log_to_driver=False)
        cpus = int(ray.cluster_resources()["CPU"])
        job_run(model_dir, work / "clips", work / "warmup", 1, args.batch_size, args.max_new_tokens, limit=16)
        runs = {n: job_run(model_dir, work / "clips", work / f"out{n}", n, args.batch_size, args.max_new_tokens)
                for n in (1, 2)}
        ray.shutdown()

        from af3dist.captioning.shards import read_output

        ours = {r["id"]: r["caption"] for r in read_output(str(work / "out2")).to_pylist()}
        same = sum(ours.get(p.name) == c for p, c in zip(naive_files, naive_captions))
        rate = {n: runs[n]["steady_clips_per_s"] for n in runs}
        end_to_end = {n: runs[n]["clips_per_s"] for n in runs}
        result = {
            "clips": len(files), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
            "cpus": cpus, "load_avg_1m": round(os.getloadavg()[0], 2),
            "naive_clips": len(naive_files), "naive_s": round(naive_s, 2),
            "actors_1_clips_per_s": rate[1], "actors_2_clips_per_s": rate[2],
            "actors_1_end_to_end_clips_per_s": end_to_end[1], "actors_2_end_to_end_clips_per_s": end_to_end[2],
            "actors_1_startup_s": runs[1]["startup_s"], "actors_2_startup_s": runs[2]["startup_s"],
            "actors_1_cpu_busy": runs[1]["cpu_busy"], "actors_2_cpu_busy": runs[2]["cpu_busy"],
            "end_to_end_vs_naive": round(end_to_end[2] / naive_rate, 2),
            "end_to_end_scaling_2_vs_1": round(end_to_end[2] / end_to_end[1], 2),
            "errors": runs[2]["errors"], "captions_equal_naive": f"{same}/{len(naive_files)}",
            "naive_clips_per_s": round(naive_rate, 2),
            "ours_clips_per_s": rate[2],
            "vs_naive": round(rate[2] / naive_rate, 2),
            "scaling_2_vs_1": round(rate[2] / rate[1], 2),
        }
        emit("batch_caption", {**result, **machine_note()})
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
