"""The OpenAI-compatible wire format: parse and check requests, shape responses, stream chunks and errors.

Pure functions with no Ray or model inside, so every refusal is decided (and tested) before a request
costs any model time. Audio comes inline as base64 (`input_audio`); a part that names a local path or a
URL is refused unless the config's `allowed_audio_sources` lists a prefix that covers it, because the
processor's chat template would otherwise read any file or fetch any URL a client names.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from af3dist.config import ServeConfig

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")


class ApiError(Exception):
    """A request the service refuses: an HTTP status and an OpenAI-shaped error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_body(status: int, message: str, code: str | None = None) -> dict[str, Any]:
    kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
    return ApiError(status, message, kind, code=code).body()


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
    temperature: StrictFloat | StrictInt | None = Field(None, ge=0, le=2)
    top_p: StrictFloat | StrictInt | None = Field(None, gt=0, le=1)
    seed: StrictInt | None = None
    stream: StrictBool | None = False
    n: StrictInt | None = Field(None, ge=1, le=1)


@dataclass
class AudioRef:
    """Where a request's audio is: inline bytes, or an allow-listed path/URL the server may read."""

    data: bytes | None = None
    location: str | None = None


@dataclass
class ChatRequest:
    model: str | None
    audio: AudioRef
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stream: bool


def parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None


def _location_allowed(location: str, allowed: list[str]) -> bool:
    if "://" in location:
        return any(location.startswith(prefix) for prefix in allowed if "://" in prefix)
    real = os.path.realpath(location)  # no escaping an allowed folder with ../ or a symlink
    return any(real == os.path.realpath(p) or real.startswith(os.path.realpath(p).rstrip(os.sep) + os.sep)
               for p in allowed if "://" not in p)


def _audio_part(part: dict[str, Any], index: str, cfg: ServeConfig) -> AudioRef:
    kind = part.get("type")
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise ApiError(400, "input_audio must be an object with `data` and `format`", param=index)
        data, fmt = spec.get("data"), spec.get("format")
        if fmt not in AUDIO_FORMATS:
            raise ApiError(400, f"input_audio.format must be one of {', '.join(AUDIO_FORMATS)}, got {fmt!r}",
                           param=f"{index}.input_audio.format", code="unsupported_format")
        if not isinstance(data, str) or not data:
            raise ApiError(400, "input_audio.data must be a non-empty base64 string",
                           param=f"{index}.input_audio.data")
        try:
            return AudioRef(data=base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise ApiError(400, "input_audio.data is not valid base64", param=f"{index}.input_audio.data",
                           code="invalid_base64") from None
    # Parts that name a file or URL (the processor's own `audio` part, or an `audio_url` part).
    location = part.get("path") or part.get("url")
    if isinstance(part.get("audio_url"), dict):
        location = part["audio_url"].get("url")
    if not isinstance(location, str) or not location:
        raise ApiError(400, f"an {kind} part must carry audio (input_audio with base64 data)", param=index)
    if not _location_allowed(location, cfg.allowed_audio_sources):
        raise ApiError(400, f"audio by path or URL is not allowed here ({location!r}); send it inline as "
                            "input_audio", param=index, code="audio_source_not_allowed")
    return AudioRef(location=location)


def parse_chat_request(payload: Any, cfg: ServeConfig) -> ChatRequest:
    """A checked chat-completions request: exactly one audio part, the last user turn's text as prompt."""
    if not isinstance(payload, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = _ChatBody.model_validate(payload)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ApiError(400, f"{loc}: {first['msg']}", param=loc, code="invalid_value") from None

    audio: list[AudioRef] = []
    prompt_parts: list[str] = []
    for m_i, message in enumerate(body.messages):
        parts = [{"type": "text", "text": message.content}] if isinstance(message.content, str) else (
            message.content or [])
        for p_i, part in enumerate(parts):
            index = f"messages.{m_i}.content.{p_i}"
            kind = part.get("type")
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    raise ApiError(400, "a text part needs a string `text`", param=f"{index}.text")
                if message.role == "user":
                    prompt_parts.append(part["text"])
            elif kind in ("input_audio", "audio", "audio_url"):
                if message.role != "user":
                    raise ApiError(400, "audio is only accepted in user messages", param=index)
                audio.append(_audio_part(part, index, cfg))
            else:
                raise ApiError(400, f"unsupported content part type {kind!r} (use text and input_audio)",
                               param=f"{index}.type")
        if message.role == "user" and m_i != len(body.messages) - 1:
            prompt_parts = []  # only the last user turn is the question about the clip
    if len(audio) != 1:
        raise ApiError(400, f"a request must carry exactly one audio part, got {len(audio)}",
                       param="messages", code="audio_count")

    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None:
        max_tokens = cfg.default_max_tokens
    if not 1 <= max_tokens <= cfg.max_tokens_limit:
        raise ApiError(400, f"max_tokens must be between 1 and {cfg.max_tokens_limit}, got {max_tokens}",
                       param="max_tokens", code="invalid_value")
    prompt = " ".join(t.strip() for t in prompt_parts if t.strip())
    return ChatRequest(model=body.model, audio=audio[0], prompt=prompt, max_tokens=max_tokens,
                       temperature=float(body.temperature or 0.0), top_p=float(body.top_p or 1.0),
                       seed=body.seed, stream=bool(body.stream))


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
