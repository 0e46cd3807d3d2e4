"""The Ray Serve application: a FastAPI gateway in front of autoscaled, batching AF3 model replicas.

Gateway (CPU): auth, size limits, request checks, audio decoding and featurization (in a thread pool, so
concurrent requests are featurized in parallel), OpenAI-shaped responses and errors, metrics. No request can
hurt another: bad input is a 4xx, overload a fast 429/503 with Retry-After, every wait has a deadline, and
nothing slow (JSON parsing, base64, path resolution, fetching, decoding, tokenizing) runs on the event loop.
AF3Model (GPU where there is one): `@serve.batch` generation, LoRA adapters multiplexed by the request's
`model` field (loaded on first use, least recently used evicted), batch size and wait adjustable at runtime
through `user_config`.

`build_app(args)` is the application builder that `serve run` / `serve deploy` / RayService import
(`serving.app:build_app`); `af3dist serve` calls the same builder.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.util import metrics
from starlette.exceptions import HTTPException as StarletteHTTPException

from af3dist.config import API_KEY_ENV, Config, ConfigError, ServeConfig, load_config
from af3dist.data.audio import TARGET_SAMPLING_RATE, ClipError, load_waveform
from af3dist.data.features import Turn
from af3dist.server.engine import Engine, GenFailure, GenRequest, GenResult
from af3dist.server.protocol import (DONE, ApiError, AudioRef, ChatRequest, ChatTurn, PromptChecker, busy,
                                     chat_completion, chunk, completion_id, error_body, parse_chat_request,
                                     parse_json)
from af3dist.server.sources import read_source

log = logging.getLogger(__name__)


# Model replicas ---------------------------------------------------------------------------------------------
class _LoadedAdapter:
    """What the multiplexed loader returns; Serve calls `__del__` when it evicts the adapter."""

    def __init__(self, engine: Engine, name: str):
        self.engine, self.name, self._gone = engine, name, False

    def __del__(self):
        if not self._gone:
            self._gone = True
            self.engine.unload_adapter(self.name)


class AF3Model:
    """One model replica: the Engine's scheduler batches continuously (requests join the running batch at the
    next decode step and leave it when they finish). A batch holds requests for one adapter only (the Engine
    runs one adapter's batch at a time, in arrival order). A request that fails comes back as a GenFailure for
    its caller alone; the rest of its batch is answered. `generate_stream` yields the text as it is decoded.

    Health (Serve's `check_health`, and `ready` for the gateway's /readyz): unhealthy while a step has run for
    over `max_batch_seconds` (a wedged device), or when no step succeeded for `health_probe_interval_s` and a
    one-token probe generation fails or outlasts `health_probe_timeout_s`. Serve replaces an unhealthy replica.
    """

    def __init__(self, model: str, adapters: dict[str, str], dtype: str = "auto",
                 health: dict[str, float] | None = None, max_model_len: int = 2048):
        self.batch_started: float | None = None
        self.engine = Engine(model, dtype=dtype, adapters=adapters, max_len=max_model_len,
                             on_step=self._stepping)
        health = health or {}
        self.probe_interval_s = health.get("health_probe_interval_s", 30.0)
        self.probe_timeout_s = health.get("health_probe_timeout_s", 20.0)
        self.max_batch_seconds = health.get("max_batch_seconds", 300.0)
        self.max_batch_size: int | None = None
        self._observed = 0
        self.batch_metric = metrics.Histogram("af3dist_batch_size", "requests prefilled together",
                                              boundaries=[1, 2, 4, 8, 16, 32, 64])

    def _stepping(self, started: float | None) -> None:
        self.batch_started = started

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Runtime knobs from the deployment's user_config (changing them does not restart the replica):
        `max_batch_size` (rows decoded together: KV-cache slots, applied once the running batch drains) and
        `batch_wait_timeout_s` (how long a new batch waits for concurrent arrivals to prefill with)."""
        if "max_batch_size" in user_config:
            self.max_batch_size = int(user_config["max_batch_size"])
            self.engine.set_max_batch_size(self.max_batch_size)
        if "batch_wait_timeout_s" in user_config:
            self.engine.batch_wait_timeout_s = float(user_config["batch_wait_timeout_s"])

    async def adapter(self, name: str) -> _LoadedAdapter:
        await asyncio.to_thread(self.engine.load_adapter, name)
        return _LoadedAdapter(self.engine, name)

    async def _submit(self, request: GenRequest) -> asyncio.Future:
        if request.adapter is not None:
            await self.multiplexed_adapter(request.adapter)
        future = asyncio.wrap_future(self.engine.submit(request))
        future.add_done_callback(lambda _: self._observe_batches())
        return future

    def _observe_batches(self) -> None:
        """Admission sizes the metric has not seen yet (on the event loop, as each request ends)."""
        sizes = self.engine.admitted
        for n in sizes[self._observed:]:
            self.batch_metric.observe(n)
        self._observed = len(sizes)

    async def generate(self, request: GenRequest) -> GenResult | GenFailure:
        return await (await self._submit(request))

    async def generate_stream(self, request: GenRequest):
        """The request's text piece by piece as it is decoded (str), then its GenResult or GenFailure."""
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        request.on_text = lambda piece: loop.call_soon_threadsafe(pieces.put_nowait, piece)
        future = await self._submit(request)
        future.add_done_callback(lambda f: pieces.put_nowait(f))
        try:
            while True:
                item = await pieces.get()
                if item is future:
                    yield future.result()
                    return
                yield item
        finally:  # the client went away (Serve cancels or closes this stream): free the request's slot now
            if not future.done():
                future.cancel()

    def stats(self) -> dict[str, Any]:
        return {"batch_sizes": list(self.engine.admitted), "max_batch_size": self.max_batch_size,
                "loaded_adapters": sorted(self.engine.adapter_paths), "in_flight": len(self.engine.core.rows),
                "cancelled": self.engine.cancelled}

    async def check_health(self) -> None:
        """Raises when this replica cannot generate (see the class docstring); Serve calls it periodically."""
        now = time.monotonic()
        if self.batch_started is not None:
            if now - self.batch_started > self.max_batch_seconds:
                raise RuntimeError(f"a batch has run for over {self.max_batch_seconds:g} s")
            return
        last = self.engine.last_success
        if last is not None and now - last < self.probe_interval_s:
            return
        try:
            await asyncio.wait_for(asyncio.to_thread(self.engine.probe), timeout=self.probe_timeout_s)
        except asyncio.TimeoutError:
            raise RuntimeError(f"the health probe took over {self.probe_timeout_s:g} s") from None

    async def ready(self) -> bool:
        await self.check_health()
        return True


def deployment_options(cfg: ServeConfig) -> dict[str, dict[str, Any]]:
    """Both deployments' Serve options (scaling, concurrency, queues, resources, batch settings), from `cfg`
    alone. The Serve config files (serving/*.yaml, and rayservice.yaml's serveConfigV2) state these as
    `serve.*` overrides, never as `deployments` entries, so the config is their one source
    (tests/test_cluster_manifests.py checks it)."""
    return {
        "AF3Model": dict(
            autoscaling_config={"min_replicas": cfg.min_replicas, "max_replicas": cfg.max_replicas,
                                "initial_replicas": max(cfg.min_replicas, 1),
                                "target_ongoing_requests": cfg.target_ongoing_requests,
                                "upscale_delay_s": cfg.upscale_delay_s, "downscale_delay_s": cfg.downscale_delay_s},
            max_ongoing_requests=cfg.max_ongoing_requests, max_queued_requests=cfg.max_queued_requests,
            ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica},
            user_config={"max_batch_size": cfg.max_batch_size, "batch_wait_timeout_s": cfg.batch_wait_timeout_s},
            health_check_period_s=10, health_check_timeout_s=cfg.health_probe_timeout_s + 10,
            graceful_shutdown_wait_loop_s=2, graceful_shutdown_timeout_s=cfg.graceful_shutdown_timeout_s),
        # The gateway mostly waits on the model: it must hold many more requests than Serve's default of 5,
        # or it, not the model, caps the batch size. Beyond max_concurrent_requests it refuses at once (429);
        # the proxy's queue in front of it is bounded too (503 with Retry-After).
        "Gateway": dict(num_replicas=cfg.ingress_replicas, max_ongoing_requests=cfg.ingress_max_ongoing_requests,
                        max_queued_requests=cfg.ingress_max_queued_requests,
                        ray_actor_options={"num_cpus": cfg.ingress_cpus}),
    }


