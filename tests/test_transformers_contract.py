"""The transformers internals af3dist overrides or re-implements, pinned by their source.

af3dist reaches below transformers' public API in a few places, for speed (see each module's docstring):
- `af3dist/model/encoder.py` (SoundOnlyEncoder): a copy of AudioFlamingo3Encoder.forward's body, swapped in
  with `__class__`, and a key-only attention mask that relies on how AF3's attention applies masks;
- `af3dist/data/features.py` (FastWhisperFeatureExtractor): a re-implementation of
  WhisperFeatureExtractor._torch_extract_fbank_features; and Featurizer calls the AF3 processor's audio path
  (`_process_audio`, with `_merge_kwargs`' defaults) directly and expands `<sound>` in the ids itself;
- `af3dist/generation/engine.py`: the Qwen2 decoder layer's arithmetic (attention, RoPE, RMSNorm, MLP) written
  out for the decode step, and a cache object handed to the layers in prefill;
- `af3dist/training/loss.py`: a boolean `logits_to_keep`.
Their behaviour is tested against the stock code elsewhere (test_encoder, test_features, test_generation,
test_loss); this test fails first, and says what to re-check, when an upgrade changes any of those internals,
so that a transformers upgrade is a deliberate step: re-run those tests, re-read the changed source against
our copy, then update the digest below and the range in pyproject.toml.
"""

import hashlib
import inspect
import re
from pathlib import Path

import pytest
import transformers
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from transformers import masking_utils, modeling_utils
from transformers.models.audioflamingo3.processing_audioflamingo3 import AudioFlamingo3Processor
from transformers.processing_utils import ProcessorMixin
from transformers.models.audioflamingo3 import modeling_audioflamingo3 as af3
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.whisper.feature_extraction_whisper import WhisperFeatureExtractor

# name -> (object, sha256 prefix of its source in the tested version, which af3dist module depends on it)
CONTRACT = {
    "AudioFlamingo3Encoder.forward": (af3.AudioFlamingo3Encoder.forward, "ed0d36a9ba4fc43d",
                                      "af3dist/model/encoder.py copies its body"),
    "AudioFlamingo3EncoderLayer.forward": (af3.AudioFlamingo3EncoderLayer.forward, "26f76fe37863f5a1",
                                           "af3dist/model/encoder.py passes its key-only mask through it"),
    "AudioFlamingo3Attention.forward": (af3.AudioFlamingo3Attention.forward, "39c18993bbafff78",
                                        "af3dist/model/encoder.py: its mask must broadcast over queries"),
    "audioflamingo3.eager_attention_forward": (af3.eager_attention_forward, "ee12a4f4b2571ede",
                                               "af3dist/model/encoder.py: the additive eager mask"),
    "create_bidirectional_mask": (masking_utils.create_bidirectional_mask, "0f1d1f22bb0f1a46",
                                  "af3dist/model/encoder.py's fallback for other attention kernels"),
    "AudioFlamingo3Model.get_audio_features": (af3.AudioFlamingo3Model.get_audio_features, "1fc5b4dd490bbdab",
                                               "af3dist/generation/engine.py's prefill"),
    "AudioFlamingo3ForConditionalGeneration.get_audio_features": (
        af3.AudioFlamingo3ForConditionalGeneration.get_audio_features, "a8b3babc00dd411e",
        "af3dist/generation/engine.py's prefill"),
    "AudioFlamingo3ForConditionalGeneration.forward": (
        af3.AudioFlamingo3ForConditionalGeneration.forward, "414f50ea70158734",
        "af3dist/training/loss.py's boolean logits_to_keep"),
    "slice_logits_to_keep": (modeling_utils.slice_logits_to_keep, "6d668b8ebbfb9e50",
                             "af3dist/training/loss.py's boolean logits_to_keep"),
    "WhisperFeatureExtractor._torch_extract_fbank_features": (
        WhisperFeatureExtractor._torch_extract_fbank_features, "3ea46439572a5cb7",
        "af3dist/data/features.py re-implements it"),
    "AudioFlamingo3Processor._process_audio": (
        AudioFlamingo3Processor._process_audio, "18d9a24d1906afce",
        "af3dist/data/features.py's Featurizer._audio calls it (windows, log-mel, <sound> counts)"),
    "AudioFlamingo3Processor._get_audio_token_length": (
        AudioFlamingo3Processor._get_audio_token_length, "f96349098be68429",
        "af3dist/data/features.py: the <sound> count of each clip it expands"),
    "ProcessorMixin._merge_kwargs": (ProcessorMixin._merge_kwargs, "6e36f7d822dac51e",
                                     "af3dist/data/features.py's Featurizer: the audio path's keyword arguments"),
    "Qwen2DecoderLayer.forward": (qwen2.Qwen2DecoderLayer.forward, "2b52523b7afe2a37",
                                  "af3dist/generation/engine.py's decode step"),
    "Qwen2Attention.forward": (qwen2.Qwen2Attention.forward, "958fda1e108c1fe8",
                               "af3dist/generation/engine.py's decode step and prefill cache"),
    "Qwen2RMSNorm.forward": (qwen2.Qwen2RMSNorm.forward, "790fa612e4fa57ac",
                             "af3dist/generation/engine.py's _rms"),
    "Qwen2MLP.forward": (qwen2.Qwen2MLP.forward, "03df2d7685cf8446", "af3dist/generation/engine.py's decode step"),
    "Qwen2RotaryEmbedding.forward": (qwen2.Qwen2RotaryEmbedding.forward, "7c26fb4894be3558",
                                     "af3dist/generation/engine.py's RoPE tables"),
    "qwen2.apply_rotary_pos_emb": (qwen2.apply_rotary_pos_emb, "ea234325c15de475",
                                   "af3dist/generation/engine.py's decode step"),
    "qwen2.rotate_half": (qwen2.rotate_half, "f714a4b1160c694e", "af3dist/generation/engine.py's in-place RoPE"),
}


def _digest(obj) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


def test_installed_transformers_is_in_the_tested_range():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    spec = re.search(r'"transformers([^"]+)"', pyproject).group(1)
    assert Version(transformers.__version__) in SpecifierSet(spec), (
        f"transformers {transformers.__version__} is outside the range af3dist is tested with ({spec})")


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_overridden_internal_is_unchanged(name):
    obj, want, user = CONTRACT[name]
    got = _digest(obj)
    assert got == want, (
        f"transformers {transformers.__version__} changed {name} (source digest {got}, tested: {want}); "
        f"{user}. Re-read the new source against af3dist's, run tests/test_encoder.py, test_features.py, "
        f"test_generation.py and test_loss.py, then update the digest here and the range in pyproject.toml.")
