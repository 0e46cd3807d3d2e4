"""What a model replica does, free of Ray: hold one base model and its LoRA adapters, and generate for
featurized requests continuously through the shared generation engine (af3dist.generation).

A scheduler thread owns the engine: requests wait in a FIFO queue; at every decode step the ones at its head
that share the running batch's adapter are prefilled into free slots and join the batch, and a row that
finishes frees its slot at once. A batch never mixes adapters: a request for another adapter (or the base)
waits until the running batch drains, then its adapter's batch starts (strict FIFO, so nobody starves).
Greedy and sampled requests batch alike: a sampled row draws from its own generator seeded from its seed, so
its tokens never depend on what else is in the batch. Each request succeeds or fails alone (a failing prefill
is retried row by row; only the request that fails gets a `GenFailure`). `on_text` on a request streams its
text piece by piece as it is decoded. A request whose future is cancelled (its caller went away) leaves the
queue, or the running batch before the next step, so its KV slot is free at once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
import torch
from peft import PeftModel

from af3dist.config import DEFAULT_PROMPT
from af3dist.data.audio import load_waveform
from af3dist.data.features import Featurizer, load_processor
from af3dist.generation import GenerationEngine, GenFailure, GenRequest, GenResult
from af3dist.model.loading import load_model, resolve_dtype

log = logging.getLogger(__name__)

PROBE_PROMPT = DEFAULT_PROMPT

__all__ = ["Engine", "GenFailure", "GenRequest", "GenResult", "featurize"]


def featurize(featurizer: Featurizer, audio: bytes, prompt: str | None, max_seconds: float) -> dict[str, np.ndarray]:
    """Encoded audio -> generation inputs. Raises ClipError (with a reason) for audio we cannot use."""
    waveform = load_waveform(audio, max_seconds=max_seconds)
    return featurizer.generation_inputs(waveform, prompt or None)


class Engine:
    """A base AF3 (or merged model) plus LoRA adapters loaded by name, generating continuously (see the module
    docstring). Thread-safe: `submit` from any thread; a lock serializes decode steps and adapter changes, so
    an adapter is never swapped or evicted in the middle of a step, and each step runs with its batch's adapter
    active. A batch for an adapter that is not loaded (evicted meanwhile) loads it.

    `on_step(started)`: called with time.monotonic() when a prefill/decode step starts and None when it ends
    (the replica's health check reads it). `max_len`: positions per KV-cache slot (prompt + answer).
    """

    def __init__(self, model: str, dtype: str = "auto", adapters: dict[str, str] | None = None,
                 device: str | None = None, max_batch_size: int = 8, max_len: int = 2048,
                 batch_wait_timeout_s: float = 0.0, on_step: Callable[[float | None], None] | None = None):
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
        self.last_success: float | None = None  # time.monotonic() of the last step with no failure
        self._probe_features: dict[str, np.ndarray] | None = None
        self.core = GenerationEngine(self.base, tok, max_batch_size=max_batch_size, max_len=max_len)
        self.batch_wait_timeout_s = batch_wait_timeout_s
        self.on_step = on_step
        self.admitted: list[int] = []  # requests prefilled together, per admission (probes not counted)
        self._queue: collections.deque[tuple[GenRequest, Future, bool]] = collections.deque()
        self._wake = threading.Condition()
        self._futures: dict[int, tuple[Future, GenRequest]] = {}  # request id -> its future, while in flight
        self._cancelled: list[Future] = []  # futures cancelled since the scheduler last looked
        self.cancelled = 0  # requests given up before they finished (their callers went away)
        self._pending_batch_size: int | None = None
        self._thread: threading.Thread | None = None
        self._adapter: str | None = None  # the running batch's

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

    # Scheduling ---------------------------------------------------------------------------------------------
    def set_max_batch_size(self, n: int) -> None:
        """Rows decoded together; takes effect when nothing is in flight (the KV cache is sized for it)."""
        with self._wake:
            self._pending_batch_size = int(n)
            self._wake.notify()

    def submit(self, request: GenRequest, probe: bool = False) -> Future:
        """Queue a request; the future resolves to its GenResult or GenFailure. Cancelling the future gives the
        request up: it never starts, or it leaves the running batch before the next decode step."""
        future: Future = Future()
        future.add_done_callback(self._on_done)
        with self._wake:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="af3dist-scheduler", daemon=True)
                self._thread.start()
            self._queue.append((request, future, probe))
            self._wake.notify()
        return future

    def _on_done(self, future: Future) -> None:
        if future.cancelled():
            with self._wake:
                self._cancelled.append(future)
                self._wake.notify()

    def _drop_cancelled(self) -> None:
        """Under self._wake, in the scheduler thread: cancelled requests leave the queue and the running batch
        (their slots are free for the next admission)."""
        if not self._cancelled:
            return
        gone = {id(f) for f in self._cancelled}
        self._cancelled.clear()
        queued = len(self._queue)
        self._queue = collections.deque(e for e in self._queue if id(e[1]) not in gone)
        dropped = queued - len(self._queue)
        for slot, row in list(self.core.rows.items()):
            if row.key in gone and self._futures[row.key][0].cancelled():
                del self.core.rows[slot]
                del self._futures[row.key]
                dropped += 1
        self.cancelled += dropped

    def generate(self, requests: list[GenRequest]) -> list[GenResult | GenFailure]:
        """One result per request, in order; a request that fails gets a GenFailure, the others their text.
        The requests must share an adapter (they are queued together, so they are prefilled together)."""
        adapters = {r.adapter for r in requests}
        if len(adapters) != 1:
            raise ValueError(f"a batch must not mix adapters, got {sorted(map(str, adapters))}")
        with self._wake:  # queued at once: nobody else's request lands between them
            futures = [self.submit(r) for r in requests]
        return [f.result() for f in futures]

    def probe(self) -> None:
        """A one-token greedy generation on a second of silence: raises when this replica cannot generate.
        The base model serves it (no adapter), queued like any request."""
        if self._probe_features is None:
            self._probe_features = Featurizer(self.processor, PROBE_PROMPT).generation_inputs(
                np.zeros(16000, np.float32))
        result = self.submit(GenRequest(self._probe_features, 1), probe=True).result()
        if isinstance(result, GenFailure):
            raise RuntimeError(f"the health probe failed: {result.error}")

    def _next_admissions(self) -> tuple[str | None, list[tuple[GenRequest, Future, bool]]]:
        """Under self._wake: wait for work, then take the queue's head requests that may join the batch now."""
        self._drop_cancelled()
        while not self._queue and not self.core.rows:
            self._wake.wait()
            self._drop_cancelled()
        if not self.core.rows:
            if self._pending_batch_size is not None:
                self.core = GenerationEngine(self.base, self.processor.tokenizer,
                                             max_batch_size=self._pending_batch_size, max_len=self.core.max_len)
                self._pending_batch_size = None
            if self.batch_wait_timeout_s > 0 and len(self._queue) < self.core.max_batch_size:
                # A new batch: give concurrent arrivals a moment to be prefilled together.
                self._wake.wait_for(lambda: len(self._queue) >= self.core.max_batch_size,
                                    timeout=self.batch_wait_timeout_s)
            self._adapter = self._queue[0][0].adapter
        take = []
        while self._queue and len(take) < self.core.free_slots and self._queue[0][0].adapter == self._adapter:
            take.append(self._queue.popleft())
        return self._adapter, take

    def _run(self) -> None:
        """The scheduler loop: admit, step, resolve finished requests; forever (a daemon thread)."""
        while True:
            with self._wake:
                adapter, take = self._next_admissions()
            try:
                self._step(adapter, take)
            except Exception as err:  # noqa: BLE001 - never let the loop die: fail what is in flight
                log.exception("a scheduler step failed; failing the %d requests in flight", len(self._futures))
                for future in [f for _, f, _ in take] + [f for f, _ in self._futures.values()]:
                    if not future.done():
                        future.set_result(GenFailure(type(err).__name__))
                self._futures.clear()
                self.core.rows.clear()

    def _step(self, adapter: str | None, take: list[tuple[GenRequest, Future, bool]]) -> None:
        started = time.monotonic()
        if self.on_step:
            self.on_step(started)
        failed = False
        try:
            with self.lock:
                if adapter is not None:
                    self._load_adapter(adapter)
                with self._using(adapter):
                    outcomes = []
                    if take:
                        counted = sum(not probe for _, _, probe in take)
                        if counted:
                            self.admitted.append(counted)
                        for r, future, _ in take:
                            self._futures[id(future)] = (future, r)
                        outcomes += self.core.admit([r for r, _, _ in take], [id(f) for _, f, _ in take])
                    outcomes += self.core.step()
            for key, outcome in outcomes:
                failed |= isinstance(outcome, GenFailure)
                future, _ = self._futures.pop(key)
                if not future.done():  # a cancelled one has nobody waiting
                    future.set_result(outcome)
        finally:
            if self.on_step:
                self.on_step(None)
        if not failed:
            self.last_success = time.monotonic()
