"""AF3's audio encoder without the work on padding.

The processor pads every clip to a 30 s window (3000 log-mel frames) and the encoder masks the padded
frames in attention, so on ~10 s AudioCaps clips about two thirds of its work yields positions nothing
reads. `SoundOnlyEncoder` runs the same layers on the batch's frames up to its longest clip (plus the
two frames the convolutions look past a clip's end) with the matching slice of the position table: the
same outputs at every position the model uses (to float rounding; tests/test_encoder.py checks it
against the stock forward), a fraction of the cost for short clips. Full windows run unchanged.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.audioflamingo3.modeling_audioflamingo3 import AudioFlamingo3Encoder

# conv1 (kernel 3) and conv2 (kernel 3, stride 2) read up to two frames past a clip's last frame; a
# multiple of 4 frames keeps the pooled length whole.
_MARGIN_FRAMES, _ALIGN_FRAMES = 2, 4


def frames_needed(input_features_mask: torch.Tensor) -> int:
    """Leading frames of the window that every valid output position of the batch depends on."""
    full = input_features_mask.shape[-1]
    longest = int(input_features_mask.sum(-1).max()) if input_features_mask.numel() else full
    return min(full, -(-(longest + _MARGIN_FRAMES) // _ALIGN_FRAMES) * _ALIGN_FRAMES)


class SoundOnlyEncoder(AudioFlamingo3Encoder):
    """AudioFlamingo3Encoder whose forward skips the window's trailing padding (see the module docstring).

    The body is the stock forward (transformers 5.x) with the input cut and the position table sliced.
    """

    def forward(self, input_features: torch.Tensor, input_features_mask: torch.Tensor | None = None,
                **kwargs) -> BaseModelOutputWithPooling:
        if input_features_mask is None or kwargs.get("output_hidden_states") or kwargs.get("output_attentions"):
            return super().forward(input_features, input_features_mask, **kwargs)
        keep = frames_needed(input_features_mask)
        input_features = input_features[..., :keep]
        input_features_mask = input_features_mask[..., :keep]

        seq_len = (input_features.shape[-1] - 1) // 2 + 1  # after conv2's stride
        lengths = (input_features_mask.sum(-1) - 1) // 2 + 1
        attention_mask = torch.arange(seq_len, device=input_features.device) < lengths[:, None]

        inputs_embeds = nn.functional.gelu(self.conv1(input_features))
        inputs_embeds = nn.functional.gelu(self.conv2(inputs_embeds)).permute(0, 2, 1)
        hidden_states = inputs_embeds + self.embed_positions.weight[:seq_len]
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        attention_mask = self._key_mask(hidden_states, attention_mask)
        for layer in self.layers:
            if self.training and self.layerdrop > 0.0 and torch.rand([]) < self.layerdrop:
                continue
            hidden_states = layer(hidden_states, attention_mask)

        hidden_states = self.avg_pooler(hidden_states.permute(0, 2, 1)).permute(0, 2, 1)
        return BaseModelOutputWithPooling(last_hidden_state=self.layer_norm(hidden_states))

    def _key_mask(self, hidden_states: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """The attention mask for `valid` (batch, positions) keys. A padded position is masked as a key only
        (bidirectional attention: every query sees every valid key), so for sdpa and eager attention a
        (batch, 1, 1, positions) mask that broadcasts over queries gives the same numbers as the
        (batch, 1, positions, positions) one `create_bidirectional_mask` builds, which each attention call
        then converted to an additive mask: most of a short clip's encoder time on CPU. None when no key
        is padded (the same as an all-true mask)."""
        implementation = self.config._attn_implementation
        if implementation not in ("sdpa", "eager"):
            return create_bidirectional_mask(config=self.config, inputs_embeds=hidden_states, attention_mask=valid)
        if bool(valid.all()):
            return None
        keys = valid[:, None, None, :]
        if implementation == "sdpa":
            return keys
        return torch.zeros(keys.shape, dtype=hidden_states.dtype, device=keys.device).masked_fill(
            ~keys, torch.finfo(hidden_states.dtype).min)


def skip_audio_padding(model: nn.Module) -> nn.Module:
    """Make the AF3 model's audio encoder a SoundOnlyEncoder, in place; returns the model."""
    for module in model.modules():
        if type(module) is AudioFlamingo3Encoder:
            module.__class__ = SoundOnlyEncoder
    return model
