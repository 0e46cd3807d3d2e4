import hashlib
from pathlib import Path

import numpy as np
import torch
from transformers import AudioFlamingo3ForConditionalGeneration, AudioFlamingo3Processor, AutoProcessor

from af3dist.embedded.assets import tokenizer_corpus
from af3dist.config import TinyModelConfig
from af3dist.embedded.tiny_model import build_tiny_model, ensure_tiny_model


def test_loads_offline_with_the_real_classes(tiny_model_dir):
    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_model_dir)
    assert isinstance(processor, AudioFlamingo3Processor)
    tok = processor.tokenizer
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    for special in ("<|im_start|>", "<|im_end|>", "<sound>", "<|endoftext|>"):
        assert tok.convert_tokens_to_ids(special) is not None
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1
    assert model.config.audio_token_id == tok.convert_tokens_to_ids("<sound>") != tok.pad_token_id
    assert model.config.text_config.vocab_size >= len(tok)
    assert processor.feature_extractor.feature_size == model.config.audio_config.num_mel_bins == 128
    assert model.num_parameters() < 1_000_000
    # like the real checkpoint: sampling by default, so evaluation must ask for greedy
    assert model.generation_config.do_sample is True


def test_chat_template_has_the_af3_shape(processor):
    conv = [{"role": "user", "content": [{"type": "text", "text": "Describe the audio."}, {"type": "audio"}]}]
    text = processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\n<sound>Describe the audio.<|im_end|>\n<|im_start|>assistant\n")
    own_system = [{"role": "system", "content": "Be brief."}] + conv
    assert "helpful assistant" not in processor.apply_chat_template(own_system, tokenize=False)


def test_forward_backward_and_generate(tiny_model_dir, processor):
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(tiny_model_dir)
    conv = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Describe the audio."}]}]
    text = processor.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    audio = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32) * 0.1
    inputs = processor(text=[text], audio=[audio])
    out = model(**inputs, labels=inputs["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    generated = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 4 or processor.tokenizer.eos_token_id in generated


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def test_deterministic_from_seed_and_rebuilt_only_when_settings_change(tmp_path):
    corpus = tokenizer_corpus("Describe the audio.")
    a = build_tiny_model(tmp_path / "a", TinyModelConfig(seed=3), corpus)
    b = build_tiny_model(tmp_path / "b", TinyModelConfig(seed=3), corpus)
    c = build_tiny_model(tmp_path / "c", TinyModelConfig(seed=4), corpus)
    assert _digest(a) == _digest(b) != _digest(c)
    stamp = (a / "model.safetensors").stat().st_mtime_ns
    ensure_tiny_model(a, TinyModelConfig(seed=3), corpus)
    assert (a / "model.safetensors").stat().st_mtime_ns == stamp
    ensure_tiny_model(a, TinyModelConfig(seed=4), corpus)
    assert _digest(a) == _digest(c)
