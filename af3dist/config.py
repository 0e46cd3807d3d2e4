"""Typed run configuration: YAML presets shipped in the package, user YAML files, `key=value` overrides.

Everything is validated up front so that a typo fails in the driver with a message naming the field and
the allowed values, not minutes later inside a Ray worker.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from af3dist import storage

PRESETS_PACKAGE = "af3dist.presets"
# The one default instruction: training, evaluation, batch captioning, serving and `Captioner` all use it.
DEFAULT_PROMPT = "Describe the audio."


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and what is allowed."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def expand_path(value: str) -> str:
    """Local paths become absolute (`~` and `$VARS` expanded): Ray workers run in other directories.
    URLs (s3://, hf://, ...) pass through unchanged."""
    return storage.absolute(value)


def expand_model_path(value: str) -> str:
    """A hub id (org/name) stays as it is; anything that looks like or is a local path is made absolute."""
    expanded = os.path.expanduser(os.path.expandvars(value))
    if storage.is_remote(value) or not (os.path.exists(expanded) or value.startswith((".", "/", "~", "$"))):
        return value
    return os.path.abspath(expanded)


class TinyModelConfig(_Section):
    """Sizes of the embedded stand-in AF3 (the real classes, tiny dimensions)."""

    seed: int = 0
    vocab_size: int = Field(512, ge=300, description="target size of the locally trained byte-level BPE")
    audio_hidden_size: int = Field(32, ge=8)
    audio_layers: int = Field(2, ge=1)
    audio_heads: int = Field(2, ge=1)
    audio_intermediate_size: int = Field(64, ge=8)
    text_hidden_size: int = Field(64, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    text_kv_heads: int = Field(2, ge=1)
    text_intermediate_size: int = Field(128, ge=8)
    # A frozen random output head drawn at the usual 0.02 std caps every logit near 1, so no LoRA can make a
    # token likely; a trained head has far more range. Drawing it wider makes the stand-in learnable.
    output_init_std: float = Field(0.2, gt=0)


class ModelConfig(_Section):
    # A hub id (nvidia/audio-flamingo-3-hf) or a local folder; loaded the same way in both cases.
    name_or_path: str = "nvidia/audio-flamingo-3-hf"
    # When set and `name_or_path` is a missing local folder, the tiny stand-in is built there first.
    build_tiny: TinyModelConfig | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"

    _expand = field_validator("name_or_path")(lambda cls, v: expand_model_path(v))


class SyntheticDataConfig(_Section):
    """Sizes of the generated AudioCaps stand-in."""

    seed: int = 0
    train_clips: int = Field(256, ge=1)
    validation_clips: int = Field(24, ge=1)
    test_clips: int = Field(24, ge=1)
    shards: int = Field(2, ge=1)
    long_clips: int = Field(1, ge=0)


class DataConfig(_Section):
    # Local folder, any fsspec URL (s3://bucket/audiocaps) or hf://datasets/OpenSound/AudioCaps.
    source: str = "hf://datasets/OpenSound/AudioCaps"
    # When set and `source` is a missing local folder, synthetic AudioCaps is generated there first.
    synthetic: SyntheticDataConfig | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    test_split: str = "test"
    prompt: str = DEFAULT_PROMPT
    max_audio_seconds: float = Field(30.0, gt=0, description="longer clips are dropped as too_long")
    resample_quality: Literal["VHQ", "HQ", "MQ", "LQ", "QQ"] = "HQ"
    decode_batch_size: int = Field(16, ge=1, description="rows a data task decodes and featurizes at a time")
    rows_per_task: int = Field(256, ge=1, description="a data task reads consecutive row groups of the read plan, "
                               "across shards, until it holds at least this many rows: fewer, longer tasks (each "
                               "costs Ray a scheduling round trip), whose rows still flow a block at a time")
    cpus_per_data_task: float = Field(1.0, gt=0)
    max_data_tasks: int | None = Field(None, ge=1, description="cap on concurrent decode/featurize tasks")
    error_rate_ceiling: float = Field(0.2, ge=0, le=1)
    min_rows_before_ceiling: int = Field(50, ge=1)
    bucket_pool_batches: int = Field(16, ge=1, description="batches pooled and sorted by length (a stream's "
                                     "first pools hold 1, 2, 4, ... batches)")
    block_mb: float | None = Field(4.0, gt=0, description="Ray Data block size (MiB) of the examples: a data task "
                                   "hands its rows on a block at a time as it goes, so the first rows reach the "
                                   "consumer after a few clips, not a whole row group; null: Ray's default")
    shuffle: bool = True
    seed: int = 0

    _expand = field_validator("source")(lambda cls, v: expand_path(v))


class LoraConfig(_Section):
    """LoRA on the language model only; the upstream target names also match the Whisper encoder's
    q/k/v projections, so targets are scoped to `scope` unless it is widened on purpose."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    scope: Literal["language_model", "language_model+audio_tower"] = "language_model"
    train_projector: bool = True  # the projector becomes a fully trained module (modules_to_save)


class TrainConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(8, ge=1)
    grad_accum_steps: int = Field(1, ge=1)
    max_steps: int = Field(150, ge=1)
    learning_rate: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    lr_schedule: Literal["cosine", "linear"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    zero_stage: Literal[2, 3] = 2
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    gradient_checkpointing: bool | Literal["auto"] = Field(
        False, description="auto: off when the micro batch's activations fit the GPU with headroom, else on")
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="cut micro batches by this token budget (rows x longest row, audio tokens "
                                "included; at most micro_batch_size rows) instead of a fixed row count")
    log_sample_ids: bool = Field(False, description="write the example ids of every step to "
                                                    "<output_dir>/sample_ids/rank<R>.jsonl (local output dirs)")
    loss: Literal["labels_only", "full_logits"] = Field(
        "labels_only", description="labels_only: LM head + fp32 cross-entropy on the labelled positions only "
                                   "(same loss and gradients, N_labels x V logits); full_logits: transformers'")
    log_every: int = Field(10, ge=1)
    eval_every: int = Field(50, ge=1, description="validation loss and caption metrics every N steps")
    checkpoint_every: int = Field(50, ge=1)
    keep_checkpoints: int = Field(2, ge=1, description="top K by validation loss")
    eval_caption_clips: int = Field(16, ge=0, description="validation clips captioned for metrics")
    max_failures: int = Field(2, ge=0, description="worker failures survived by restoring the last checkpoint")
    run_name: str | None = None  # default: the output dir's name
    storage_path: str | None = None  # default: <output_dir>/ray_results; a URI (s3://...) on clusters
    push_to_hub: str | None = None  # repo id; needs HF_TOKEN
    seed: int = 0


API_KEY_ENV = "AF3DIST_API_KEY"  # where the serving API key comes from when serve.api_key is unset


class ServeConfig(_Section):
    """The HTTP service: batching, limits, adapters, and the replicas' scaling and resources.

    Every limit a client can run into is a field here; the README's Serving section lists each with the error
    code a request over it gets."""

    model_name: str | None = None  # what clients put in `model` for the base; default: the folder name / hub id
    adapters: dict[str, str] = {}  # adapter name (the `model` field) -> LoRA adapter folder or URI
    max_adapters_per_replica: int = Field(4, ge=1, description="least recently used adapters are evicted")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Dynamic batching; both can change at runtime through the deployment's user_config.
    max_batch_size: int = Field(8, ge=1)
    batch_wait_timeout_s: float = Field(0.02, ge=0)
    # Limits on what one request may ask for.
    max_audio_seconds: float = Field(30.0, gt=0, description="duration of one audio clip")
    max_audios_per_request: int = Field(4, ge=1, description="audio parts in one chat request, all user turns "
                                                             "together")
    max_request_audio_seconds: float = Field(60.0, gt=0, description="duration of all of a request's clips "
                                                                     "together (N clips must not cost N times "
                                                                     "max_audio_seconds)")
    max_body_mb: float = Field(25.0, gt=0, description="request body (and fetched audio file) size limit")
    default_max_tokens: int = Field(64, ge=1)
    max_tokens_limit: int = Field(256, ge=1)
    max_model_len: int = Field(8192, ge=16, description="prompt tokens (audio included) + max_tokens must fit, "
                                                        "as in vLLM; keep it within the model's context")
    max_prompt_chars: int = Field(8000, ge=1, description="characters of prompt text, checked before tokenizing")
    max_prompt_tokens: int = Field(1024, ge=1, description="tokens of prompt text (the audio's not counted)")
    max_messages: int = Field(64, ge=1, description="messages in a request, and content parts in one message")
    max_json_depth: int = Field(32, ge=4, description="nesting depth of the JSON body")
    max_json_number_chars: int = Field(40, ge=8, description="characters of any one number in the JSON body")
    max_audio_location_chars: int = Field(2048, ge=16, description="length of an audio part's path or URL")
    # Deadlines: every wait in the gateway has one.
    request_timeout_s: float = Field(60.0, gt=0, description="from the body read to the answer: parsing, "
                                                             "fetching, decoding and generation")
    body_read_timeout_s: float = Field(15.0, gt=0, description="to receive the whole request body")
    fetch_connect_timeout_s: float = Field(5.0, gt=0, description="to connect to an allow-listed URL")
    fetch_timeout_s: float = Field(20.0, gt=0, description="to read an allow-listed path or URL in full")
    http_request_timeout_s: float = Field(120.0, gt=0, description="Serve's HTTP proxy request_timeout_s (a last "
                                                                   "resort beyond the gateway's own deadlines)")
    # Overload: refuse fast (429/503 with Retry-After) instead of piling requests up.
    max_concurrent_requests: int = Field(192, ge=1, description="chat/caption requests one gateway replica works "
                                                                "on at once; more get 429")
    max_queued_requests: int = Field(128, ge=1, description="requests queued for the model replicas; more get 503")
    ingress_max_queued_requests: int = Field(512, ge=1, description="requests the HTTP proxy queues for the "
                                                                    "gateway; more get 503 from the proxy")
    retry_after_s: int = Field(1, ge=0, description="the Retry-After of every 429 and 503")
    # Bearer token clients must send; None falls back to $AF3DIST_API_KEY; "none" says deliberately no auth.
    api_key: str | None = None
    require_api_key: bool = Field(False, description="refuse to start without a key unless api_key is 'none' "
                                                     "(set for every non-loopback deployment)")
    # Prefixes (local folders or URLs such as s3://bucket/clips/) that audio parts may name by path or URL,
    # matched on the parsed URL (scheme, exact host, path prefix at a `/`). Empty: requests can only send
    # audio inline, the server never reads a path or fetches a URL for them.
    allowed_audio_sources: list[str] = []
    # Model replica health: Serve's health check and /readyz fail when the replica cannot generate.
    health_probe_interval_s: float = Field(30.0, gt=0, description="probe with a 1-token generation when no "
                                                                   "batch succeeded for this long")
    health_probe_timeout_s: float = Field(20.0, gt=0, description="the probe's deadline")
    max_batch_seconds: float = Field(300.0, gt=0, description="a batch running longer marks the replica unhealthy")
    # Model replicas: autoscaling, per-replica concurrency and resources.
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(8, gt=0)
    upscale_delay_s: float = Field(30, ge=0)
    downscale_delay_s: float = Field(600, ge=0)
    max_ongoing_requests: int = Field(32, ge=1)
    cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    graceful_shutdown_timeout_s: float = Field(30.0, gt=0, description="how long a stopping replica may finish "
                                                                     "its requests")
    ingress_replicas: int = Field(1, ge=1)
    ingress_cpus: float = Field(0.25, ge=0, description="CPUs per gateway replica")
    ingress_max_ongoing_requests: int = Field(256, ge=1, description="concurrent requests per gateway replica")

    _expand_adapters = field_validator("adapters")(lambda cls, v: {k: expand_path(p) for k, p in v.items()})

    @model_validator(mode="after")
    def _consistent(self) -> "ServeConfig":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must not exceed max_replicas ({self.max_replicas})")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) must not exceed max_tokens_limit "
                             f"({self.max_tokens_limit})")
        if self.max_tokens_limit >= self.max_model_len:
            raise ValueError(f"max_tokens_limit ({self.max_tokens_limit}) must be below max_model_len "
                             f"({self.max_model_len})")
        if self.max_concurrent_requests >= self.ingress_max_ongoing_requests:
            raise ValueError(f"max_concurrent_requests ({self.max_concurrent_requests}) must be below "
                             f"ingress_max_ongoing_requests ({self.ingress_max_ongoing_requests}), or Serve queues "
                             "what the gateway would refuse at once")
        if self.http_request_timeout_s <= self.body_read_timeout_s + self.request_timeout_s:
            raise ValueError(f"http_request_timeout_s ({self.http_request_timeout_s:g}) must exceed "
                             f"body_read_timeout_s + request_timeout_s ({self.body_read_timeout_s:g} + "
                             f"{self.request_timeout_s:g}), so the gateway's own deadlines answer first")
        return self

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 2**20)

    def resolved_api_key(self) -> str | None:
        """The key clients must send: `api_key`, else $AF3DIST_API_KEY; None for no auth (also for 'none')."""
        if self.api_key is not None:
            return None if self.api_key.strip().lower() == "none" else self.api_key
        return os.environ.get(API_KEY_ENV) or None


class RayConfig(_Section):
    address: str | None = None  # None: join RAY_ADDRESS if set, else start a local instance
    num_cpus: int | None = Field(None, ge=1, description="only for a local instance")


class EvalConfig(_Section):
    """Captioning a split to score it: `af3dist evaluate`, the main job's before/after evaluations, and the
    caption metrics during training (`train.eval_caption_clips` clips of the validation split)."""

    split: str | None = Field(None, description="default: data.test_split")
    limit: int | None = Field(None, ge=1, description="evaluate only the first N clips")
    batch_size: int = Field(8, ge=1, description="clips per generation batch")
    actors: int = Field(1, ge=1, description="captioning actors")
    use_gpu: bool = False
    cpus_per_actor: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(32, ge=1)


class CaptionBatchConfig(_Section):
    """Offline batch captioning (`af3dist caption-batch`, `ray_jobs.batch_caption`): every setting of a run,
    validated in the driver before anything starts. `model`, `input` and `output` have no preset value: a
    run names them (flags or `caption_batch.*=` overrides)."""

    model: str | None = Field(None, description="merged or base model folder / hub id, or an adapter folder")
    adapter: str | None = None
    input: str | None = Field(None, description="folder or glob of audio files, CSV/JSONL manifest, or parquet")
    output: str | None = Field(None, description="folder of output shards; rerun with the same one to resume")
    format: Literal["parquet", "jsonl"] = "parquet"
    prompt: str = DEFAULT_PROMPT
    split: str | None = Field(None, description="AudioCaps layout: caption data/<split>-*.parquet only")
    batch_size: int = Field(8, ge=1, description="clips per generate call")
    bucket_batches: int = Field(4, ge=1, description="batches per actor call, sorted by length first")
    actors: tuple[int, int] = Field((1, 1), description="(min, max) captioning actors")
    gpus_per_actor: float | None = Field(None, ge=0, description="default: 1 when the cluster has GPUs, else 0")
    cpus_per_actor: float | None = Field(None, gt=0, description="default: 1, less on a small CPU-only cluster")
    cpus_per_task: float = Field(0.25, gt=0, description="CPUs per read/decode/featurize task")
    read_batch_size: int = Field(16, ge=1, description="rows per read/decode/featurize batch")
    max_new_tokens: int = Field(64, ge=1)
    max_seconds: float = Field(600.0, gt=0, description="longer clips become too_long errors (AF3: 600 s)")
    max_file_mb: float = Field(512.0, gt=0, description="larger files become too_long errors unread")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    shard_rows: int = Field(1000, ge=1)
    flush_seconds: float = Field(60.0, gt=0, description="also write a shard this often (bounds lost work)")
    progress_seconds: float = Field(10.0, gt=0)
    limit: int | None = Field(None, ge=1, description="caption at most this many new inputs")
    retry_errors: bool = Field(False, description="also recaption ids whose stored error is transient "
                                                  "(unreadable, timeout, generation_failed)")
    lock_stale_seconds: float = Field(300.0, gt=0, description="take over an output lock whose heartbeat is "
                                                               "this old (captioning.lock.STALE_SECONDS)")

    @field_validator("actors", mode="before")
    @classmethod
    def _actors(cls, v: Any) -> Any:
        if isinstance(v, int):
            return (v, v)
        if isinstance(v, str):
            parts = v.replace("-", ",").split(",")
            return (int(parts[0]), int(parts[-1]))
        return v

    @field_validator("actors")
    @classmethod
    def _actors_range(cls, v: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= v[0] <= v[1]:
            raise ValueError(f"need 1 <= min <= max actors, got {v}")
        return v

    _paths = field_validator("input", "output")(lambda cls, v: v if v is None else expand_path(v))

    def require_run_fields(self) -> None:
        """A run needs a model, an input and an output (ConfigError naming the missing ones)."""
        missing = [f"caption_batch.{n}" for n in ("model", "input", "output") if getattr(self, n) is None]
        if missing:
            raise ConfigError(f"batch captioning needs {', '.join(missing)}")

    @classmethod
    def make(cls, **kwargs: Any) -> "CaptionBatchConfig":
        """Validate, turning pydantic's error into a ConfigError that names the field."""
        try:
            return cls(**kwargs)
        except ValidationError as err:
            raise ConfigError(format_errors(err, cls)) from None


class Config(_Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    caption_batch: CaptionBatchConfig = CaptionBatchConfig()
    ray: RayConfig = RayConfig()
    serve: ServeConfig = ServeConfig()
    output_dir: str = "outputs/run"

    _expand = field_validator("output_dir")(lambda cls, v: expand_path(v))


def preset_names() -> list[str]:
    return sorted(p.name[: -len(".yaml")] for p in resources.files(PRESETS_PACKAGE).iterdir()
                  if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> dict[str, Any]:
    if name_or_path in preset_names():
        text = resources.files(PRESETS_PACKAGE).joinpath(f"{name_or_path}.yaml").read_text()
    elif Path(name_or_path).is_file():
        text = Path(name_or_path).read_text()
    else:
        raise ConfigError(f"config {name_or_path!r} is neither a preset ({', '.join(preset_names())}) "
                          f"nor a YAML file")
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path!r} must be a YAML mapping, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (numbers, null, lists)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.field=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def format_errors(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            section: Any = model
            for p in e["loc"][:-1]:
                section = section.model_fields[p].annotation
                section = next((a for a in getattr(section, "__args__", (section,)) if a is not type(None)),
                               section)
            allowed = ", ".join(section.model_fields) if hasattr(section, "model_fields") else "?"
            msg = f"unknown field (allowed: {allowed})"
        elif "input" in e and not isinstance(e["input"], dict):
            msg = f"{msg} (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}")
    return "invalid config:\n" + "\n".join(lines)


def validate(data: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, Config)) from None


def load_config(name_or_path: str = "tiny", overrides: list[str] | None = None) -> Config:
    """Read a preset or YAML file, apply `key=value` overrides, validate everything."""
    data = _read_yaml(name_or_path)
    for override in overrides or []:
        apply_override(data, override)
    return validate(data)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
