"""The `af3dist` command: build the embedded stand-ins and run the jobs on the current Ray cluster or a
local one. Every job takes `--config <preset or YAML>` plus `section.field=value` overrides."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from af3dist.config import Config, ConfigError, load_config, preset_names


def add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="tiny",
                        help=f"a preset ({', '.join(preset_names())}) or a YAML file (default: tiny)")
    parser.add_argument("--output-dir", help="where the run writes its outputs (overrides output_dir)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. data.decode_batch_size=4")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides = list(args.overrides)
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={args.output_dir}")
    return load_config(args.config, overrides)


def _make_tiny_model(args: argparse.Namespace) -> None:
    from af3dist.assets import tokenizer_corpus
    from af3dist.config import TinyModelConfig
    from af3dist.model.tiny import build_tiny_model

    cfg = load_config(args.config)
    tiny = cfg.model.build_tiny or TinyModelConfig()
    if args.seed is not None:
        tiny = tiny.model_copy(update={"seed": args.seed})
    out = build_tiny_model(args.out, tiny, tokenizer_corpus(cfg.data.prompt))
    print(f"tiny AF3 written to {out}")


def _make_synthetic_audiocaps(args: argparse.Namespace) -> None:
    from af3dist.data.synthetic import make_synthetic_audiocaps

    summary = make_synthetic_audiocaps(args.out, train_clips=args.train_clips,
                                       validation_clips=args.validation_clips, test_clips=args.test_clips,
                                       shards=args.shards, long_clips=args.long_clips, seed=args.seed)
    import json

    print(json.dumps(summary, indent=2, default=str))


def _data(args: argparse.Namespace) -> None:
    from af3dist.data.run import print_summary, run_data_pipeline

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
    out = args.out or str(Path(cfg.output_dir) / "eval")
    print(json.dumps(evaluate(cfg, args.model or cfg.model.name_or_path, out, adapter=args.adapter,
                              split=args.split, limit=args.limit, batch_size=args.batch_size), indent=2))


def _merge(args: argparse.Namespace) -> None:
    from af3dist.model.merge import merge_adapter

    print(f"merged model written to {merge_adapter(args.adapter, args.out, base=args.base)}")


def _main_job(args: argparse.Namespace) -> None:
    from af3dist.recipe import run_main

    run_main(config_from_args(args), limit=args.limit)


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
    p.add_argument("--train-clips", type=int, default=256)
    p.add_argument("--validation-clips", type=int, default=24)
    p.add_argument("--test-clips", type=int, default=24)
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--long-clips", type=int, default=1, help="clips over 30 s per split")
    p.add_argument("--seed", type=int, default=0)
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
    p.add_argument("--split", help="default: data.test_split")
    p.add_argument("--out", help="where metrics.json and predictions.jsonl go (default: <output_dir>/eval)")
    p.add_argument("--limit", type=int, help="evaluate only the first N clips")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base as a plain transformers folder")
    p.add_argument("--adapter", required=True)
    p.add_argument("--base", help="default: the base recorded in the adapter")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_merge)

    p = sub.add_parser("main", help="the main job: evaluate base, fine-tune, merge, evaluate, compare")
    add_config_args(p)
    p.add_argument("--limit", type=int, help="evaluate only the first N test clips")
    p.set_defaults(func=_main_job)
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
