"""The training loss, computed only where there are labels.

A captioning batch holds ~280 positions a clip (250 `<sound>` tokens, the chat template, the caption) but
only the ~15 caption tokens have labels. transformers' loss projects every position onto the 151,672-token
vocabulary (an fp32 logits tensor of B x T x V, ~2.7 GB a micro batch of 16 for the real AF3) and then
ignores all but those. Here the model's body runs as usual, and the LM head and an fp32 cross-entropy run
on the labelled positions only (`logits_to_keep` with a boolean mask, transformers' public argument for
it): N_labels x V logits, the same loss and gradients.

`label_loss_sum` returns a sum and a count, so the loop can normalise by the label tokens of the whole
global batch (every micro batch of a gradient-accumulation window, every rank): each token weighs the same
however the tokens fall into micro batches, which is what makes batches cut by a token budget exact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from af3dist.data.features import IGNORE_INDEX


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(boolean (B, T) mask of the positions whose next token is labelled, those next tokens (N,)) in
    row-major order, the order in which transformers flattens the kept positions."""
    following = labels[:, 1:]
    labelled = following != IGNORE_INDEX
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labelled
    return keep, following[labelled]


def label_loss_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed fp32 next-token cross-entropy over the labelled positions, how many there are) for one
    micro batch; `model` is the AF3 model or any wrapper (peft, DeepSpeed) that passes keyword arguments on."""
    keep, targets = label_positions(batch["labels"])
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=keep, use_cache=False).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets, reduction="sum")
    return loss, int(targets.numel())
