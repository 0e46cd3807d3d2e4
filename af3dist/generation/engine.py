"""One AF3 generation engine: prefill, a slotted KV cache, a lean decode step, per-row stop and detokenization.

Serving (continuous batching), batch captioning, evaluation and `Captioner` all generate through
`GenerationEngine`; none calls `model.generate`. Why not `generate`: its per-step machinery (logits processors,
stopping criteria, a mask and a growing cache rebuilt every step) costs more than the model itself at small
batch, it cannot take a request into a running batch, and its sampler draws from one global RNG, so a sampled
row depends on its batch-mates.

- KV cache: per layer one K and one V tensor of shape (slots, kv_heads, max_len, head_dim), allocated once
  (grown, by copy, only if a request needs a longer context than it was made for). A request owns a slot from
  its prefill to its last token; a finished row frees its slot at once.
- Prefill: the padding-free encoder and the projector over the new requests' windows, then the Qwen2 layers
  over the prompts RIGHT-padded, in groups of similar length: causal attention means no prompt token ever sees
  padding, so each row's keys, values and last logits are those of the row alone. Every row has its own
  positions 0..n-1; generate's left padding with mask-derived positions computes the same thing.
- Decode: one token per active row through the Qwen2 layers called directly (LoRA layers included: peft
  injects them into the same modules), each row attending to its own slot up to its own position. Greedy is an
  argmax on device; a sampled row draws from its own `torch.Generator` seeded from its request's seed, so its
  tokens never depend on what else is in the batch, and sampled rows batch like greedy ones.
- On CUDA the decode step can be compiled with CUDA graphs (`torch.compile(mode="reduce-overhead")`) over
  static shapes: the slot count rounded up to a bucket and the whole cache length. CPU runs it eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from af3dist.data.batching import audio_inputs
from af3dist.model.encoder import SoundOnlyEncoder

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Slot-count buckets the compiled (CUDA graph) decode step is captured for.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# What one more prefill group costs on CPU, in padded prompt tokens (measured with the tiny model: a group's
# Python and per-op overhead against the per-token work of the encoder and the layers).
CPU_GROUP_COST = 512


@dataclass
class GenRequest:
    """One featurized request: `features` holds input_ids (the prompt, unpadded), input_features (its log-mel
    windows) and input_features_mask, as `Featurizer.generation_inputs` makes them (numpy or torch).

    `adapter` is for the caller that owns adapters (the engine generates with whatever is active);
    `stop` strings end the answer before them; `on_text` receives each new piece of text as it is decoded
    (streaming), from the thread that runs the engine."""

    features: dict[str, Any]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    adapter: str | None = None
    stop: list[str] | None = None
    on_text: Callable[[str], None] | None = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        # A callback never crosses a process boundary (the Serve replica sets its own).
        return {**self.__dict__, "on_text": None}


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (<|im_end|> or a stop string) or "length"
    prompt_tokens: int


@dataclass
class GenFailure:
    """A request generation failed for (a bug or a device fault: its inputs were checked before); the rest of
    its batch is unaffected. `error` names the exception type only, never request content."""

    error: str


def prompt_ids(features: dict[str, Any]) -> np.ndarray:
    """The prompt of a featurized row: all of input_ids, or everything before its labelled caption when the
    row carries `labels` (validation rows are training rows)."""
    ids = np.asarray(features["input_ids"], dtype=np.int64)
    if "labels" in features:
        labelled = np.asarray(features["labels"]) != IGNORE_INDEX
        if labelled.any():
            return ids[: int(np.argmax(labelled))]
    return ids


def af3_of(model: nn.Module) -> nn.Module:
    """The AudioFlamingo3ForConditionalGeneration inside a DeepSpeed engine and/or a peft model. Its modules are
    the ones peft injected LoRA into, so calling them runs the active adapter (or none under disable_adapter)."""
    model = getattr(model, "module", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def sample_token(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
    """One token id from one row's logits: temperature, then nucleus (top-p) filtering, then a draw from the
    row's own generator. Depends on nothing but its arguments."""
    logits = logits.float() / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - top_p
        drop[-1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[0]


class _PrefillCache:
    """What Qwen2Attention sees as its cache during a prefill: it writes each layer's keys and values for
    positions 0..T-1 into the rows' slots and hands them back unchanged (a prompt attends to itself only)."""

    def __init__(self, kv: "KVSlots", slots: torch.Tensor):
        self.kv, self.slots = kv, slots

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        t = key.shape[2]
        self.kv.k[layer_idx][self.slots, :, :t] = key
        self.kv.v[layer_idx][self.slots, :, :t] = value
        return key, value


class KVSlots:
    """Per layer one tensor of shape (slots, 2 * kv_heads, max_len, head_dim), allocated once: a slot's K heads
    then its V heads, so that a decode step writes a row's new keys and values (adjacent in the fused q|k|v
    projection's output) with one copy. `k[i]` and `v[i]` are views of layer i's K and V halves."""

    def __init__(self, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.kv_heads = kv_heads
        self.layers = [torch.zeros((slots, 2 * kv_heads, max_len, head_dim), dtype=dtype, device=device)
                       for _ in range(layers)]
        self.slots, self.max_len = slots, max_len
        self._views()

    def _views(self) -> None:
        self.k = [kv[:, : self.kv_heads] for kv in self.layers]
        self.v = [kv[:, self.kv_heads:] for kv in self.layers]

    def grow(self, max_len: int) -> None:
        """A longer cache holding what this one holds (a request needs more context than it was sized for)."""
        for i, old in enumerate(self.layers):
            new = old.new_zeros((*old.shape[:2], max_len, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            self.layers[i] = new
        self.max_len = max_len
        self._views()


@dataclass
class _Tables:
    arange: torch.Tensor
    sign: torch.Tensor
    cos: torch.Tensor | None
    sin: torch.Tensor | None
    slot_starts: torch.Tensor  # where each slot starts in a layer's flat cache of head_dim rows
    head_starts: torch.Tensor  # and each of its K then V heads within the slot


@dataclass
class _LayerPlan:
    """A decoder layer's weights as plain tensors for the decode step's float32 CPU path (see _make_plans)."""

    ln1: torch.Tensor
    eps1: torch.Tensor
    ln2: torch.Tensor
    eps2: torch.Tensor
    width: torch.Tensor  # the hidden size, as a 0-dim tensor (see _rms)
    qkv: torch.Tensor
    qkv_bias: torch.Tensor
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor
    down_bias: torch.Tensor | None
    act: Callable[[torch.Tensor], torch.Tensor]
    scaling: float


@dataclass
class _TailPlan:
    """The token embedding, final norm and LM head as tensors (see _make_plans)."""

    embed: torch.Tensor
    norm: torch.Tensor
    eps: torch.Tensor
    width: torch.Tensor
    head: torch.Tensor
    head_bias: torch.Tensor | None


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: torch.Tensor, width: torch.Tensor) -> torch.Tensor:
    """Qwen2RMSNorm on float32 CPU activations, the same numbers with less work per op: its casts are no-ops,
    x * x is how pow(2) computes, a CPU mean is a sum then a division by the count, and float32 0-dim tensors
    in place of the Python count and epsilon skip wrapping and converting a scalar in every op (the op casts
    it to float32 either way)."""
    return weight * (x * (x * x).sum(-1, keepdim=True).div_(width).add_(eps).rsqrt_())


@dataclass
class _Row:
    """A request in flight: its slot, its tokens so far, its sampler and its streaming state."""

    key: Any  # the caller's name for the request (its place in a list, an id)
    request: GenRequest
    slot: int
    prompt_len: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)
    sent: str = ""  # text already streamed
    finish: str | None = None
    text: str | None = None


class GenerationEngine:
    """Generates for featurized requests with one AF3 model (base, peft-wrapped or merged), continuously:
    `admit` prefills requests into free slots, `step` decodes one token for every row in flight and returns
    the rows that finished. `generate` runs that loop to the end for a list of requests (offline callers).

    `isolate_failures`: a request that fails comes back as a GenFailure and the others are answered (serving);
    without it the first exception propagates, with nothing left in flight (offline callers, which retry as
    they see fit). Not thread-safe: one thread drives it (the Serve replica's scheduler, or the offline caller).
    """

    def __init__(self, model: nn.Module, tokenizer, max_batch_size: int = 32, max_len: int = 2048,
                 prefill_tokens: int = 32768, compile_decode: bool | None = None, synced_gpus: bool = False,
                 isolate_failures: bool = True):
        self.model = model
        self.isolate_failures = isolate_failures
        self.af3 = af3_of(model)
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_token_id = tokenizer.pad_token_id
        self.audio_token_id = self.af3.config.audio_token_id
        self.max_batch_size = max_batch_size
        self.max_len = max_len
        self.prefill_tokens = prefill_tokens
        self.synced_gpus = synced_gpus
        param = next(self.af3.parameters())
        self.device, self.dtype = param.device, param.dtype
        # A prefill group's fixed cost in padded-token equivalents (see _prefill_groups): on CPU work grows with
        # tokens, so a few hundred; on an accelerator the budget alone bounds a group.
        self.group_cost = CPU_GROUP_COST if self.device.type == "cpu" else prefill_tokens
        self.compile_decode = self.device.type == "cuda" if compile_decode is None else compile_decode
        self.kv: KVSlots | None = None
        self.rows: dict[int, _Row] = {}  # slot -> row in flight
        self._compiled: dict[int, Callable] = {}
        self._fused: dict[int, tuple] = {}  # id(layer) -> (weight stamps, fused weights), see _make_plans
        self._plans: tuple[list[_LayerPlan | None], _TailPlan | None] | None = None
        # (slots, chosen tokens, positions, top position) of the last step, while its rows stay in flight
        self._carry: tuple[list[int], torch.Tensor, torch.Tensor, int] | None = None
        self._tables: _Tables | None = None
        self._scalars: dict[float, torch.Tensor] = {}  # see _scalar
        self.zero3 = hasattr(param, "ds_id")  # DeepSpeed ZeRO-3 partitions parameters: only modules see them
        self.steps = 0  # decode steps run (for stats and tests)

    # Model parts ---------------------------------------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        return self.af3.model.language_model

    def _attention_mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """`allowed` (rows, 1, q, k) bool -> the mask form this attention implementation takes."""
        if self.lm.config._attn_implementation == "sdpa":
            return allowed
        return torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(self.dtype).min)

    def _layers(self, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                cache: _PrefillCache) -> torch.Tensor:
        lm = self.lm
        rope = lm.rotary_emb(hidden, positions)
        for layer in lm.layers[: lm.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=mask, position_embeddings=rope, position_ids=positions,
                           cache=cache)
        return lm.norm(hidden)

    def _ensure_cache(self, need_len: int) -> KVSlots:
        cfg = self.lm.config
        if self.kv is None:
            head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            self.kv = KVSlots(cfg.num_hidden_layers, self.max_batch_size, cfg.num_key_value_heads,
                              max(self.max_len, need_len), head_dim, self.dtype, self.device)
            self._compiled.clear()
        elif need_len > self.kv.max_len:
            log.warning("growing the KV cache from %d to %d positions", self.kv.max_len, need_len)
            self.kv.grow(need_len)
            self._compiled.clear()
        return self.kv

    # Admission and prefill ------------------------------------------------------------------------------------
    @property
    def free_slots(self) -> int:
        return self.max_batch_size - len(self.rows)

    def admit(self, requests: Sequence[GenRequest], keys: Sequence[Any] | None = None
              ) -> list[tuple[Any, GenResult | GenFailure]]:
        """Prefill `requests` (at most `free_slots`) into free slots, lowest first; each gets its first token.
        `keys` name the requests in what this and `step` return (default: their places in `requests`).
        Returns (key, outcome) for those already done (failed, or finished at their first token); the others
        are in flight. A prefill group that raises is retried row by row, so only a failing request fails."""
        if len(requests) > self.free_slots:
            raise ValueError(f"{len(requests)} requests for {self.free_slots} free slots")
        keys = list(range(len(requests))) if keys is None else list(keys)
        done: list[tuple[Any, GenResult | GenFailure]] = []
        fresh: list[_Row] = []
        free = iter(s for s in range(self.max_batch_size) if s not in self.rows)
        for key, r in zip(keys, requests):
            try:
                generator = None
                if r.temperature > 0:
                    generator = torch.Generator(device=self.device)
                    generator.manual_seed(r.seed if r.seed is not None else int(torch.seed() % 2**63))
                ids = prompt_ids(r.features)
                if r.max_tokens < 1 or len(ids) == 0:
                    raise ValueError("a request needs a prompt and max_tokens >= 1")
            except Exception as err:  # noqa: BLE001 - this request fails, alone
                if not self.isolate_failures:
                    raise
                log.exception("request refused at admission")
                done.append((key, GenFailure(type(err).__name__)))
                continue
            fresh.append(_Row(key, r, next(free), len(ids), generator))
        self._ensure_cache(max((row.prompt_len + row.request.max_tokens for row in fresh), default=0))
        self._plans = None  # made again at the next step: weights may have changed since the last admission
        self._carry = None  # the next step's rows differ from the last one's
        for group in self._prefill_groups(fresh):
            try:
                self._prefill(group)
            except Exception as err:  # noqa: BLE001 - find the request that fails; the others still get answers
                if not self.isolate_failures:
                    self.rows.clear()
                    raise
                if len(group) == 1:
                    log.exception("prefill failed for one request")
                    done.append((group[0].key, GenFailure(type(err).__name__)))
                    continue
                log.exception("a prefill of %d failed; prefilling its requests one by one", len(group))
                for row in group:
                    try:
                        self._prefill([row])
                    except Exception as err:  # noqa: BLE001
                        log.exception("prefill failed for one request")
                        done.append((row.key, GenFailure(type(err).__name__)))
        done.extend(self._collect())
        return done

    def _prefill_groups(self, rows: list[_Row]) -> list[list[_Row]]:
        """Rows sorted by prompt length, cut into runs that minimise the prefill's cost: each group pays its
        padded tokens (rows x longest prompt, at most `prefill_tokens`) plus a fixed `group_cost` in tokens
        (one more pass of Python and kernel launches). A short prompt batched with a long one computes the
        long one's padding and, in the encoder, frames up to the longest clip, so on CPU, where work is
        proportional to tokens, splitting where lengths jump is faster; where the fixed cost dominates (CUDA)
        this keeps one group within the budget. One group with synced_gpus: every rank must run the same
        forwards. An exact dynamic programme over the sorted rows (optimal cuts of a sorted list are runs)."""
        if self.synced_gpus:
            return [rows] if rows else []
        rows = sorted(rows, key=lambda r: r.prompt_len)
        n = len(rows)
        best = [0.0] + [float("inf")] * n  # best[j]: cheapest cover of rows[:j]
        cut = [0] * (n + 1)  # cut[j]: where the last group of that cover starts
        for j in range(1, n + 1):
            longest = rows[j - 1].prompt_len
            for i in range(j - 1, -1, -1):
                if i < j - 1 and (j - i) * longest > self.prefill_tokens:
                    break
                cost = best[i] + self.group_cost + (j - i) * longest
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        groups: list[list[_Row]] = []
        while n:
            groups.append(rows[cut[n]: n])
            n = cut[n]
        return groups[::-1]

    @torch.no_grad()
    def _prefill(self, rows: list[_Row]) -> None:
        af3 = self.af3
        ids = [torch.as_tensor(prompt_ids(r.request.features)) for r in rows]
        longest = max(len(i) for i in ids)
        input_ids = torch.full((len(rows), longest), self.pad_token_id, dtype=torch.long)
        for i, seq in enumerate(ids):
            input_ids[i, : len(seq)] = seq
        input_ids = input_ids.to(self.device)
        embeds = af3.get_input_embeddings()(input_ids)
        if sum(len(r.request.features["input_features_mask"]) for r in rows):
            features, mask = audio_inputs([r.request.features for r in rows], self._frames())
            features, mask = features.to(self.device, self.dtype), mask.to(self.device, torch.long)
            audio = af3.get_audio_features(features, mask, return_dict=True).pooler_output
            where = input_ids == self.audio_token_id
            if int(where.sum()) != audio.shape[0]:
                raise ValueError("the prompt's <sound> tokens do not match its audio")
            embeds[where] = audio.to(embeds.dtype)
        positions = torch.arange(longest, device=self.device).expand(len(rows), longest)
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        mask = None
        if self.lm.config._attn_implementation != "sdpa":  # sdpa is causal without a mask
            causal = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
            mask = self._attention_mask(causal.expand(len(rows), 1, longest, longest))
        hidden = self._layers(embeds, positions, mask, _PrefillCache(self.kv, slots))
        last = torch.tensor([len(i) - 1 for i in ids], device=self.device)
        logits = af3.lm_head(hidden[torch.arange(len(rows), device=self.device), last])
        for row, token in zip(rows, self._choose(logits, rows).tolist()):
            self.rows[row.slot] = row
            self._append(row, token)

    def _frames(self) -> str:
        """Which frames of the windows to copy into the batch (`audio_inputs`): with a SoundOnlyEncoder only
        those up to the group's longest clip (it cuts the rest itself, so cutting them before the copy gives
        it the very same input and saves copying the padding), else the whole window. Rows may carry whole
        windows (`input_features`) or the pipeline's compact form (`sound_features` + `sound_pad`)."""
        return "needed" if isinstance(getattr(self.af3.model, "audio_tower", None), SoundOnlyEncoder) else "window"

    # Decoding -------------------------------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """The next token of each row, on device: the argmax, or a draw from the row's own generator."""
        chosen = logits.argmax(-1)
        for i, row in enumerate(rows):
            if row.generator is not None:
                chosen[i] = sample_token(logits[i], row.request.temperature, row.request.top_p, row.generator)
        return chosen

    def _decode_fn(self, rows: int) -> Callable:
        """The decode step for `rows` slots: eager, or on CUDA compiled once per bucket with CUDA graphs over
        static shapes (the whole cache length)."""
        if not self.compile_decode:
            return self._decode
        if rows not in self._compiled:
            self._compiled[rows] = torch.compile(self._decode, mode="reduce-overhead", fullgraph=False,
                                                 dynamic=False)
        return self._compiled[rows]

    def _decode(self, tokens: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """Logits for one new token in each of the first `len(tokens)` slots at `positions`.

        The Qwen2 decoder layer's arithmetic, step for step, without its wrappers (attention dispatch, kwargs
        plumbing, cache objects): at one token per row the model's own FLOPs are few and that Python was most
        of a step. Every module that owns weights (norms, projections, LoRA in them) is still called as a
        module, so adapters and parameter-gathering hooks work as in `forward`, except where `_plans` found a
        layer of plain float32 CPU weights (see there); the tests hold the tokens equal to `generate`'s."""
        lm = self.lm
        cfg = lm.config
        rows = tokens.shape[0]
        heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        head_dim = self.kv.layers[0].shape[-1]
        half = head_dim // 2
        table = self._decode_tables()
        plans, tail = self._plans or self._make_plans()
        # (rows, hidden): 2-D activations reach addmm/mm directly (a 3-D input is folded to the same 2-D call).
        if tail is not None:
            hidden = nn.functional.embedding(tokens, tail.embed)
        else:
            hidden = self.af3.get_input_embeddings()(tokens)
        if table.cos is not None:
            cos, sin = table.cos.index_select(0, positions), table.sin.index_select(0, positions)
        else:  # a position-dependent RoPE variant: ask the module
            cos, sin = lm.rotary_emb(hidden, positions[:, None])
            cos, sin = cos[:, 0], sin[:, 0] * table.sign
        cos, sin = cos[:, None], sin[:, None]  # (rows, 1, head_dim): broadcast over heads
        allowed = None  # one row attending to all of 0..length-1 needs no mask (eager CPU: length = pos + 1)
        if rows > 1 or self.compile_decode:
            allowed = (table.arange[:length][None, :] <= positions[:, None])[:, None, None, :]
        # Where each row's new K and V heads go in a layer's cache viewed as (slots * 2 kv_heads * max_len,
        # head_dim): one index_copy_ per layer with an index computed once per step.
        flat = (table.slot_starts[:rows, None] + table.head_starts + positions[:, None]).reshape(-1)

        def attend(q: torch.Tensor, cache: torch.Tensor, scaling: float) -> torch.Tensor:
            # Grouped-query attention of one query per row: the query heads of a KV head side by side.
            out = nn.functional.scaled_dot_product_attention(
                q.reshape(rows, kv_heads, heads // kv_heads, head_dim), cache[:rows, :kv_heads, :length],
                cache[:rows, kv_heads:, :length], attn_mask=allowed, scale=scaling)
            return out.reshape(rows, heads * head_dim)

        for layer, plan, cache in zip(lm.layers, plans, self.kv.layers):
            if plan is not None:  # plain float32 CPU weights: the same ops on tensors, fewer of them
                x = _rms(hidden, plan.ln1, plan.eps1, plan.width)
                qkv = nn.functional.linear(x, plan.qkv, plan.qkv_bias).view(rows, heads + 2 * kv_heads, head_dim)
                qk = qkv[:, : heads + kv_heads]  # RoPE in place: q * cos + rotate_half(q) * sin
                rotated = qk.roll(half, -1).mul_(sin)
                qk.mul_(cos).add_(rotated)
                cache.view(-1, head_dim).index_copy_(0, flat, qkv[:, heads:].reshape(-1, head_dim))
                hidden = hidden + nn.functional.linear(attend(qkv[:, :heads], cache, plan.scaling), plan.o,
                                                       plan.o_bias)
                gate, up = nn.functional.linear(_rms(hidden, plan.ln2, plan.eps2, plan.width),
                                                plan.gate_up).chunk(2, dim=-1)
                hidden = hidden + nn.functional.linear(plan.act(gate) * up, plan.down, plan.down_bias)
                continue
            attn = layer.self_attn
            x = self._norm(layer.input_layernorm, hidden)
            q = attn.q_proj(x).view(rows, heads, head_dim)
            k = attn.k_proj(x).view(rows, kv_heads, head_dim)
            v = attn.v_proj(x).view(rows, kv_heads, head_dim)
            q = q * cos + q.roll(half, -1) * sin
            k = k * cos + k.roll(half, -1) * sin
            cache.view(-1, head_dim).index_copy_(0, flat, torch.cat((k, v), 1).reshape(-1, head_dim))
            hidden = hidden + attn.o_proj(attend(q, cache, attn.scaling))
            hidden = hidden + layer.mlp(self._norm(layer.post_attention_layernorm, hidden))
        if tail is not None:
            return nn.functional.linear(_rms(hidden, tail.norm, tail.eps, tail.width), tail.head, tail.head_bias)
        return self.af3.lm_head(self._norm(lm.norm, hidden))

    def _norm(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Qwen2RMSNorm's arithmetic, op for op, without the module call; the module itself under ZeRO-3
        (its weight is gathered by the module's hooks)."""
        if self.zero3:
            return module(x)
        if x.dtype == torch.float32 and x.device.type == "cpu":
            return _rms(x, module.weight, self._scalar(module.variance_epsilon), self._scalar(x.shape[-1]))
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return module.weight * xf.to(x.dtype)

    def _scalar(self, value: float) -> torch.Tensor:
        """`value` as a cached float32 0-dim tensor on the CPU (see _rms)."""
        cached = self._scalars.get(value)
        if cached is None:
            cached = self._scalars[value] = torch.tensor(float(value), dtype=torch.float32)
        return cached

    def _decode_tables(self) -> "_Tables":
        """Per-cache constants of the decode step: RoPE cos/sin for every position (the rotary module's own
        numbers: elementwise in the position, so a table lookup gives the same values; sin carries
        rotate_half's signs), an arange, and the offsets of slots and K/V heads in a flat cache. Rebuilt when
        the cache grows."""
        if self._tables is None or self._tables.arange.shape[0] != self.kv.max_len:
            rotary = self.lm.rotary_emb
            head_dim = self.kv.layers[0].shape[-1]
            half = head_dim // 2
            arange = torch.arange(self.kv.max_len, device=self.device)
            sign = torch.cat((-torch.ones(half), torch.ones(half))).to(self.device, self.dtype)
            cos = sin = None
            if getattr(rotary, "rope_type", "default") == "default":
                probe = torch.zeros(1, 1, dtype=self.dtype, device=self.device)
                cos, sin = rotary(probe, arange[None])
                cos, sin = cos[0], sin[0] * sign
            per_head = self.kv.max_len
            head_starts = torch.arange(self.kv.layers[0].shape[1], device=self.device) * per_head
            slot_starts = torch.arange(self.kv.slots, device=self.device) * (len(head_starts) * per_head)
            self._tables = _Tables(arange, sign, cos, sin, slot_starts, head_starts)
        return self._tables

    def _make_plans(self) -> tuple[list["_LayerPlan | None"], "_TailPlan | None"]:
        """On CPU in float32, for every layer whose projections are plain Linear (no LoRA in them) and whose
        norms are RMSNorms: its weights as tensors, q|k|v and gate|up concatenated so that each is one matmul,
        so that the decode step calls tensor ops instead of modules. At one token per row a CPU step is
        mostly per-op and per-call overhead; a matmul over concatenated weights computes every output from the
        same dot product, so the numbers are the same (tests/test_generation.py holds tokens equal to
        `generate`). Not on accelerators (the copies would cost memory, and CUDA graphs remove the overhead
        instead) nor under ZeRO-3. Made again at every admission (weights may have changed in between: an
        adapter loaded, a checkpoint restored), never inside a step loop."""
        layers = self.lm.layers
        if self.device.type != "cpu" or self.zero3 or self.dtype != torch.float32:
            self._plans = ([None] * len(layers), None)
            return self._plans
        plans = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            parts = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
            if (any(type(m) is not nn.Linear for m in (*parts, attn.o_proj, mlp.down_proj))
                    or any(m.bias is None for m in parts[:3]) or any(m.bias is not None for m in parts[3:])
                    or not all(hasattr(n, "variance_epsilon")
                               for n in (layer.input_layernorm, layer.post_attention_layernorm))):
                plans.append(None)
                continue
            key = tuple((id(t), t._version) for m in parts for t in (m.weight, m.bias) if t is not None)
            cached = self._fused.get(id(layer))
            if cached is None or cached[0] != key:
                cached = (key, (torch.cat([m.weight for m in parts[:3]]), torch.cat([m.bias for m in parts[:3]]),
                                torch.cat([m.weight for m in parts[3:]])))
                self._fused[id(layer)] = cached
            qkv, qkv_bias, gate_up = cached[1]
            act = nn.functional.silu if type(mlp.act_fn) is nn.SiLU else mlp.act_fn
            plans.append(_LayerPlan(
                layer.input_layernorm.weight, self._scalar(layer.input_layernorm.variance_epsilon),
                layer.post_attention_layernorm.weight, self._scalar(layer.post_attention_layernorm.variance_epsilon),
                self._scalar(self.lm.config.hidden_size), qkv, qkv_bias, attn.o_proj.weight, attn.o_proj.bias,
                gate_up, mlp.down_proj.weight, mlp.down_proj.bias, act, attn.scaling))
        tail = None
        head, embed, norm = self.af3.lm_head, self.af3.get_input_embeddings(), self.lm.norm
        if type(head) is nn.Linear and type(embed) is nn.Embedding and hasattr(norm, "variance_epsilon") \
                and embed.max_norm is None:
            tail = _TailPlan(embed.weight, norm.weight, self._scalar(norm.variance_epsilon),
                             self._scalar(self.lm.config.hidden_size), head.weight, head.bias)
        self._plans = (plans, tail)
        return self._plans

    @torch.no_grad()
    def step(self) -> list[tuple[Any, GenResult]]:
        """One decode step for every row in flight; returns (key, result) of the rows that finished."""
        if not self.rows:
            if self.synced_gpus:
                self._idle_step()
            return []
        rows_n = max(self.rows) + 1  # slots 0..rows_n-1; free ones among them compute a throwaway token
        if self.compile_decode:
            rows_n = next((b for b in BATCH_BUCKETS if b >= rows_n), rows_n)
        active = sorted(self.rows)
        if self._carry is not None and self._carry[0] == active:
            # The same rows as the last step, each one token further: its chosen tokens are this step's input.
            _, tokens, positions, top = self._carry
            positions, top = positions + 1, top + 1
        else:
            # Built as lists and made tensors once: per-slot tensor writes cost a dispatch each (most of a
            # step's bookkeeping at batch 32).
            token_list, position_list = [self.pad_token_id] * rows_n, [0] * rows_n
            for slot, row in self.rows.items():
                token_list[slot] = row.tokens[-1]
                position_list[slot] = row.prompt_len + len(row.tokens) - 1
            top = max(position_list)
            tokens = torch.tensor(token_list, device=self.device)
            positions = torch.tensor(position_list, device=self.device)
        length = self.kv.max_len if self.compile_decode else top + 1
        logits = self._decode_fn(rows_n)(tokens, positions, length)
        if len(active) < rows_n:  # free slots among them computed throwaway logits
            logits = logits[torch.tensor(active, device=self.device)]
        chosen = self._choose(logits, [self.rows[s] for s in active])
        self._carry = (active, chosen, positions, top) if len(active) == rows_n else None
        for slot, token in zip(active, chosen.tolist()):  # the one host sync per step: stopping needs the tokens
            self._append(self.rows[slot], token)
        self.steps += 1
        return self._collect()

    def _idle_step(self) -> None:
        """A throwaway decode step, so that ZeRO-3 ranks with nothing left still join the others' gathers."""
        self._ensure_cache(1)
        self._decode(torch.full((1,), self.pad_token_id, device=self.device), torch.zeros(1, dtype=torch.long,
                                                                                           device=self.device), 1)

    def _append(self, row: _Row, token: int) -> None:
        """Take a new token; decide whether the row is done (<|im_end|>, a stop string, its budget)."""
        if token == self.eos_token_id:
            row.finish = "stop"
        else:
            row.tokens.append(token)
            if len(row.tokens) >= row.request.max_tokens:
                row.finish = "length"
        if row.request.stop or row.request.on_text is not None:
            text = self._text(row.tokens)
            cut = _stop_at(text, row.request.stop)
            if cut is not None:
                text, row.finish = cut, "stop"
                row.tokens = self._tokens_within(row.tokens, cut)
            if row.finish is not None:
                row.text = text
            self._stream(row, text)

    def _collect(self) -> list[tuple[Any, GenResult]]:
        done = []
        for slot, row in list(self.rows.items()):
            if row.finish is None:
                continue
            del self.rows[slot]  # the slot is free for the next admission
            self._carry = None
            text = row.text if row.text is not None else self._text(row.tokens)
            if row.request.on_text is not None and len(text) > len(row.sent):
                row.request.on_text(text[len(row.sent):])
            done.append((row.key, GenResult(text, row.tokens, row.finish, row.prompt_len)))
        return done

    # Text -----------------------------------------------------------------------------------------------------
    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def _tokens_within(self, tokens: list[int], text: str) -> list[int]:
        """The longest prefix of `tokens` whose text lies within `text` (a stop string cut mid-token)."""
        n = len(tokens)
        while n and not text.startswith(self._text(tokens[:n])):
            n -= 1
        return tokens[:n]

    def _stream(self, row: _Row, text: str) -> None:
        """Send the text decoded since the last piece; held back while it would not be final (an incomplete
        UTF-8 sequence, or the start of a possible stop string)."""
        if row.request.on_text is None or row.finish is not None:
            return
        hold = max((len(s) - 1 for s in row.request.stop or ()), default=0)
        ready = text[: len(text) - hold] if hold else text
        if ready.endswith("\ufffd") or not ready.startswith(row.sent) or len(ready) <= len(row.sent):
            return
        row.request.on_text(ready[len(row.sent):])
        row.sent = ready

    # Offline ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, requests: Sequence[GenRequest]) -> list[GenResult | GenFailure]:
        """Every request to its end, continuously batched (a row that finishes makes room for the next request
        at once); one outcome per request, in order."""
        results: list[GenResult | GenFailure | None] = [None] * len(requests)
        queue, next_i = list(requests), 0
        while self._anyone_busy(next_i < len(queue) or bool(self.rows)):
            take = min(self.free_slots, len(queue) - next_i)
            if take:
                for i, outcome in self.admit(queue[next_i: next_i + take], range(next_i, next_i + take)):
                    results[i] = outcome
                next_i += take
            try:
                finished = self.step()
            except Exception as err:  # noqa: BLE001 - a decode step fault fails the rows in flight
                if not self.isolate_failures:
                    self.rows.clear()
                    raise
                log.exception("a decode step failed; failing its %d rows", len(self.rows))
                finished = [(row.key, GenFailure(type(err).__name__)) for row in self.rows.values()]
                self.rows.clear()
            for i, outcome in finished:
                results[i] = outcome
        return results  # type: ignore[return-value]

    def _anyone_busy(self, busy: bool) -> bool:
        """Whether this rank or (with synced_gpus, ZeRO-3) any rank still generates: every rank steps until none
        does, since each forward gathers parameters from all of them."""
        if not self.synced_gpus:
            return busy
        import torch.distributed as dist

        flag = torch.tensor([1.0 if busy else 0.0], device=self.device)
        dist.all_reduce(flag)
        return bool(flag.item() > 0)


def _stop_at(text: str, stops: Sequence[str] | None) -> str | None:
    """`text` cut before the earliest stop string in it, or None when none occurs."""
    cuts = [text.find(s) for s in stops or () if s and s in text]
    return text[: min(cuts)].rstrip() if cuts else None