def model_deployment(cfg: ServeConfig):
    """AF3Model as a Serve deployment with the options of `cfg` (deployment_options).

    The class itself depends only on the adapter slots: batch size and wait reach the replicas through
    user_config (reconfigure), so a redeploy that changes them, scaling or concurrency updates the running
    replicas in place instead of replacing them.
    """
    return serve.deployment(_model_class(cfg.max_adapters_per_replica), name="AF3Model",
                            backpressure_config=_backpressure(cfg), **deployment_options(cfg)["AF3Model"])


def _backpressure(cfg: ServeConfig) -> BackpressureConfig:
    """What Serve answers when a deployment's queue is full: 503 with the configured Retry-After."""
    return BackpressureConfig(status_code=503, retry_after_s=cfg.retry_after_s)


def health_settings(cfg: ServeConfig) -> dict[str, float]:
    return {k: getattr(cfg, k) for k in ("health_probe_interval_s", "health_probe_timeout_s", "max_batch_seconds")}


@functools.lru_cache(maxsize=None)
def _model_class(max_adapters: int) -> type:
    class _AF3Model(AF3Model):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def multiplexed_adapter(self, name: str) -> _LoadedAdapter:
            return await self.adapter(name)

    _AF3Model.__name__ = _AF3Model.__qualname__ = "AF3Model"
    return _AF3Model


