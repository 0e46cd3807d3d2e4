"""af3dist: fine-tune, serve and batch-caption Audio Flamingo 3 on Ray.

Importing it registers transformers' missing `audio-text-to-text` pipeline task (af3dist.generation.pipeline).
"""

from af3dist.generation.pipeline import register as _register_pipeline

_register_pipeline()
