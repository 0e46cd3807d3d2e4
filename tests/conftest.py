"""Shared fixtures: one tiny AF3, one small synthetic AudioCaps and one local Ray instance per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SMALL_DATA = dict(train_clips=24, validation_clips=6, test_clips=6, shards=2, long_clips=1, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    from af3dist.embedded.assets import tokenizer_corpus
    from af3dist.config import TinyModelConfig
    from af3dist.embedded.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-af3", TinyModelConfig(),
                                tokenizer_corpus("Describe the audio.")))


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory):
    from af3dist.embedded.audiocaps import make_synthetic_audiocaps

    out = tmp_path_factory.mktemp("data") / "audiocaps"
    make_synthetic_audiocaps(out, **SMALL_DATA)
    return str(out)


@pytest.fixture(scope="session")
def processor(tiny_model_dir):
    from af3dist.data.features import load_processor

    return load_processor(tiny_model_dir)


@pytest.fixture(scope="session")
def ray_local():
    import ray

    from af3dist.cluster import local_ray_options

    if not ray.is_initialized():
        ray.init(**local_ray_options(num_cpus=2), log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_config(tiny_model_dir, synthetic_dir, tmp_path):
    """The tiny preset pointed at this session's model, data and a fresh output dir."""
    from af3dist.config import load_config

    return load_config("tiny", [f"model.name_or_path={tiny_model_dir}", "model.build_tiny=null",
                                f"data.source={synthetic_dir}", "data.synthetic=null",
                                f"output_dir={tmp_path / 'out'}"])
