"""The OpenAI-compatible wire format: parse and check requests, shape responses, stream chunks and errors.

Pure functions with no Ray or model inside, so every refusal is decided (and tested) before a request
costs any model time. Audio comes inline as base64 (`input_audio`); a part that names a local path or a
URL is refused unless the config's `allowed_audio_sources` lists a prefix that covers it (matched, and read,
by af3dist.server.sources), because the processor's chat template would otherwise read any file or fetch any
URL a client names. Every limit is a `serve.*` config field; no error message quotes the request.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from af3dist.config import ServeConfig

# `input_audio.format` is a hint only (the decoder sniffs the bytes): any container or codec name is taken.
FORMAT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,15}")
# Sampling bounds as in vLLM: the seed is an int64, a temperature is 0 (greedy) or at least 1e-5.
SEED_RANGE = (-(2**63), 2**63 - 1)
MIN_TEMPERATURE = 1e-5
# OpenAI's `stop`: a string or up to 4 strings; each bounded, since the engine searches the text for every one
# at every step.
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
# Characters no legitimate path or URL needs: controls (NUL included), whitespace, backslash, lone surrogates.
_BAD_LOCATION_CHARS = re.compile(r"[\x00-\x20\x7f\\\ud800-\udfff]")


class ApiError(Exception):
    """A request the service refuses: an HTTP status and an OpenAI-shaped error body. The message must never
    quote the request (or anything fetched for it); `retry_after` (s) adds a Retry-After header (429, 503)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return ApiError(status, message, kind, code=code).body()


def busy(status: int, message: str, code: str, retry_after: int) -> ApiError:
    """An overload refusal (429 or 503): the client may retry after `retry_after` seconds."""
    return ApiError(status, message, "server_error" if status >= 500 else "rate_limit_error", code=code,
                    retry_after=retry_after)


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[dict[str, Any]] | None = None


class _ChatBody(BaseModel):
    # OpenAI clients send fields we have no use for (user, logprobs, ...): ignore them, check the ones we use.
    model_config = ConfigDict(extra="ignore")
    model: StrictStr | None = None
    messages: list[_Message] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: StrictFloat | StrictInt | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    stream: StrictBool | None = False
    n: StrictInt | None = Field(None, ge=1, le=1)
    stop: StrictStr | list[StrictStr] | None = None


@dataclass
class AudioRef:
    """Where one audio clip of a request is: inline bytes, or an allow-listed path/URL the server may read.
    `param` names its part (`messages.2.content.1`), so a refusal says which clip it is about."""

    data: bytes | None = None
    location: str | None = None
    param: str = "audio"


@dataclass
class ChatTurn:
    """One message as the model will read it: its role (`developer` is read as `system`), its text parts
    joined, and its clips (user turns only). `param` names the message in refusals."""

    role: Literal["system", "user", "assistant"]
    text: str
    audio: list[AudioRef] = field(default_factory=list)
    param: str = "messages"


@dataclass
class ChatRequest:
    model: str | None
    turns: list[ChatTurn]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool
    stop: list[str] | None = None

    @property
    def audio(self) -> list[AudioRef]:
        """Every clip of the conversation, in order of appearance."""
        return [ref for turn in self.turns for ref in turn.audio]


def parse_json(body: bytes, cfg: ServeConfig) -> Any:
    """The body as JSON, within the config's depth and number-length limits (400 otherwise): a body nested
    100k deep or a 5000-digit number must be a client error, not a RecursionError or ValueError. Runs in O(size):
    call it off the event loop for large bodies."""
    def number(kind: type) -> Any:
        def parse(text: str) -> Any:
            if len(text) > cfg.max_json_number_chars:
                raise ApiError(400, f"a number in the body is longer than {cfg.max_json_number_chars} characters",
                               code="invalid_json")
            value = kind(text)
            if kind is float and not math.isfinite(value):
                raise ApiError(400, "a number in the body is out of range", code="invalid_json")
            return value
        return parse

    def constant(_: str) -> Any:
        raise ApiError(400, "NaN and Infinity are not JSON", code="invalid_json")

    too_deep = False
    try:
        payload = json.loads(body, parse_int=number(int), parse_float=number(float), parse_constant=constant)
    except RecursionError:
        payload, too_deep = None, True
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        where = f" (line {err.lineno}, column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
        raise ApiError(400, f"the request body is not valid JSON{where}", code="invalid_json") from None
    if too_deep or _depth_over(payload, cfg.max_json_depth):
        raise ApiError(400, f"the JSON body is nested deeper than {cfg.max_json_depth} levels", code="json_too_deep")
    return payload