# Gateway ---------------------------------------------------------------------------------------------------
# The docs routes are the Gateway's own (below), behind the API key when one is set.
api = FastAPI(title="af3dist", description="Audio Flamingo 3 captions and answers, OpenAI-compatible",
              docs_url=None, redoc_url=None, openapi_url=None)

# A ClipError's reason -> what the client is told (never the decoder's detail: it could quote the file).
AUDIO_ERRORS = {
    "missing_audio": "the request carries no audio",
    "unsupported_codec": "the audio's format or codec is not supported",
    "corrupt": "the audio cannot be decoded",
    "empty_audio": "the audio holds no samples",
    "non_finite": "the audio holds NaN or infinite samples",
    "unreadable": "the audio file cannot be read",
}


def _json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers())


@api.exception_handler(ApiError)
async def _api_error(_: Request, err: ApiError) -> JSONResponse:
    return _json_error(err)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
    first = err.errors()[0] if err.errors() else {"loc": (), "msg": "invalid request"}
    loc = ".".join(str(p) for p in first["loc"])
    return _json_error(ApiError(400, f"{loc}: {first['msg']}", param=loc))


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (never buffered beyond it) and with 408
    when it has not all arrived within `timeout_s` (a slow upload holds a slot for no longer)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is over the limit of {limit} bytes", code="request_too_large")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise ApiError(413, f"the request body is over the limit of {limit} bytes",
                                   code="request_too_large")
                chunks.append(part)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="request_timeout") from None
    return b"".join(chunks)


def _no_stop_iteration(fn, *args):
    """Calls fn; a StopIteration it raises becomes a RuntimeError, which a Future can carry (a StopIteration
    raised into asyncio.to_thread's Future leaves the request waiting forever)."""
    try:
        return fn(*args)
    except StopIteration as err:
        raise RuntimeError("StopIteration escaped a worker thread") from err


