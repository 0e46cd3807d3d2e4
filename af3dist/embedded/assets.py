"""Build the embedded default's stand-ins (tiny AF3, synthetic AudioCaps) when a config asks for them.

Only local folders that are missing (or built from other settings) are built; a hub id or URL is never
touched, so the same config loader serves the laptop and the cluster.
"""

from __future__ import annotations

import logging
from pathlib import Path

from af3dist import storage
from af3dist.config import DEFAULT_PROMPT, Config

log = logging.getLogger(__name__)

SYNTHETIC_MARKER = ".af3dist-synthetic.json"  # the settings a generated dataset was built from


def tokenizer_corpus(prompt: str) -> list[str]:
    """Text the tiny tokenizer is trained on: every synthetic caption and the prompts."""
    from af3dist.embedded.captions import caption_corpus

    return caption_corpus() + [prompt, DEFAULT_PROMPT, "What do you hear?"]


def prepare_embedded(cfg: Config) -> None:
    """Make sure cfg.model.name_or_path and cfg.data.source exist when they name stand-ins to build."""
    if cfg.model.build_tiny is not None:
        from af3dist.embedded.tiny_model import ensure_tiny_model

        path = ensure_tiny_model(cfg.model.name_or_path, cfg.model.build_tiny, tokenizer_corpus(cfg.data.prompt))
        log.info("tiny AF3 ready at %s", path)
    syn = cfg.data.synthetic
    if syn is not None and not storage.is_remote(cfg.data.source):
        root = Path(cfg.data.source)
        marker = root / SYNTHETIC_MARKER
        spec = syn.model_dump_json()
        # Build when missing, or rebuild what we built from other settings; a folder we did not build
        # (no marker) is never touched.
        if not (root / "data").is_dir() or (marker.is_file() and marker.read_text() != spec):
            from af3dist.embedded.audiocaps import make_synthetic_audiocaps

            log.info("generating synthetic AudioCaps at %s", cfg.data.source)
            root.mkdir(parents=True, exist_ok=True)
            marker.write_text("")  # ours, settings unknown until done: an interrupted build is redone
            make_synthetic_audiocaps(cfg.data.source, train_clips=syn.train_clips,
                                     validation_clips=syn.validation_clips, test_clips=syn.test_clips,
                                     shards=syn.shards, long_clips=syn.long_clips, seed=syn.seed)
            marker.write_text(spec)