def _depth_over(value: Any, limit: int) -> bool:
    """Whether `value` nests containers deeper than `limit` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def not_allowed(param: str, why: str) -> ApiError:
    return ApiError(400, f"audio by path or URL is not allowed here ({why}); send it inline as input_audio",
                    param=param, code="audio_source_not_allowed")


def check_location(location: str, cfg: ServeConfig, param: str) -> None:
    """Checks of a path or URL that need no file system, fast enough for the event loop: an allow-list is
    configured, the length is bounded, no control characters. The allow-list itself is matched by
    af3dist.server.sources.read_source, off the event loop (it may resolve a path)."""
    if not cfg.allowed_audio_sources:
        raise not_allowed(param, "no audio sources are configured")
    if len(location) > cfg.max_audio_location_chars:
        raise ApiError(400, f"the audio path or URL is longer than {cfg.max_audio_location_chars} characters",
                       param=param, code="invalid_value")
    if _BAD_LOCATION_CHARS.search(location):
        raise ApiError(400, "the audio path or URL holds control characters, whitespace or a backslash",
                       param=param, code="invalid_value")


def _audio_part(part: dict[str, Any], index: str, cfg: ServeConfig) -> AudioRef:
    """One audio part checked (without touching a file system or the network) into an AudioRef."""
    kind = part.get("type")
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise ApiError(400, "input_audio must be an object with `data` and `format`", param=index)
        data, fmt = spec.get("data"), spec.get("format")
        if fmt is not None and not (isinstance(fmt, str) and FORMAT_NAME.fullmatch(fmt)):
            raise ApiError(400, "input_audio.format must be a container or codec name such as wav, mp3 or m4a",
                           param=f"{index}.input_audio.format", code="invalid_value")
        if not isinstance(data, str) or not data:
            raise ApiError(400, "input_audio.data must be a non-empty base64 string",
                           param=f"{index}.input_audio.data")
        try:
            return AudioRef(data=base64.b64decode(data, validate=True), param=index)
        except (binascii.Error, ValueError):
            raise ApiError(400, "input_audio.data is not valid base64", param=f"{index}.input_audio.data",
                           code="invalid_base64") from None
    # Parts that name a file or URL (the processor's own `audio` part, or an `audio_url` part).
    location = part.get("path") or part.get("url")
    if isinstance(part.get("audio_url"), dict):
        location = part["audio_url"].get("url")
    if not isinstance(location, str) or not location:
        raise ApiError(400, f"an {kind} part must carry audio (input_audio with base64 data)", param=index)
    check_location(location, cfg, index)
    return AudioRef(location=location, param=index)


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise ApiError(400, "a text part needs a string `text`", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "the text holds lone surrogates (not valid Unicode)", param=param,
                       code="invalid_value") from None
    return value


def parse_chat_request(payload: Any, cfg: ServeConfig) -> ChatRequest:
    """A checked chat-completions request: the whole conversation (system/developer prompt, user and assistant
    turns, in order, ending on a user turn) with 1 to `max_audios_per_request` clips in its user turns."""
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    messages = payload.get("messages")
    if isinstance(messages, list) and (len(messages) > cfg.max_messages or any(
            isinstance(m, dict) and isinstance(m.get("content"), list) and len(m["content"]) > cfg.max_messages
            for m in messages)):
        raise ApiError(400, f"a request may hold at most {cfg.max_messages} messages of at most {cfg.max_messages} "
                            "parts each", param="messages", code="invalid_value")
    try:
        body = _ChatBody.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{loc}: {first['msg']}", param=loc, code="invalid_value") from None
    if body.temperature is not None and 0 < body.temperature < MIN_TEMPERATURE:
        raise ApiError(400, f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g}", param="temperature",
                       code="invalid_value")

    turns: list[ChatTurn] = []
    n_audio = 0
    for m_i, message in enumerate(body.messages):
        role = "system" if message.role == "developer" else message.role
        parts = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else (
            message.content or [])
        texts: list[str] = []
        audio: list[AudioRef] = []
        for p_i, part in enumerate(parts):
            index = f"messages.{m_i}.content.{p_i}"
            kind = part.get("type")
            if kind == "text":
                texts.append(_text(part.get("text"), f"{index}.text"))
            elif kind in ("input_audio", "audio", "audio_url"):
                if role != "user":
                    raise ApiError(400, "audio is only accepted in user messages", param=index, code="invalid_value")
                n_audio += 1
                if n_audio > cfg.max_audios_per_request:  # counted before any base64 is decoded
                    raise ApiError(400, f"a request may carry at most {cfg.max_audios_per_request} audio parts",
                                   param=index, code="audio_count")
                audio.append(_audio_part(part, index, cfg))
            else:
                raise ApiError(400, "unsupported content part type (use text and input_audio)",
                               param=f"{index}.type", code="invalid_value")
        text = " ".join(t.strip() for t in texts if t.strip())
        turns.append(ChatTurn(role, text, audio, param=f"messages.{m_i}"))
    if n_audio == 0:
        raise ApiError(400, "a request must carry at least one audio part (input_audio): this model answers about "
                            "audio", param="messages", code="audio_count")
    if turns[-1].role != "user":
        raise ApiError(400, "the last message must be a user message", param=turns[-1].param, code="invalid_value")
    check_prompt_chars("".join(t.text for t in turns), cfg)

    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = cfg.default_max_tokens
    if not 1 <= max_tokens <= cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens must be between 1 and {cfg.max_tokens_limit}",
                       param="max_tokens", code="invalid_value")
    return ChatRequest(model=body.model, turns=turns, max_tokens=max_tokens,
                       temperature=float(body.temperature or 0.0), top_p=float(body.top_p or 1.0),
                       seed=body.seed, stream=bool(body.stream), stop=_stop(body.stop))


def _stop(value: str | list[str] | None) -> list[str] | None:
    """OpenAI's `stop`: None, one string or a list of up to MAX_STOP_STRINGS non-empty strings of at most
    MAX_STOP_CHARS characters each (an empty list means none)."""
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if len(stops) > MAX_STOP_STRINGS:
        raise ApiError(400, f"stop may hold at most {MAX_STOP_STRINGS} strings", param="stop", code="invalid_value")
    for i, stop in enumerate(stops):
        param = "stop" if isinstance(value, str) else f"stop.{i}"
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise ApiError(400, f"a stop string must hold 1 to {MAX_STOP_CHARS} characters", param=param,
                           code="invalid_value")
        _text(stop, param)
    return stops or None


def check_prompt_chars(prompt: str, cfg: ServeConfig, param: str = "messages") -> None:
    """The cheap prompt limit, before any tokenizing (a 25 MB prompt must not reach the tokenizer)."""
    if len(prompt) > cfg.max_prompt_chars:
        raise ApiError(400, f"the prompt is longer than {cfg.max_prompt_chars} characters", param=param,
                       code="prompt_too_long")


class PromptChecker:
    """The prompt checks that need the tokenizer: no special or added token text (`<sound>`, `<|im_start|>`
    would break the audio expansion or the chat template), at most `max_prompt_tokens` tokens; and the context
    check after featurizing, `prompt_tokens + max_tokens <= max_model_len` (vLLM's rule)."""

    def __init__(self, tokenizer: Any, cfg: ServeConfig):
        self.tokenizer, self.cfg = tokenizer, cfg
        from af3dist.data.features import special_token_pattern  # the data plane's one rule (torch: lazily)

        self.forbidden = special_token_pattern(tokenizer)

    def check(self, turns: Sequence[ChatTurn]) -> None:
        """The text of every turn (system and assistant turns too: the model reads them all), the limits on
        the whole conversation's text."""
        check_prompt_chars("".join(t.text for t in turns), self.cfg)
        n = 0
        for turn in turns:
            if turn.text and self.forbidden and self.forbidden.search(turn.text):
                raise ApiError(400, "the prompt holds a special token of the model (such as <sound>); remove it",
                               param=turn.param, code="special_token_in_prompt")
            n += len(self.tokenizer(turn.text, add_special_tokens=False)["input_ids"]) if turn.text else 0
        if n > self.cfg.max_prompt_tokens:
            raise ApiError(400, f"the prompt is {n} tokens; the limit is {self.cfg.max_prompt_tokens}",
                           param="messages", code="prompt_too_long")

    def check_context(self, prompt_tokens: int, max_tokens: int) -> None:
        if prompt_tokens + max_tokens > self.cfg.max_model_len:
            raise ApiError(400, f"this model's maximum context length is {self.cfg.max_model_len} tokens; the "
                                f"request asks for {prompt_tokens + max_tokens} ({prompt_tokens} in the messages, "
                                f"audio included, {max_tokens} in the completion): shorten the audio, the prompt "
                                "or max_tokens", param="max_tokens", code="context_length_exceeded")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def chat_completion(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int) -> dict[str, Any]:
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def chunk(cid: str, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> str:
    """One server-sent event in OpenAI's `chat.completion.chunk` format."""
    body = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    return f"data: {json.dumps(body)}\n\n"


DONE = "data: [DONE]\n\n"
