"""SoundOnlyEncoder: the stock AF3 encoder's outputs at every used position, without the window padding."""

import numpy as np
import pytest
import torch
from transformers import AudioFlamingo3ForConditionalGeneration

from af3dist.data.batching import collate_prompts
from af3dist.data.features import Featurizer
from af3dist.inference import generate_tokens
from af3dist.model.encoder import SoundOnlyEncoder, frames_needed
from af3dist.model.loading import load_model


def _inputs(processor, seconds: list[float]) -> dict[str, torch.Tensor]:
    featurizer = Featurizer(processor, "Describe the audio.")
    rng = np.random.default_rng(1)
    rows = [featurizer.generation_inputs((rng.standard_normal(int(16000 * s)) * 0.1).astype(np.float32))
            for s in seconds]
    return collate_prompts(rows, processor.tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    stock = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_model_dir).eval()
    ours = load_model(tiny_model_dir).eval()
    assert type(ours.model.audio_tower) is SoundOnlyEncoder and type(stock.model.audio_tower) is not SoundOnlyEncoder
    return stock, ours


def _conv_input_frames(model, inputs) -> tuple[torch.Tensor, int]:
    seen = []
    hook = model.model.audio_tower.conv1.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[-1]))
    try:
        with torch.no_grad():
            out = model.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
    finally:
        hook.remove()
    return out, seen[0]


@pytest.mark.parametrize("seconds", [[1.0, 3.5, 10.0], [2.2], [7.3, 35.0, 0.4]])
def test_same_audio_embeddings_as_the_stock_encoder(models, processor, seconds):
    stock, ours = models
    inputs = _inputs(processor, seconds)
    want, stock_frames = _conv_input_frames(stock, inputs)
    got, our_frames = _conv_input_frames(ours, inputs)
    assert stock_frames == 3000
    # frames up to the longest clip (+2, to a multiple of 4), unless one window is full (the 35 s clip)
    longest = int(inputs["input_features_mask"].sum(-1).max())
    assert our_frames == min(3000, -(-(longest + 2) // 4) * 4)
    assert (our_frames < 3000) == (max(seconds) < 29.9)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_eager_attention_takes_the_same_key_mask(models, processor):
    """The key-only mask (batch, 1, 1, positions) in its additive form for eager attention: the same
    embeddings as the stock encoder under sdpa, for clips of different lengths in one batch."""
    stock, ours = models
    inputs = _inputs(processor, [1.0, 3.5, 10.0])
    want, _ = _conv_input_frames(stock, inputs)
    tower = ours.model.audio_tower
    implementation = tower.config._attn_implementation
    tower.config._attn_implementation = "eager"
    try:
        got, _ = _conv_input_frames(ours, inputs)
    finally:
        tower.config._attn_implementation = implementation
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_same_greedy_captions_as_the_stock_encoder(models, processor):
    stock, ours = models
    inputs = _inputs(processor, [1.5, 6.0, 9.9, 4.0])
    eos = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = processor.tokenizer.pad_token_id
    assert generate_tokens(ours, inputs, 12, eos, pad) == generate_tokens(stock, inputs, 12, eos, pad)


def test_frames_needed():
    mask = torch.zeros(3, 3000, dtype=torch.int32)
    mask[0, :100] = 1
    mask[1, :37] = 1
    assert frames_needed(mask) == 104  # 100 + 2 frames the convolutions read, to a multiple of 4
    mask[2, :2999] = 1
    assert frames_needed(mask) == 3000
