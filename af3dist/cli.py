"""The `af3dist` command: build the embedded stand-ins and run the jobs on the current Ray cluster or a
local one. Every job takes `--config <preset or YAML>` plus `section.field=value` overrides."""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel, ValidationError

from af3dist.config import (CaptionBatchConfig, Config, ConfigError, SyntheticDataConfig, format_errors,
                            load_config, preset_names)


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny",
                        help=f"a preset ({', '.join(preset_names())}) or a YAML file (default: tiny)")
    parser.add_argument("--output-dir", help="where the run writes its outputs (overrides output_dir)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. data.decode_batch_size=4")


def add_field_flags(parser: argparse.ArgumentParser, section: type[BaseModel], prefix: str,
                    keep_defaults: bool = False) -> None:
    """One `--field-name` flag per field of a config section, typed from its annotation, with the field's
    description and default as help: the flags are the section's fields, never a restatement of them. Unset
    flags are None (the section's own value applies) unless `keep_defaults`."""
    for name, field in section.model_fields.items():
        kinds = [t for t in (typing.get_args(field.annotation) or (field.annotation,)) if t is not type(None)]
        kind = kinds[0] if len(kinds) == 1 and kinds[0] in (int, float, str, bool) else str
        text = f"{prefix}.{name}" + (f": {field.description}" if field.description else "") + \
            f" (default {field.default!r})"
        default = field.default if keep_defaults else None
        if kind is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", action="store_true", default=default, help=text)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=default, help=text)


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def _make_tiny_model(args: argparse.Namespace) -> None:
    from af3dist.embedded.assets import tokenizer_corpus
    from af3dist.config import TinyModelConfig
    from af3dist.embedded.tiny_model import build_tiny_model

    cfg = load_config(args.config)
    tiny = cfg.model.build_tiny or TinyModelConfig()
    if args.seed is not None:
        tiny = tiny.model_copy(update={"seed": args.seed})
    out = build_tiny_model(args.out, tiny, tokenizer_corpus(cfg.data.prompt))
    print(f"tiny AF3 written to {out}")


def _make_synthetic_audiocaps(args: argparse.Namespace) -> None:
    from af3dist.embedded.audiocaps import make_synthetic_audiocaps

    try:
        sizes = SyntheticDataConfig(**{name: getattr(args, name) for name in SyntheticDataConfig.model_fields})
    except ValidationError as err:
        raise ConfigError(format_errors(err, SyntheticDataConfig)) from None
    summary = make_synthetic_audiocaps(args.out, **sizes.model_dump())
    import json

    print(json.dumps(summary, indent=2, default=str))


def _data(args: argparse.Namespace) -> None:
    from af3dist.data_check import print_summary, run_data_pipeline

    print_summary(run_data_pipeline(config_from_args(args), split=args.split, batch_size=args.batch_size,
                                    limit=args.limit))


def _train(args: argparse.Namespace) -> None:
    import json

    from af3dist.training.finetune import finetune

    print(json.dumps(finetune(config_from_args(args)), indent=2, default=str))


def _evaluate(args: argparse.Namespace) -> None:
    import json

    from af3dist.evaluate import evaluate

    cfg = config_from_args(args)
    for name in ("split", "limit", "batch_size"):  # flags are the eval section's fields
        if getattr(args, name) is not None:
            setattr(cfg.eval, name, getattr(args, name))
    out = args.out or str(Path(cfg.output_dir) / "eval")
    print(json.dumps(evaluate(cfg, args.model or cfg.model.name_or_path, out, adapter=args.adapter), indent=2))


def _merge(args: argparse.Namespace) -> None:
    from af3dist.model.merge import merge_adapter

    print(f"merged model written to {merge_adapter(args.adapter, args.out, base=args.base)}")


def _main_job(args: argparse.Namespace) -> None:
    from af3dist.recipe import run_main

    cfg = config_from_args(args)
    if args.limit is not None:
        cfg.eval.limit = args.limit
    run_main(cfg)


@contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """`ray job stop` and schedulers send SIGTERM: unwind (releasing the output lock) instead of dying."""
    import signal
    import threading

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    if threading.current_thread() is not threading.main_thread():  # only the main thread takes signals
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _caption_batch(args: argparse.Namespace) -> None:
    import json

    from af3dist.captioning.job import run_batch_caption
    from af3dist.captioning.lock import LockLost, OutputLocked

    cfg = config_from_args(args)
    flags = {name: getattr(args, name) for name in CaptionBatchConfig.model_fields
             if getattr(args, name, None) is not None}  # the flags are caption_batch's fields
    if args.base and not args.model:
        flags["model"] = args.base
    job = CaptionBatchConfig.make(**{**cfg.caption_batch.model_dump(exclude_unset=True), **flags})
    if job.model is None and job.adapter is not None:
        job.model = job.adapter  # an adapter folder records its base
    if job.model is None:
        raise ConfigError("caption-batch needs --model (merged or base) or --base with --adapter")
    ray_cfg = cfg.ray.model_copy(update={k: v for k, v in (("address", args.ray_address),
                                                            ("num_cpus", args.num_cpus)) if v is not None})
    try:
        with _sigterm_unwinds():
            summary = run_batch_caption(job, ray_cfg=ray_cfg)
    except (OutputLocked, LockLost) as e:
        print(f"af3dist: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    print(json.dumps(summary, indent=2))
    if not summary["complete"] and job.limit is None:
        raise SystemExit(1)


def _adapter_pairs(values: list[str]) -> dict[str, str]:
    pairs = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {value!r} must look like NAME=DIR")
        pairs[name] = path
    return pairs


def _serve(args: argparse.Namespace) -> None:
    from af3dist.server.run import serve_forever

    overrides = list(args.overrides)
    serve_forever(args.config, overrides, args.model, _adapter_pairs(args.adapter), args.host, args.port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="af3dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-tiny-model", help="write a tiny random AF3 + processor as an HF folder")
    p.add_argument("out")
    p.add_argument("--config", default="tiny", help="preset or YAML whose model.build_tiny sizes to use")
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_make_tiny_model)

    p = sub.add_parser("make-synthetic-audiocaps", help="write synthetic clips in the OpenSound/AudioCaps layout")
    p.add_argument("out")
    add_field_flags(p, SyntheticDataConfig, "data.synthetic", keep_defaults=True)
    p.set_defaults(func=_make_synthetic_audiocaps)

    p = sub.add_parser("data", help="stream a split through the Ray Data pipeline and print a summary")
    add_config_args(p)
    p.add_argument("--split", default=None, help="default: data.train_split")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=None, help="stop after this many clips")
    p.set_defaults(func=_data)

    p = sub.add_parser("train", help="LoRA fine-tuning with Ray Train + DeepSpeed (resumes a rerun)")
    add_config_args(p)
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="caption a split with any model folder and score it")
    add_config_args(p)
    p.add_argument("--model", help="base, merged or adapter folder / hub id (default: model.name_or_path)")
    p.add_argument("--adapter", help="a LoRA adapter folder to apply on --model")
    p.add_argument("--split", help="eval.split (default: data.test_split)")
    p.add_argument("--out", help="where metrics.json and predictions.jsonl go (default: <output_dir>/eval)")
    p.add_argument("--limit", type=int, help="eval.limit: evaluate only the first N clips")
    p.add_argument("--batch-size", type=int, help="eval.batch_size")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base as a plain transformers folder")
    p.add_argument("--adapter", required=True)
    p.add_argument("--base", help="default: the base recorded in the adapter")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_merge)

    p = sub.add_parser("main", help="the main job: evaluate base, fine-tune, merge, evaluate, compare")
    add_config_args(p)
    p.add_argument("--limit", type=int, help="eval.limit: evaluate only the first N test clips")
    p.set_defaults(func=_main_job)

    p = sub.add_parser("caption-batch", help="caption a folder, glob, manifest or parquet of clips with Ray Data "
                                             "(exactly once; a rerun resumes)")
    add_config_args(p)  # caption_batch.* from the preset or YAML, then key=value overrides, then these flags
    p.add_argument("--base", help="the base model for --adapter (same as --model)")
    add_field_flags(p, CaptionBatchConfig, "caption_batch")
    p.add_argument("--ray-address", help="default: $RAY_ADDRESS, else a local Ray instance")
    p.add_argument("--num-cpus", type=int, help="CPUs of a local Ray instance")
    p.set_defaults(func=_caption_batch)

    p = sub.add_parser("serve", help="serve captions over HTTP (OpenAI-compatible) with Ray Serve until stopped")
    p.add_argument("--config", default="tiny", help=f"a preset ({', '.join(preset_names())}) or a YAML file")
    p.add_argument("--model", help="merged or base model folder / hub id (default: model.name_or_path)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR",
                   help="a LoRA adapter clients select with model=NAME (repeatable)")
    p.add_argument("--host", help="default: serve.host")
    p.add_argument("--port", type=int, help="default: serve.port")
    p.add_argument("overrides", nargs="*", metavar="section.field=value", help="e.g. serve.max_batch_size=16")
    p.set_defaults(func=_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ConfigError as e:
        print(f"af3dist: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
