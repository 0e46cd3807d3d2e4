"""The main job: evaluate the base model, fine-tune it with LoRA, merge, evaluate again, compare.

On the embedded default this is the whole story on one laptop in minutes; with the `af3` preset it is
the same recipe on a GPU cluster.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from af3dist.config import Config
from af3dist.evaluate import evaluate
from af3dist.model.loading import resolve_dtype
from af3dist.model.merge import merge_adapter
from af3dist.training.finetune import finetune

TABLE_METRICS = ["cider_d", "bleu_1", "bleu_4", "rouge_l", "meteor"]


def metrics_table(before: dict, after: dict) -> str:
    lines = [f"{'metric':<10} {'before':>10} {'after':>10}"]
    for key in TABLE_METRICS:
        b, a = before.get(key), after.get(key)
        fmt = lambda v: "skipped" if v is None else f"{v:.3f}"  # noqa: E731
        lines.append(f"{key:<10} {fmt(b):>10} {fmt(a):>10}")
    return "\n".join(lines)


def run_main(cfg: Config) -> dict:
    """before-eval -> fine-tune -> merge -> after-eval on the test split; writes <output_dir>/summary.json."""
    out = Path(cfg.output_dir)
    start = time.perf_counter()
    print("[main] 1/4 evaluating the base model", flush=True)
    before = evaluate(cfg, cfg.model.name_or_path, str(out / "eval_base"))
    print("[main] 2/4 fine-tuning", flush=True)
    trained = finetune(cfg)
    print("[main] 3/4 merging the adapter", flush=True)
    merged = merge_adapter(trained["adapter"], str(out / "merged"),
                           dtype=resolve_dtype(cfg.model.dtype, cfg.train.use_gpu))
    print("[main] 4/4 evaluating the merged model", flush=True)
    after = evaluate(cfg, str(merged), str(out / "eval_merged"))
    summary = {"before": before, "after": after, "adapter": trained["adapter"], "merged": str(merged),
               "train_metrics": trained["metrics"], "data": trained["data"],
               "wall_s": round(time.perf_counter() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"\nAudioCaps-format test split ({before['num_clips']} clips): base vs fine-tuned (merged)\n"
          + metrics_table(before, after), flush=True)
    if before.get("meteor_skipped"):
        print(f"METEOR skipped: {before['meteor_skipped']}")
    print(f"adapter: {trained['adapter']}\nmerged model: {merged}\nwall time: {summary['wall_s']} s", flush=True)
    return summary
