"""The `audio-text-to-text` pipeline task that the upstream guide uses and transformers 5.24 lacks.

`register()` (called when af3dist is imported) adds the task to transformers' PIPELINE_REGISTRY, backed by the
generation engine, so that after `import af3dist`

    pipe = pipeline("audio-text-to-text", model=merged_model, processor=processor)
    pipe(clip, generate_kwargs={"max_new_tokens": 64})   # -> [{"generated_text": "..."}]

works with a clip given as a 16 kHz array, a path, encoded bytes, or a list of them (a list gives one such
list per clip). Greedy decoding, the default prompt unless `prompt=` is passed.
"""

from __future__ import annotations

from typing import Any

from transformers import AudioFlamingo3ForConditionalGeneration, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

TASK = "audio-text-to-text"
DEFAULT_MAX_NEW_TOKENS = 64


class AudioTextToTextPipeline(Pipeline):
    """Audio (+ an optional text prompt) in, generated text out, through af3dist's GenerationEngine."""

    _load_processor = True
    _load_tokenizer = False  # the processor holds it
    _load_feature_extractor = False
    _load_image_processor = False

    def _sanitize_parameters(self, prompt: str | None = None, generate_kwargs: dict | None = None,
                             max_new_tokens: int | None = None, **kwargs):
        preprocess = {"prompt": prompt} if prompt else {}
        budget = max_new_tokens or (generate_kwargs or {}).get("max_new_tokens")
        forward = {"max_new_tokens": int(budget)} if budget else {}
        return preprocess, forward, {}

    def preprocess(self, inputs: Any, prompt: str | None = None) -> dict[str, Any]:
        from af3dist.data.features import Featurizer
        from af3dist.config import DEFAULT_PROMPT
        from af3dist.data.audio import to_waveform

        featurizer = Featurizer(self.processor, prompt or DEFAULT_PROMPT)
        return {"features": featurizer.generation_inputs(to_waveform(inputs), prompt)}

    def _forward(self, model_inputs: dict[str, Any], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> dict:
        from af3dist.generation.engine import GenerationEngine, GenRequest

        engine = getattr(self, "_engine", None)
        if engine is None:
            engine = self._engine = GenerationEngine(self.model, self.processor.tokenizer, max_batch_size=1,
                                                     isolate_failures=False)
        (result,) = engine.generate([GenRequest(model_inputs["features"], max_new_tokens)])
        return {"text": result.text}

    def postprocess(self, model_outputs: dict, **kwargs) -> list[dict[str, str]]:
        return [{"generated_text": model_outputs["text"]}]


def register() -> None:
    """Add the task to transformers' pipeline registry (idempotent)."""
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=AudioTextToTextPipeline,
                                            pt_model=AudioFlamingo3ForConditionalGeneration, type="multimodal")
