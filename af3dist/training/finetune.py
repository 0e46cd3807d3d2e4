"""The fine-tuning driver: validate the run, build the data pipeline, launch Ray Train, export outputs.

`finetune(cfg)` is what `ray_jobs/finetune.py` and `af3dist train` run. Rerunning it with the same
output dir (same run name and storage path) resumes from the last checkpoint instead of starting over.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from pathlib import Path

import ray
import yaml
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from af3dist import storage
from af3dist.embedded.assets import prepare_embedded
from af3dist.cluster import init_ray
from af3dist.config import Config, ConfigError, dump_config
from af3dist.data.errors import ErrorCounts, ErrorLedger
from af3dist.data.pipeline import build_dataset
from af3dist.data.source import count_rows, read_references
from af3dist.storage import copy_folder, join, write_text
from af3dist.training.loop import train_loop_per_worker
from af3dist.training.state import ADAPTER_DIR, train_shard_name

log = logging.getLogger(__name__)

RESOLVED_CONFIG = "config.yaml"
# Settings that may change between a run and its resumption without making it another run: where it runs,
# and what does not alter the work done so far (train longer, evaluate/checkpoint/log at another cadence), as
# the HF Trainer allows. A longer max_steps stretches the LR schedule over the new length from here on.
_RESUMABLE_SECTIONS = ("ray", "eval")
_RESUMABLE_FIELDS = {"train": ("max_steps", "eval_every", "checkpoint_every", "log_every", "keep_checkpoints",
                               "max_failures", "eval_caption_clips", "log_sample_ids", "push_to_hub")}


def run_name(cfg: Config) -> str:
    """The Ray Train run's name: train.run_name, else the output dir's name. Under a storage_path that
    several output dirs may share, a digest of the whole output dir is added, so that `a/run1` and `b/run1`
    never resume each other."""
    if cfg.train.run_name:
        return cfg.train.run_name
    name = Path(cfg.output_dir.rstrip("/")).name
    if cfg.train.storage_path:
        name += "-" + hashlib.sha256(cfg.output_dir.rstrip("/").encode()).hexdigest()[:8]
    return name


def storage_path(cfg: Config) -> str:
    return cfg.train.storage_path or join(storage.absolute(cfg.output_dir), "ray_results")


def _comparable(cfg_dict: dict) -> dict:
    out = {k: v for k, v in cfg_dict.items() if k not in _RESUMABLE_SECTIONS}
    for section, fields in _RESUMABLE_FIELDS.items():
        if isinstance(out.get(section), dict):
            out[section] = {k: v for k, v in out[section].items() if k not in fields}
    return out


def _read_previous_config(output_dir: str) -> dict | None:
    """The resolved config a previous run left in `output_dir` (local or any fsspec URL), or None."""
    fs, path = storage.filesystem(join(output_dir, RESOLVED_CONFIG))
    if not fs.isfile(path):
        return None
    with fs.open(path, "r") as f:
        return yaml.safe_load(f.read()) or {}


def check_run(cfg: Config) -> None:
    """Fail in the driver, before any worker starts, on what would otherwise fail late or hang."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(cfg.model.name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.name_or_path: cannot load {cfg.model.name_or_path!r} "
                          f"(not a model folder or reachable hub id): {str(e).splitlines()[0]}") from None
    tc = cfg.train
    resources = ray.cluster_resources()
    if tc.use_gpu and resources.get("GPU", 0) < tc.num_workers:
        raise ConfigError(f"train.use_gpu: {tc.num_workers} workers need {tc.num_workers} GPUs but the Ray "
                          f"cluster has {resources.get('GPU', 0):g}; set train.use_gpu=false or add GPU nodes")
    if tc.num_workers * tc.cpus_per_worker > resources.get("CPU", 0):
        raise ConfigError(f"train.num_workers x train.cpus_per_worker = {tc.num_workers * tc.cpus_per_worker:g} "
                          f"CPUs, but the Ray cluster has {resources.get('CPU', 0):g}")
    old = _read_previous_config(cfg.output_dir)
    if old is not None:
        new = yaml.safe_load(dump_config(cfg))
        if _comparable(old) != _comparable(new):
            changed = sorted(f"{s}.{k}" for s in new if s not in _RESUMABLE_SECTIONS and isinstance(new[s], dict)
                             for k in new[s] if (old.get(s) or {}).get(k) != new[s][k]
                             and k not in _RESUMABLE_FIELDS.get(s, ()))
            changed += sorted(s for s in new if not isinstance(new[s], dict) and old.get(s) != new[s])
            raise ConfigError(f"output_dir {cfg.output_dir!r} holds another run (its {RESOLVED_CONFIG} differs in "
                              f"{', '.join(changed) or 'structure'}); choose another --output-dir, or delete it "
                              f"to start over")


