"""The generation engine every caller shares (serving, batch captioning, evaluation, `Captioner`)."""

from af3dist.generation.engine import (GenerationEngine, GenFailure, GenRequest, GenResult, af3_of, prompt_ids,
                                       sample_token)

__all__ = ["GenerationEngine", "GenFailure", "GenRequest", "GenResult", "af3_of", "prompt_ids", "sample_token"]
