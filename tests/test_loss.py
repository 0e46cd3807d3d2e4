"""The label-only loss against transformers' full-logits loss, token-budget batches, the checkpointing
choice, and the folder swap; all on CPU without Ray."""

import os
import types

import numpy as np
import pytest
import torch

from af3dist.config import LoraConfig
from af3dist.data.batching import collate, cut_batches
from af3dist.data.features import Featurizer
from af3dist.storage import building_folder
from af3dist.model.loading import add_lora, load_model
from af3dist.training.loss import label_loss_sum, label_positions
from af3dist.training.memory import activation_bytes, choose_gradient_checkpointing, micro_batch_tokens


def _rows(model_dir: str, lengths=(3, 10, 35)) -> list[dict]:
    featurizer = Featurizer.from_pretrained(model_dir, "Describe the audio.")
    rng = np.random.default_rng(0)
    captions = ["a dog barks twice", "rain falls on a tin roof loudly", "a car passes"]
    return [featurizer.training_example(0.1 * rng.standard_normal(16000 * s).astype(np.float32), c)
            for s, c in zip(lengths, captions)], featurizer.processor.tokenizer.pad_token_id


def _lora_model(model_dir: str, vocab_size: int | None = None):
    torch.manual_seed(0)
    model = load_model(model_dir, torch.float32)
    if vocab_size:  # a larger vocabulary than the tiny tokenizer's, to see what the logits cost
        model.resize_token_embeddings(vocab_size)
    model = add_lora(model, LoraConfig(dropout=0.0))
    with torch.no_grad():  # LoRA B starts at zero: give it values so its gradients are not trivially equal
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    return model.train()


def _trainable_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])


def test_label_only_loss_and_gradients_equal_transformers(tiny_model_dir):
    rows, pad = _rows(tiny_model_dir)
    batch = collate(rows, pad)
    model = _lora_model(tiny_model_dir)
    reference = model(**batch).loss
    reference.backward()
    ref_grads = _trainable_grads(model)
    model.zero_grad()
    loss_sum, n = label_loss_sum(model, batch)
    assert n == int((batch["labels"][:, 1:] != -100).sum()) > 0
    (loss_sum / n).backward()
    grads = _trainable_grads(model)
    assert float(loss_sum / n) == pytest.approx(float(reference), rel=1e-5)
    assert torch.nn.functional.cosine_similarity(grads, ref_grads, dim=0) >= 0.99999
    assert grads.shape == ref_grads.shape and float(grads.abs().sum()) > 0


def test_label_positions_are_the_next_token_targets():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, 8, 9, 10]])
    keep, targets = label_positions(labels)
    assert keep.tolist() == [[False, True, True, False, False], [True, True, True, True, False]]
    assert targets.tolist() == [5, 6, 7, 8, 9, 10]


def test_logits_memory_is_labels_times_vocab_not_batch_times_sequence(tiny_model_dir):
    vocab = 32768
    rows, pad = _rows(tiny_model_dir)
    batch = collate(rows, pad)
    model = _lora_model(tiny_model_dir, vocab_size=vocab)
    seen: list[int] = []
    head = model.get_base_model().lm_head
    hook = head.register_forward_hook(lambda mod, inp, out: seen.append(out.numel() * out.element_size()))
    try:
        with torch.no_grad():
            model(**batch)
            _, n = label_loss_sum(model, batch)
    finally:
        hook.remove()
    full, ours = seen
    b, t = batch["input_ids"].shape
    assert full == b * t * vocab * 4 and ours == n * vocab * 4
    assert ours * 10 < full, (ours, full)  # ~30 labelled of ~1300 positions here


def test_micro_batches_cut_by_a_token_budget():
    rows = [{"num_tokens": n, "num_windows": 1} for n in sorted([100, 100, 120, 250, 260, 300, 750, 760])]
    batches = cut_batches(rows, batch_size=8, max_tokens=800)
    assert all(len(b) * max(r["num_tokens"] for r in b) <= 800 for b in batches)
    assert [len(b) for b in batches] == [3, 2, 1, 1, 1]
    assert sum(len(b) for b in batches) == len(rows)
    assert [len(b) for b in cut_batches(rows, batch_size=3)] == [3, 3, 2]
    assert [len(b) for b in cut_batches(rows, batch_size=2, max_tokens=10_000)] == [2, 2, 2, 2]


def test_gradient_checkpointing_auto_by_memory(monkeypatch):
    qwen7b = types.SimpleNamespace(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28)
    tokens = micro_batch_tokens(16, 10.0, None)
    assert tokens == 16 * (250 + 96)
    need = activation_bytes(qwen7b, tokens)
    assert 20 * 2**30 < need < 60 * 2**30  # tens of GiB: the scale measured on the H200
    assert choose_gradient_checkpointing(True, qwen7b, tokens, torch.device("cpu"))[0] is True
    assert choose_gradient_checkpointing(False, qwen7b, tokens, torch.device("cuda"))[0] is False
    on, why = choose_gradient_checkpointing("auto", qwen7b, tokens, torch.device("cpu"))
    assert on is False and "CPU" in why
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (120 * gib, 141 * gib))  # an H200
    on, why = choose_gradient_checkpointing("auto", qwen7b, tokens, torch.device("cuda"))
    assert on is False and "off" in why
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (24 * gib, 40 * gib))  # an A100 40 GB
    on, why = choose_gradient_checkpointing("auto", qwen7b, tokens, torch.device("cuda"))
    assert on is True and "on" in why
    with pytest.raises(ValueError):
        choose_gradient_checkpointing("sometimes", qwen7b, tokens, torch.device("cpu"))


def test_folder_swap_never_leaves_no_folder(tmp_path):
    dst = tmp_path / "adapter"
    with building_folder(dst) as tmp:
        (tmp / "v").write_text("1")
    with building_folder(dst) as tmp:
        (tmp / "v").write_text("2")
    assert (dst / "v").read_text() == "2" and not list(tmp_path.glob(".adapter.*"))
    # a kill between the two renames leaves the old folder aside and none in place: the next build restores it
    os.replace(dst, tmp_path / ".adapter.old-12345")
    with pytest.raises(RuntimeError):
        with building_folder(dst) as tmp:
            assert (dst / "v").read_text() == "2"  # put back before anything else happens
            raise RuntimeError("the new build fails")
    assert (dst / "v").read_text() == "2" and not list(tmp_path.glob(".adapter.*"))
