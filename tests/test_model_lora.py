"""LoRA scoping, gradient checkpointing with PEFT, the DeepSpeed config, merging and batched captioning."""

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AudioFlamingo3ForConditionalGeneration

from af3dist.config import LoraConfig, TrainConfig
from af3dist.embedded.encoding import encode_audio
from af3dist.embedded.sounds import generate_clip
from af3dist.inference import Captioner
from af3dist.model.loading import add_lora, avoid_cudnn_attention, enable_gradient_checkpointing, load_model
from af3dist.model.merge import merge_adapter
from af3dist.training.deepspeed_config import deepspeed_config


def _lora_modules(model) -> list[str]:
    return [n for n, _ in model.named_modules() if n.endswith("lora_A")]


def test_lora_lands_on_the_language_model_only(tiny_model_dir):
    model = add_lora(load_model(tiny_model_dir), LoraConfig())
    lora = _lora_modules(model)
    assert lora and all(".language_model." in n for n in lora)
    assert not any("audio_tower" in n or "multi_modal_projector" in n for n in lora)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("audio_tower" in n for n in trainable)  # encoder frozen
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)  # projector trained fully
    assert all("lora_" in n or "modules_to_save" in n for n in trainable)


def test_encoder_lora_and_frozen_projector_only_when_asked(tiny_model_dir):
    model = add_lora(load_model(tiny_model_dir),
                     LoraConfig(scope="language_model+audio_tower", train_projector=False))
    lora = _lora_modules(model)
    assert any("audio_tower" in n for n in lora) and any("language_model" in n for n in lora)
    assert not any("multi_modal_projector" in n for n, p in model.named_parameters() if p.requires_grad)


def _example_batch(processor, seconds=3.0):
    from af3dist.data.batching import collate
    from af3dist.data.features import Featurizer

    f = Featurizer(processor, "Describe the audio.")
    rng = np.random.default_rng(0)
    rows = []
    for caption in ("A low hum.", "White noise hisses loudly."):
        ex = f.training_example(rng.standard_normal(int(16000 * seconds)).astype(np.float32) * 0.1, caption)
        rows.append(ex)
    return collate(rows, processor.tokenizer.pad_token_id)


def test_gradient_checkpointing_with_peft_gives_the_same_gradients(tiny_model_dir, processor):
    batch = _example_batch(processor)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = add_lora(load_model(tiny_model_dir), LoraConfig(dropout=0.0))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        model(**batch).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert any(g.abs().sum() > 0 for n, g in grads[1].items() if "lora_B" in n or "modules_to_save" in n)
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_deepspeed_config_from_ours():
    ds = deepspeed_config(TrainConfig(micro_batch_size=4, grad_accum_steps=3, zero_stage=3, max_steps=99,
                                      lr_schedule="linear"), world_size=2, bf16=True)
    assert ds["train_batch_size"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] is True and ds["optimizer"]["type"] == "AdamW"
    assert ds["scheduler"]["type"] == "WarmupDecayLR" and ds["scheduler"]["params"]["total_num_steps"] == 99


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory, processor):
    """An adapter with non-trivial weights, as training would leave it."""
    torch.manual_seed(1)
    model = add_lora(load_model(tiny_model_dir), LoraConfig())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return str(out)


def _clips():
    rng = np.random.default_rng(3)
    specs = [("low_tone", 10.0, 48000, 2, "flac"), ("white_noise", 3.0, 16000, 1, "wav"),
             ("beeps", 40.0, 44100, 1, "mp3"), ("clicks", 1.5, 22050, 2, "ogg")]
    return [encode_audio(generate_clip(rng, label, d, sr, ch), sr, fmt) for label, d, sr, ch, fmt in specs]


def test_batched_captions_equal_one_by_one(adapter_dir):
    captioner = Captioner.load(adapter_dir, max_new_tokens=12)
    clips = _clips()
    batched = captioner.caption(clips, batch_size=4)
    single = [captioner.caption(c) for c in clips]
    assert batched == single
    assert len(set(single)) > 1  # the inputs really differ in what comes out


def test_captioner_accepts_paths_bytes_and_arrays(adapter_dir, tmp_path):
    import soundfile as sf

    captioner = Captioner.load(adapter_dir, max_new_tokens=8)
    clip = generate_clip(np.random.default_rng(0), "high_tone", 2.0, 44100, 1)
    path = tmp_path / "clip.flac"
    sf.write(path, clip, 44100)
    from_path = captioner.caption(str(path))
    assert from_path == captioner.caption(path.read_bytes())
    assert from_path == captioner.caption((clip, 44100))
    assert isinstance(captioner.caption(str(path), prompt="What do you hear?"), str)


def test_merged_model_loads_without_peft_and_gives_the_same_tokens(adapter_dir, tmp_path):
    merged = merge_adapter(adapter_dir, str(tmp_path / "merged"))
    plain = AudioFlamingo3ForConditionalGeneration.from_pretrained(merged)
    assert not isinstance(plain, PeftModel)
    assert not any("lora" in n or "modules_to_save" in n for n, _ in plain.named_parameters())
    clips = _clips()
    with_adapter = Captioner.load(adapter_dir, max_new_tokens=12).caption(clips)
    assert Captioner.load(str(merged), max_new_tokens=12).caption(clips) == with_adapter


def test_on_cuda_load_model_takes_cudnn_out_of_attention(tiny_model_dir, monkeypatch):
    # cuDNN's attention builds a plan per new shape (0.1 s a decoding step on an H200); no GPU here, so the
    # switch is watched rather than the kernel.
    assert not avoid_cudnn_attention()  # without CUDA nothing is touched
    switched = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cuda, "cudnn_sdp_enabled", lambda: not switched)
    monkeypatch.setattr(torch.backends.cuda, "enable_cudnn_sdp", switched.append)
    load_model(tiny_model_dir)
    load_model(tiny_model_dir)
    assert switched == [False]
