"""Fold a LoRA adapter into its base: an HF folder that plain transformers loads without peft."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from af3dist.data.features import load_processor
from af3dist.model.loading import adapter_base, load_model


def merge_adapter(adapter: str, out: str, base: str | None = None, dtype: torch.dtype = torch.float32) -> Path:
    """Write base + adapter, merged, with the processor, to `out` (built aside, moved in whole)."""
    base = base or adapter_base(adapter)
    model = load_model(base, dtype, adapter=adapter).merge_and_unload()
    try:
        processor = load_processor(adapter)
    except (OSError, ValueError):
        processor = load_processor(base)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", dir=out_path.parent))
    try:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(tmp, out_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_path
