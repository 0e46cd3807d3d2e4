"""Caption audio with AF3: base, base + LoRA adapter, or merged model.

`Captioner` is the project's own entry point (transformers 5.24 has no `audio-text-to-text` pipeline; importing
af3dist registers one backed by the same engine, see af3dist.generation.pipeline). Clips may be file paths,
encoded bytes, or arrays at any sampling rate. Every caption comes from the shared generation engine
(af3dist.generation), greedy: a batch gives the same tokens as one clip at a time, and as `model.generate`.
`generate_tokens` (the `model.generate` call the engine replaced) stays as the reference that tests and
benchmarks compare the engine with.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from af3dist.config import DEFAULT_PROMPT
from af3dist.data.audio import Clip, to_waveform
from af3dist.data.features import Featurizer, load_processor
from af3dist.generation import GenerationEngine, GenFailure, GenRequest
from af3dist.model.loading import load_model, resolve_dtype, resolve_model

log = logging.getLogger(__name__)

def unwrap(model):
    """The underlying transformers model of a peft/DeepSpeed wrapper, for generation settings."""
    return getattr(model, "module", model)


@torch.no_grad()
def generate_tokens(model, inputs: dict[str, torch.Tensor], max_new_tokens: int, eos_token_id: int,
                    pad_token_id: int, temperature: float = 0.0, top_p: float = 1.0,
                    synced_gpus: bool = False) -> list[tuple[list[int], bool]]:
    """New tokens per row (no prompt, nothing from the first <|im_end|> on) and whether the row ended with
    <|im_end|> before `max_new_tokens`. Greedy at temperature 0, else nucleus sampling (seed the torch RNG
    first for reproducible samples). Every generation knob is passed explicitly so that the checkpoint's
    own generation_config (sampling, for the real AF3) never changes what we asked for."""
    sampling = temperature > 0
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=sampling, num_beams=1,
                         temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                         top_k=0 if sampling else None, repetition_penalty=None,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, use_cache=True,
                         synced_gpus=synced_gpus)
    result = []
    for row in out[:, inputs["input_ids"].shape[1]:].tolist():
        finished = eos_token_id in row
        if finished:
            row = row[: row.index(eos_token_id)]
        result.append(([t for t in row if t != pad_token_id], finished))
    return result


def captions(engine: GenerationEngine, rows: Sequence[dict], max_new_tokens: int) -> list[str]:
    """Greedy captions of featurized rows (input_ids, input_features_mask and input_features, or the compact
    sound_features + sound_pad that build_dataset's rows carry: the engine reads both; a row's labelled
    caption, if any, is left out of its prompt), in order. Raises on the first failure (the
    engine keeps nothing in flight), for offline callers that retry as they see fit."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # similar lengths prefill together
    results = engine.generate([GenRequest(rows[i], max_new_tokens) for i in order])
    out = [""] * len(rows)
    for i, r in zip(order, results):
        if isinstance(r, GenFailure):  # only with an isolating engine
            raise RuntimeError(f"generation failed ({r.error})")
        out[i] = r.text
    return out


class Captioner:
    """Batched greedy captioning with an AF3 model and its processor, through one generation engine whose KV
    cache holds `batch_size` rows (allocated at the first caption, kept for the next ones)."""

    def __init__(self, model, processor, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64,
                 device: str | torch.device | None = None, batch_size: int = 8):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.featurizer = Featurizer(processor, prompt)
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.engine = self._engine(batch_size)

    def _engine(self, batch_size: int) -> GenerationEngine:
        return GenerationEngine(self.model, self.processor.tokenizer, max_batch_size=batch_size,
                                isolate_failures=False)

    @classmethod
    def load(cls, model: str, adapter: str | None = None, dtype: str = "auto", device: str | None = None,
             prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 64, batch_size: int = 8) -> "Captioner":
        """`model`: base or merged folder / hub id, or an adapter folder (its base is read from it)."""
        on_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
        model, adapter, processor_source = resolve_model(model, adapter)
        return cls(load_model(model, resolve_dtype(dtype, on_gpu), adapter), load_processor(processor_source),
                   prompt, max_new_tokens, device, batch_size)

    def caption_waveforms(self, waveforms: Sequence[np.ndarray], prompts: Sequence[str] | None = None,
                          batch_size: int | None = None) -> list[str]:
        """16 kHz waveforms -> captions, in order (`batch_size`: rows decoded together, default the engine's)."""
        if batch_size is not None and batch_size != self.engine.max_batch_size:
            self.engine = self._engine(batch_size)
        prompts = list(prompts or [self.featurizer.prompt] * len(waveforms))
        rows = [self.featurizer.generation_inputs(w, p) for w, p in zip(waveforms, prompts)]
        return captions(self.engine, rows, self.max_new_tokens)

    def caption(self, clips: Clip | Sequence[Clip], prompt: str | None = None, batch_size: int | None = None,
                sampling_rate: int | None = None) -> str | list[str]:
        """Caption one clip (returns a string) or many (returns a list, in input order)."""
        single = isinstance(clips, (str, Path, bytes, tuple)) or (isinstance(clips, np.ndarray) and clips.ndim == 1)
        items = [clips] if single else list(clips)
        waveforms = [to_waveform(c, sampling_rate) for c in items]
        out = self.caption_waveforms(waveforms, [prompt or self.featurizer.prompt] * len(waveforms), batch_size)
        return out[0] if single else out


class CaptionPredictor:
    """A Ray Data callable class: featurized rows in, a `prediction` column out (greedy, through the engine).

    One instance holds one model and one engine (its KV cache sized for `batch_size` rows);
    `map_batches(CaptionPredictor, concurrency=N)` makes an actor pool. A failure raises (batch captioning
    halves the batch on out-of-memory and retries clip by clip otherwise).
    """

    def __init__(self, model: str, adapter: str | None = None, dtype: str = "auto", max_new_tokens: int = 64,
                 batch_size: int = 8, device: str | None = None):
        self.captioner = Captioner.load(model, adapter=adapter, dtype=dtype, device=device,
                                        max_new_tokens=max_new_tokens, batch_size=batch_size)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from af3dist.data.batching import rows_of

        c = self.captioner
        predictions = captions(c.engine, rows_of(batch), c.max_new_tokens)
        keep = [k for k in ("id", "clip_id", "caption", "duration_s") if k in batch]
        return {**{k: batch[k] for k in keep}, "prediction": np.array(predictions, dtype=object)}
