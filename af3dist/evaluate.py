"""Evaluate any model folder (base, base + adapter, merged) on a split: predictions and caption metrics.

Decoding and features run in the Ray Data pipeline; captioning runs in a pool of model actors; metrics
score each clip's prediction against all of its reference captions.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from af3dist.embedded.assets import prepare_embedded
from af3dist.cluster import init_ray
from af3dist.config import Config
from af3dist.data.pipeline import build_dataset
from af3dist.data.source import read_references
from af3dist.storage import write_text
from af3dist.inference import CaptionPredictor
from af3dist.metrics import caption_metrics
from af3dist.model.loading import adapter_base, is_adapter

log = logging.getLogger(__name__)


def evaluate(cfg: Config, model: str, out_dir: str, adapter: str | None = None) -> dict:
    """Caption every clip of `cfg.eval.split` (one per (youtube_id, start_time); the first `cfg.eval.limit`),
    score, and write `<out_dir>/metrics.json` and `<out_dir>/predictions.jsonl` (clip id, prediction,
    references)."""
    ev = cfg.eval
    prepare_embedded(cfg)
    init_ray(cfg.ray)
    split = ev.split or cfg.data.test_split
    references = read_references(cfg.data.source, split)
    clips = sorted(references)[: ev.limit] if ev.limit else sorted(references)
    keep = frozenset(references[c]["first_id"] for c in clips)
    base = adapter_base(adapter or model) if (adapter or is_adapter(model)) else model
    ds = build_dataset(cfg.data, base, split, keep_ids=keep)
    ds = ds.map_batches(
        CaptionPredictor,
        fn_constructor_kwargs=dict(model=model, adapter=adapter, dtype=cfg.model.dtype,
                                   max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size),
        batch_size=ev.batch_size * 4, batch_format="numpy", concurrency=ev.actors,
        num_gpus=1 if ev.use_gpu else 0, num_cpus=ev.cpus_per_actor,
    )
    rows = ds.select_columns(["clip_id", "prediction"]).take_all()
    predictions = {r["clip_id"]: r["prediction"] for r in rows}
    refs = {c: references[c]["references"] for c in predictions}
    metrics = {"model": model, "adapter": adapter, "split": split,
               **caption_metrics(predictions, refs), "clips_missing": len(clips) - len(predictions)}
    out = Path(out_dir)
    write_text(str(out / "predictions.jsonl"), "".join(
        json.dumps({"clip_id": c, "prediction": predictions[c], "references": refs[c]}) + "\n"
        for c in sorted(predictions)))
    write_text(str(out / "metrics.json"), json.dumps(metrics, indent=2))
    return metrics