def build_datasets(cfg: Config, ledgers: dict) -> tuple[dict, dict[str, list[str]]]:
    """train / validation (loss) / val_clips (one row per clip, for caption metrics) and their references."""
    model = cfg.model.name_or_path
    tc = cfg.train
    # One stream covers the whole run (plus a pass of slack for dropped rows and uneven splits).
    rows = max(count_rows(cfg.data.source, cfg.data.train_split), 1)
    per_step = tc.micro_batch_size * tc.grad_accum_steps * tc.num_workers
    passes = math.ceil(tc.max_steps * per_step / rows) + 1
    references = read_references(cfg.data.source, cfg.data.eval_split)
    clips = sorted(references)[: cfg.train.eval_caption_clips]
    keep = frozenset(references[c]["first_id"] for c in clips)
    datasets = {
        **{train_shard_name(rank): build_dataset(cfg.data, model, cfg.data.train_split, ledger=ledgers["train"],
                                                 epochs=passes, part=(rank, tc.num_workers))
           for rank in range(tc.num_workers)},
        "validation": build_dataset(cfg.data, model, cfg.data.eval_split, ledger=ledgers["validation"]),
        "val_clips": build_dataset(cfg.data, model, cfg.data.eval_split, keep_ids=keep),
    }
    return datasets, {c: references[c]["references"] for c in clips}


class RankStreams(DataConfig):
    """Ray Train ingest where rank i reads `train_shard_name(i)` alone, in plan order, and evaluation data is
    split as usual.

    A rank's own stream is what makes resume exact (see `train_shard_name`). It goes through a one-way
    `streaming_split`, so that its executor runs in a coordinator actor of its own: handed over as a plain
    iterator, the executor would run inside the training worker and take the GIL from the training step
    (measured: half the samples/s). Ray Train resets a dataset's execution options to its defaults
    (preserve_order off), so the order is asked for here."""

    def __init__(self, num_workers: int):
        options = {}
        for rank in range(num_workers):
            options[train_shard_name(rank)] = DataConfig.default_ingest_options()
            options[train_shard_name(rank)].preserve_order = True
        super().__init__(datasets_to_split=["validation", "val_clips"], execution_options=options)
        self.num_workers = num_workers

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        # Ray Train V2 configures one dataset at a time, on the first rank that asks for it.
        own = {train_shard_name(rank): rank for rank in range(self.num_workers)}
        output = super().configure({k: v for k, v in datasets.items() if k not in own}, world_size,
                                   worker_handles, worker_node_ids, **kwargs)
        for name in datasets.keys() & own.keys():
            rank = own[name]
            ds = datasets[name].copy(datasets[name])
            ds.context.execution_options = self._resolve_execution_options(name)
            hints = [worker_node_ids[rank]] if worker_node_ids else None
            for i in range(world_size):  # the other ranks never ask for it
                output[i][name] = None
            output[rank][name] = ds.streaming_split(1, equal=False, locality_hints=hints)[0]
        return output


def _push_to_hub(cfg: Config, adapter_dir: Path) -> str | None:
    token = os.environ.get("HF_TOKEN")
    if not token:
        log.warning("train.push_to_hub is set but HF_TOKEN is not: not pushing")
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(cfg.train.push_to_hub, exist_ok=True)
    api.upload_folder(repo_id=cfg.train.push_to_hub, folder_path=str(adapter_dir))
    return cfg.train.push_to_hub


def finetune(cfg: Config) -> dict:
    """Run (or resume) LoRA fine-tuning; returns a summary with the final adapter's path and metrics."""
    prepare_embedded(cfg)
    init_ray(cfg.ray)
    check_run(cfg)
    write_text(join(cfg.output_dir, RESOLVED_CONFIG), dump_config(cfg))

    tc = cfg.train
    ledgers = {split: ErrorLedger.remote(cfg.data.error_rate_ceiling, cfg.data.min_rows_before_ceiling)
               for split in ("train", "validation")}
    datasets, references = build_datasets(cfg, ledgers)
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": 1} if tc.use_gpu else {})}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "references": references},
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name(cfg),
            storage_path=storage_path(cfg),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints,
                                               checkpoint_score_attribute="eval_loss",
                                               checkpoint_score_order="min"),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            worker_runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}},
        ),
        datasets=datasets,
        dataset_config=RankStreams(tc.num_workers),
    )
    result = trainer.fit()

    errors = ErrorCounts()
    for split, ledger in ledgers.items():
        part = ray.get(ledger.get_summary.remote())
        rows = ray.get(ledger.get_rows.remote())
        errors.record(part["rows_seen"], rows)
    errors_file = errors.write(join(cfg.output_dir, "data_errors.jsonl"))

    summary: dict = {"output_dir": cfg.output_dir, "run": run_name(cfg), "storage_path": storage_path(cfg),
                     "metrics": result.metrics, "data": {**errors.summary(), "errors_file": errors_file}}
    if result.checkpoint is not None:
        # The adapter of the last checkpoint, in the plain peft layout, under output_dir (local or a URL).
        adapter_dir = join(cfg.output_dir, ADAPTER_DIR)
        with result.checkpoint.as_directory() as folder:
            copy_folder(Path(folder, ADAPTER_DIR), adapter_dir, last="adapter_config.json")
            if tc.push_to_hub:
                summary["pushed_to"] = _push_to_hub(cfg, Path(folder, ADAPTER_DIR))
        summary["adapter"] = adapter_dir
        summary["checkpoint"] = result.checkpoint.path
    best = getattr(result, "best_checkpoints", None) or []
    if best:
        summary["best_checkpoint"] = min(best, key=lambda cm: cm[1].get("eval_loss", float("inf")))[0].path
    return summary