async def _blocking(fn, *args):
    """fn(*args) in a worker thread: the event loop serves other requests meanwhile. The caller's deadline
    (asyncio.timeout) bounds the wait; the thread itself runs to its end."""
    return await asyncio.to_thread(_no_stop_iteration, fn, *args)


def api_key_or_refuse(cfg: ServeConfig) -> str | None:
    """The key clients must send (None: no auth). With `require_api_key` and no key found, refuses to start
    (ConfigError) unless `api_key` says "none": a missing Secret must not silently mean a public endpoint."""
    key = cfg.resolved_api_key()
    if key is None and cfg.require_api_key and cfg.api_key is None:
        raise ConfigError(f"serve.require_api_key is set but there is no key: set ${API_KEY_ENV} (the "
                          "af3dist-api-key Secret on Kubernetes) or serve.api_key, or say serve.api_key=none "
                          "to serve without authentication on purpose")
    return key


def _parse_chat(body: bytes, cfg: ServeConfig) -> ChatRequest:
    return parse_chat_request(parse_json(body, cfg), cfg)


@serve.deployment(name="Gateway")
@serve.ingress(api)
class Gateway:
    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]):
        from af3dist.data.features import Featurizer, load_processor

        self.model = model
        self.cfg = ServeConfig.model_validate(settings["serve"])
        self.base_name: str = settings["base_name"]
        self.adapters: list[str] = sorted(self.cfg.adapters)
        self.featurizer = Featurizer(load_processor(settings["model"]), settings["prompt"])
        self.prompts = PromptChecker(self.featurizer.tokenizer, self.cfg)
        self.api_key = api_key_or_refuse(self.cfg)
        self.inflight = 0
        self.created = int(time.time())
        self.requests = metrics.Counter("af3dist_requests", "HTTP requests by route and status",
                                        tag_keys=("route", "status"))
        self.errors = metrics.Counter("af3dist_request_errors", "refused or failed requests by code",
                                      tag_keys=("route", "code"))
        self.latency = metrics.Histogram("af3dist_request_latency_s", "request latency in seconds",
                                         boundaries=[0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60],
                                         tag_keys=("route",))

    # Helpers --------------------------------------------------------------------------------------------
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(header, f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer <key>)",
                           type="authentication_error", code="invalid_api_key")

    def _adapter_for(self, model: str | None) -> str | None:
        if model in (None, "", self.base_name):
            return None
        if model in self.cfg.adapters:
            return model
        raise ApiError(404, f"the requested model does not exist (available: "
                            f"{', '.join([self.base_name, *self.adapters])})", param="model",
                       code="model_not_found")

    def _audio_error(self, err: ClipError, param: str = "audio", total: bool = False) -> ApiError:
        """A clip we cannot use, as the client's error (`total`: the request's audio budget ran out)."""
        if err.reason == "timeout":
            return ApiError(504, "the audio could not be read in time", type="timeout_error", param=param,
                            code="timeout")
        if err.reason == "too_long" and total:
            message = (f"the request's audio is over the limit of {self.cfg.max_request_audio_seconds:g} s for "
                       "all clips together")
        elif err.reason == "too_long":
            message = f"the audio is over the limit ({self.cfg.max_audio_seconds:g} s, {self.cfg.max_body_mb:g} MB)"
        else:
            message = AUDIO_ERRORS.get(err.reason) or "the audio cannot be used"
        return ApiError(400, message, param=param, code=err.reason)

    @contextlib.asynccontextmanager
    async def _deadline(self):
        """Everything after the body read, within request_timeout_s: 504 otherwise."""
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                yield
        except TimeoutError:
            raise ApiError(504, f"no answer within {self.cfg.request_timeout_s:g} s", type="timeout_error",
                           code="timeout") from None

    async def _audio(self, ref: AudioRef) -> bytes:
        """One clip's bytes: inline, or read from its allow-listed path or URL (off the event loop, bounded)."""
        if ref.data is not None:
            return ref.data
        try:
            return await asyncio.wait_for(_blocking(read_source, ref.location, self.cfg),
                                          timeout=self.cfg.fetch_timeout_s + self.cfg.fetch_connect_timeout_s)
        except asyncio.TimeoutError:
            raise self._audio_error(ClipError("timeout", "fetch deadline"), ref.param) from None
        except ClipError as err:
            raise self._audio_error(err, ref.param) from None

    def _waveforms(self, refs: list[AudioRef], audios: list[bytes]) -> list[Any]:
        """Each clip decoded within `max_audio_seconds` and what is left of `max_request_audio_seconds`
        (decoding stops at the limit, so N clips cannot cost more than the request's budget)."""
        waveforms, left = [], self.cfg.max_request_audio_seconds
        for ref, data in zip(refs, audios):
            limit = min(self.cfg.max_audio_seconds, left)
            try:
                if limit <= 0:
                    raise ClipError("too_long", "no audio budget left")
                waveform = load_waveform(data, max_seconds=limit)
            except ClipError as err:
                raise self._audio_error(err, ref.param, total=limit < self.cfg.max_audio_seconds) from None
            waveforms.append(waveform)
            left -= len(waveform) / TARGET_SAMPLING_RATE
        return waveforms

    def _featurize(self, turns: list[ChatTurn], audios: list[bytes], max_tokens: int) -> dict[str, Any]:
        """Prompt checks (cheapest first), then decoding and featurizing the whole conversation, then the
        context-length check (audio of every clip included)."""
        self.prompts.check(turns)
        waveforms = self._waveforms([ref for t in turns for ref in t.audio], audios)
        features = self.featurizer.conversation_inputs([Turn(t.role, t.text, len(t.audio)) for t in turns],
                                                       waveforms)
        self.prompts.check_context(int(len(features["input_ids"])), max_tokens)
        return features

    async def _request(self, turns: list[ChatTurn], adapter: str | None, max_tokens: int, temperature: float = 0.0,
                       top_p: float = 1.0, seed: int | None = None, stop: list[str] | None = None) -> GenRequest:
        """The conversation's clips fetched (in order, so the first bad one is the one named), then featurized
        in a worker thread: a request the model replica can run."""
        audios = [await self._audio(ref) for t in turns for ref in t.audio]
        features = await _blocking(self._featurize, turns, audios, max_tokens)
        return GenRequest(features, max_tokens, temperature, top_p, seed, adapter, stop=stop)

    @staticmethod
    def _checked(result: GenResult | GenFailure) -> GenResult:
        if isinstance(result, GenFailure):
            raise ApiError(500, f"generation failed ({result.error})", type="server_error",
                           code="generation_failed")
        return result

    async def _generate(self, request: GenRequest) -> GenResult:
        response = self.model.options(multiplexed_model_id=request.adapter or "").generate.remote(request)
        try:
            result = await response
        except asyncio.CancelledError:  # the request's deadline passed: the model need not finish it
            response.cancel()
            raise
        return self._checked(result)

    async def _start_stream(self, request: GenRequest):
        """The model's stream for `request` and its first item (text, or the whole result): waiting for that
        first item inside the request's deadline lets overload and failures before the first token still be
        proper HTTP errors."""
        stream = self.model.options(multiplexed_model_id=request.adapter or "", stream=True) \
            .generate_stream.remote(request)
        try:
            first = await stream.__anext__()
        except asyncio.CancelledError:
            stream.cancel()
            raise
        if not isinstance(first, str):
            self._checked(first)
        return stream, first

    async def _observe(self, route: str, request: Request, handler, admit: bool = True) -> Any:
        """Auth, admission (over max_concurrent_requests: 429 at once), the error shape, metrics."""
        start = time.perf_counter()
        status, admitted = 500, False
        try:
            self._authorize(request)
            if admit:
                if self.inflight >= self.cfg.max_concurrent_requests:
                    raise busy(429, "the server is busy; retry shortly", "server_busy", self.cfg.retry_after_s)
                self.inflight += 1
                admitted = True
            result = await handler()
            status = 200
            return result
        except ApiError as err:
            status = err.status
            self.errors.inc(tags={"route": route, "code": err.code or err.type})
            return _json_error(err)
        except (BackPressureError, DeploymentUnavailableError) as err:  # the model replicas' queue is full
            refusal = busy(503, "the model is overloaded or unavailable; retry shortly", "server_overloaded",
                           self.cfg.retry_after_s)
            status = refusal.status
            self.errors.inc(tags={"route": route, "code": refusal.code})
            log.warning("refused on %s: %s", route, type(err).__name__)
            return _json_error(refusal)
        except Exception as err:  # a bug or a replica failure, never the client's input
            log.exception("request on %s failed", route)
            self.errors.inc(tags={"route": route, "code": "internal"})
            return JSONResponse(error_body(500, f"internal error: {type(err).__name__}"), status_code=500)
        finally:
            if admitted:
                self.inflight -= 1
            self.requests.inc(tags={"route": route, "status": str(status)})
            self.latency.observe(time.perf_counter() - start, tags={"route": route})

    # Routes ---------------------------------------------------------------------------------------------
    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz")
    async def readyz(self) -> JSONResponse:
        """Ready when a model replica says it can generate (its own probe, see AF3Model.check_health)."""
        try:
            await asyncio.wait_for(self.model.ready.remote(), timeout=self.cfg.health_probe_timeout_s + 5)
            return JSONResponse({"status": "ready"})
        except Exception as err:  # noqa: BLE001 - any failure means not ready
            return JSONResponse(error_body(503, f"the model is not ready: {type(err).__name__}"), status_code=503,
                                headers={"Retry-After": str(self.cfg.retry_after_s)})

    def _docs(self, request: Request, page) -> Any:
        """The API docs, behind the key when one is set (they list every route and field)."""
        try:
            self._authorize(request)
        except ApiError as err:
            return _json_error(err)
        return page(f"{request.scope.get('root_path', '')}/openapi.json")

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self, request: Request) -> Any:
        return self._docs(request, lambda _: JSONResponse(api.openapi()))

    @api.get("/docs", include_in_schema=False)
    async def docs(self, request: Request) -> Any:
        return self._docs(request, lambda url: get_swagger_ui_html(openapi_url=url, title="af3dist"))

    @api.get("/redoc", include_in_schema=False)
    async def redoc(self, request: Request) -> Any:
        return self._docs(request, lambda url: get_redoc_html(openapi_url=url, title="af3dist"))

    @api.get("/v1/models")
    async def models(self, request: Request) -> Any:
        async def handler():
            data = [{"id": name, "object": "model", "created": self.created, "owned_by": "af3dist",
                     **({"parent": self.base_name} if name != self.base_name else {})}
                    for name in [self.base_name, *self.adapters]]
            return {"object": "list", "data": data}
        return await self._observe("models", request, handler, admit=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        async def handler():
            body = await _read_body(request, self.cfg.max_body_bytes, self.cfg.body_read_timeout_s)
            async with self._deadline():
                chat: ChatRequest = await _blocking(_parse_chat, body, self.cfg)
                del body
                adapter = self._adapter_for(chat.model)
                gen = await self._request(chat.turns, adapter, chat.max_tokens, chat.temperature, chat.top_p,
                                          chat.seed, chat.stop)
                if chat.stream:
                    stream, first = await self._start_stream(gen)
                else:
                    result = await self._generate(gen)
            model_name = adapter or self.base_name
            cid = completion_id()
            if chat.stream:
                return StreamingResponse(self._stream(cid, model_name, stream, first),
                                         media_type="text/event-stream")
            return chat_completion(cid, model_name, result.text, result.finish_reason, result.prompt_tokens,
                                   len(result.token_ids))
        return await self._observe("chat_completions", request, handler)

    async def _stream(self, cid: str, model_name: str, stream, first):
        """SSE in OpenAI's chunk format, each piece of text sent as the model decodes it. `request_timeout_s`
        bounds the stream too; a failure or a timeout after the first piece ends it with an error event (the
        status line has gone out already). A client that goes away cancels the model's stream."""
        yield chunk(cid, model_name, {"role": "assistant", "content": ""})
        item = first
        finished = False
        try:
            async with asyncio.timeout(self.cfg.request_timeout_s):
                while isinstance(item, str):
                    yield chunk(cid, model_name, {"content": item})
                    item = await stream.__anext__()
            finished = True
            result = self._checked(item)
            yield chunk(cid, model_name, {}, finish_reason=result.finish_reason)
        except ApiError as err:
            yield f"data: {json.dumps(err.body())}\n\n"
        except (TimeoutError, StopAsyncIteration):
            yield f"data: {json.dumps(error_body(504, 'the stream did not finish in time', 'timeout'))}\n\n"
        finally:
            if not finished:
                stream.cancel()
        yield DONE

    @api.post("/v1/audio/captions")
    async def captions(self, request: Request) -> Any:
        async def handler():
            if not request.headers.get("content-type", "").startswith("multipart/form-data"):
                raise ApiError(400, "send the audio as multipart/form-data with a `file` field",
                               code="invalid_content_type")
            body = await _read_body(request, self.cfg.max_body_bytes, self.cfg.body_read_timeout_s)

            async def replay():
                return {"type": "http.request", "body": body, "more_body": False}

            async with self._deadline():
                try:
                    form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
                except Exception:  # noqa: BLE001 - malformed multipart of any kind
                    raise ApiError(400, "the multipart body cannot be parsed", code="invalid_multipart") from None
                upload = form.get("file")
                if upload is None or isinstance(upload, str):
                    raise ApiError(400, "the form needs a `file` field holding the audio", param="file")
                prompt = form.get("prompt") or ""
                model = form.get("model") or None
                if not isinstance(prompt, str) or (model is not None and not isinstance(model, str)):
                    raise ApiError(400, "`prompt` and `model` must be text fields")
                adapter = self._adapter_for(model)
                turn = ChatTurn("user", prompt, [AudioRef(data=await upload.read(), param="file")], param="prompt")
                result = await self._generate(await self._request([turn], adapter, self.cfg.default_max_tokens))
            return {"caption": result.text, "model": adapter or self.base_name}
        return await self._observe("captions", request, handler)


# The application builder ---------------------------------------------------------------------------------
def served_name(model: str) -> str:
    """How clients name the base: a hub id as it is, a local folder by its name."""
    return Path(model).name if os.path.isdir(model) else model


def build_app(args: dict[str, Any]) -> serve.Application:
    """Serve application builder. args: `config` (preset or YAML, default tiny), `model` (folder or hub id;
    default the config's model), `adapters` ({name: folder}), `overrides` (["serve.max_batch_size=16", ...])."""
    cfg: Config = load_config(args.get("config", "tiny"), list(args.get("overrides") or []))
    adapters = {**cfg.serve.adapters, **(args.get("adapters") or {})}
    serve_cfg = ServeConfig.model_validate({**cfg.serve.model_dump(), "adapters": adapters})
    model = args.get("model")
    if not model:
        from af3dist.embedded.assets import prepare_embedded

        if cfg.model.build_tiny is not None:
            prepare_embedded(cfg.model_copy(update={"data": cfg.data.model_copy(update={"synthetic": None})}))
        model = cfg.model.name_or_path
    settings = {"serve": serve_cfg.model_dump(), "model": model, "prompt": cfg.data.prompt,
                "base_name": serve_cfg.model_name or served_name(model)}
    model_app = model_deployment(serve_cfg).bind(model, serve_cfg.adapters, cfg.model.dtype,
                                                 health_settings(serve_cfg), serve_cfg.max_model_len)
    return Gateway.options(backpressure_config=_backpressure(serve_cfg),
                           **deployment_options(serve_cfg)["Gateway"]).bind(model_app, settings)
