"""What a model replica does, free of Ray: hold one base model and its LoRA adapters, and generate for a
batch of already featurized requests.

Requests in one batch share an adapter (Serve splits batches by multiplexed model id; `generate` checks).
Greedy requests run as one left-padded batch, each cut at its own `max_tokens`, so every answer equals what
the request would get alone. A sampled request (temperature > 0) runs on its own with its seed, so its
tokens never depend on what else was in the batch. Each request succeeds or fails alone: when a batch raises,
its requests are rerun one by one and only the one that fails gets a `GenFailure`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
from peft import PeftModel

from af3dist.data.audio import load_waveform
from af3dist.data.batching import collate_prompts
from af3dist.data.features import Featurizer, load_processor
from af3dist.inference import generate_tokens
from af3dist.model.loading import load_model, resolve_dtype

log = logging.getLogger(__name__)

PROBE_PROMPT = "Describe the audio."


@dataclass
class GenRequest:
    """One featurized request as the model replica receives it."""

    features: dict[str, np.ndarray]  # input_ids, input_features, input_features_mask (Featurizer output)
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    adapter: str | None = None


@dataclass
class GenResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (ended with <|im_end|>) or "length"
    prompt_tokens: int


@dataclass
class GenFailure:
    """A request generation failed for (a bug or a device fault: its inputs were checked before); the rest of
    its batch is unaffected. `error` names the exception type only, never request content."""

    error: str


def featurize(featurizer: Featurizer, audio: bytes, prompt: str | None, max_seconds: float) -> dict[str, np.ndarray]:
    """Encoded audio -> generation inputs. Raises ClipError (with a reason) for audio we cannot use."""
    waveform = load_waveform(audio, max_seconds=max_seconds)
    return featurizer.generation_inputs(waveform, prompt or None)


class Engine:
    """A base AF3 (or merged model) plus LoRA adapters loaded by name, generating batch by batch.

    Thread-safe: a lock serializes generation and adapter changes, so an adapter is never swapped or
    evicted in the middle of a batch. A batch for an adapter that is not loaded (evicted meanwhile) loads it.
    """

    def __init__(self, model: str, dtype: str = "auto", adapters: dict[str, str] | None = None,
                 device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.base = load_model(model, resolve_dtype(dtype, self.device.type == "cuda")).to(self.device).eval()
        self.model: torch.nn.Module = self.base
        self.processor = load_processor(model)
        tok = self.processor.tokenizer
        self.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
        self.pad_token_id = tok.pad_token_id
        self.known_adapters = dict(adapters or {})
        self.adapter_paths: dict[str, str] = {}  # the loaded ones
        self.retired: set[str] = set()  # evicted but still held by peft (see _unload_adapter)
        self.lock = threading.RLock()
        self.last_success: float | None = None  # time.monotonic() of the last batch with no failure
        self._probe_features: dict[str, np.ndarray] | None = None

    # Adapters -------------------------------------------------------------------------------------------
    def load_adapter(self, name: str) -> None:
        with self.lock:
            self._load_adapter(name)

    def _load_adapter(self, name: str) -> None:
        if name in self.adapter_paths:
            return
        if name not in self.known_adapters:
            raise KeyError(f"unknown adapter {name!r}")
        if name in self.retired:  # evicted as the last one and still in memory: take it back
            self.retired.discard(name)
        else:
            path = self.known_adapters[name]
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(path, adapter_name=name)
            else:
                self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).to(self.device).eval()
            log.info("loaded adapter %s from %s", name, path)
        self.adapter_paths[name] = self.known_adapters[name]
        self.model.set_adapter(name)
        for old in list(self.retired):
            self.model.delete_adapter(old)
            self.retired.discard(old)

    def unload_adapter(self, name: str) -> None:
        with self.lock:
            self._unload_adapter(name)

    def _unload_adapter(self, name: str) -> None:
        if name not in self.adapter_paths:
            return
        del self.adapter_paths[name]
        if self.adapter_paths:
            if self.model.active_adapter == name:
                self.model.set_adapter(next(iter(self.adapter_paths)))
            self.model.delete_adapter(name)
        else:
            # peft cannot drop its last adapter cleanly (unload() would keep the adapter's trained projector
            # in place of the base one): keep it, unused, until the next adapter is loaded.
            self.retired.add(name)
        log.info("unloaded adapter %s", name)

    @contextlib.contextmanager
    def _using(self, adapter: str | None):
        if adapter is None:
            with (self.model.disable_adapter() if isinstance(self.model, PeftModel) else contextlib.nullcontext()):
                yield
        else:
            self.model.set_adapter(adapter)
            yield

    # Generation -----------------------------------------------------------------------------------------
    def generate(self, requests: list[GenRequest]) -> list[GenResult | GenFailure]:
        """One result per request, in order; a request that fails gets a GenFailure, the others their text."""
        adapters = {r.adapter for r in requests}
        if len(adapters) != 1:
            raise ValueError(f"a batch must not mix adapters, got {sorted(map(str, adapters))}")
        adapter = adapters.pop()
        with self.lock:
            if adapter is not None:
                self._load_adapter(adapter)
            with self._using(adapter):
                results = self._generate(requests)
        if not any(isinstance(r, GenFailure) for r in results):
            self.last_success = time.monotonic()
        return results

    def _generate(self, requests: list[GenRequest]) -> list[GenResult | GenFailure]:
        results: list[GenResult | GenFailure | None] = [None] * len(requests)
        greedy = [i for i, r in enumerate(requests) if r.temperature == 0]
        if greedy:
            try:
                for i, res in zip(greedy, self._run([requests[i] for i in greedy])):
                    results[i] = res
            except Exception:  # noqa: BLE001 - find the request that fails; the others still get answers
                log.exception("a batch of %d failed; generating its requests one by one", len(greedy))
                for i in greedy:
                    results[i] = self._alone(requests[i])
        for i, r in enumerate(requests):
            if r.temperature > 0:
                results[i] = self._alone(r)
        return results  # type: ignore[return-value]

    def _alone(self, r: GenRequest) -> GenResult | GenFailure:
        try:
            if r.temperature > 0:
                torch.manual_seed(r.seed if r.seed is not None else int(torch.seed() % 2**31))
                return self._run([r], r.temperature, r.top_p)[0]
            return self._run([r])[0]
        except Exception as err:  # noqa: BLE001 - this request fails, alone
            log.exception("generation failed for one request")
            return GenFailure(type(err).__name__)

    def probe(self) -> None:
        """A one-token greedy generation on a second of silence: raises when this replica cannot generate.
        The base model serves it (no adapter), under the lock like any batch."""
        if self._probe_features is None:
            self._probe_features = Featurizer(self.processor, PROBE_PROMPT).generation_inputs(
                np.zeros(16000, np.float32))
        (result,) = self.generate([GenRequest(self._probe_features, 1)])
        if isinstance(result, GenFailure):
            raise RuntimeError(f"the health probe failed: {result.error}")

    def _run(self, requests: list[GenRequest], temperature: float = 0.0, top_p: float = 1.0) -> list[GenResult]:
        inputs = collate_prompts([r.features for r in requests], self.pad_token_id)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        if self.base.dtype != torch.float32:
            inputs["input_features"] = inputs["input_features"].to(self.base.dtype)
        longest = max(r.max_tokens for r in requests)
        out = generate_tokens(self.model, inputs, longest, self.eos_token_id, self.pad_token_id,
                              temperature=temperature, top_p=top_p)
        results = []
        for r, (tokens, finished) in zip(requests, out):
            # Greedy decoding does not depend on the batch's longest budget: cut at this request's own budget
            # and it has exactly the tokens it would get alone (it stopped if <|im_end|> came within budget).
            cut = tokens[: r.max_tokens]
            finish = "stop" if finished and len(tokens) < r.max_tokens else "length"
            text = self.processor.tokenizer.decode(cut, skip_special_tokens=True).strip()
            results.append(GenResult(text, cut, finish, int(len(r.features["input_ids"]))))
        return results
