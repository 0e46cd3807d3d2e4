"""Fold a LoRA adapter into its base: an HF folder that plain transformers loads without peft."""

from __future__ import annotations

from pathlib import Path

import torch

from af3dist.data.features import load_processor
from af3dist.storage import building_folder
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
    with building_folder(out_path) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return out_path
