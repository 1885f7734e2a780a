"""Service configuration: one pydantic model holding every option (the table in service/README.md mirrors it).

Read from a YAML file: ``$ERASURE_SERVICE_CONFIG`` if set, else ``service/config.yaml``. Relative paths in the
file (``lock``, ``registry``) are taken from the file's directory, so a config and its lock travel together.
Top-level scalar options can be overridden by environment variables ``ERASURE_SERVICE_<OPTION>`` (upper case,
e.g. ``ERASURE_SERVICE_DEVICE=cuda``, ``ERASURE_SERVICE_LOCK=/srv/packs.lock``), options of a section by
``ERASURE_SERVICE_<SECTION>_<OPTION>`` (``ERASURE_SERVICE_AUTH_ENABLED=true``); the environment wins over the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml  # PyYAML: already a BentoML dependency (bentofile.yaml), no new requirement
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from erasure.errors import InvalidArgumentError
from erasure.sampling.request import RequestRange

CONFIG_ENV = "ERASURE_SERVICE_CONFIG"
ENV_PREFIX = "ERASURE_SERVICE_"
DEFAULT_CONFIG = Path(__file__).parent / "config.yaml"


class PackEntry(BaseModel):
    """A pack pulled from ``registry`` by repository instead of from the lock."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="the name requests use for this pack")
    repo: str = Field(description="repository id in the registry, e.g. toy/circle")
    revision: str = Field("main", description="branch, tag or 40-hex sha; resolved (pinned) once at start-up")


class Limits(RequestRange):
    """Request limits; anything outside is a 400 that says the allowed range. The request range (steps, size,
    guidance, negative prompt) is RequestRange, the same declaration `erasure attack` searches over."""

    max_images: int = Field(4, ge=1, description="largest `num_images` per request")
    max_prompt_chars: int = Field(300, ge=1, description="longest `prompt` / `negative_prompt` in characters")


class Auth(BaseModel):
    """Access control (service/auth.py): API keys, stored hashed, as ``Authorization: Bearer`` on every route but
    the probes and the page's static files; a per-key rate limit on the generate APIs."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(False, description="require an API key (off on the embedded default)")
    keys_file: str | None = Field(None, description="secrets file, one key per line: `NAME sha256:HEX "
                                                     "[rate_limit=N]` (`python -m service.auth new-key NAME`); "
                                                     "$ERASURE_API_KEYS adds lines")
    rate_limit: int = Field(0, ge=0, description="generate requests per minute per key (a token bucket of that "
                                                 "size); 0 = unlimited; a key line's rate_limit=N overrides it")
    protect_metrics: bool = Field(False, description="/metrics needs a key too")


class ServiceConfig(BaseModel):
    """Every option of the service. See service/README.md for a table with examples."""

    model_config = ConfigDict(extra="forbid")
    base: str = Field("toy", description="base pipeline: 'toy' (shipped), a local diffusers directory or a Hub id")
    base_revision: str | None = Field(None, description="Hub revision of `base` (ignored for 'toy' and directories)")
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="model dtype")
    lock: str | None = Field("packs.lock", description="packs.lock to load packs from (pinned shas, file hashes)")
    registry: str | None = Field(None, description="local registry directory or http(s) Hub endpoint for "
                                                    "`packs` entries given by repo; None: the shipped registry")
    packs: Literal["all"] | list[str | PackEntry] = Field(
        "all", description="'all' (every pack in the lock), or a list of lock names and {name, repo, revision}")
    mandatory: list[str] = Field(default_factory=list, description="packs applied to every request")
    scales: dict[str, float] = Field(default_factory=dict, description="pack name -> scale (default 1.0)")
    default_steps: int = Field(20, ge=1, description="`steps` when a request gives none")
    default_guidance: float = Field(3.0, ge=0, description="`guidance_scale` when a request gives none")
    default_size: int | None = Field(None, description="width/height when a request gives none; None: the "
                                                       "base model's native size (64 for the toy)")
    limits: Limits = Field(default_factory=Limits)
    auth: Auth = Field(default_factory=Auth)
    max_attack_success: float | None = Field(
        0.10, ge=0, le=1, description="highest attack success a pack's red-team record (`erasure attack --record`) "
        "may show for the families a request can reach (prompt, settings); a pack without a record, above it, or "
        "red-teamed within narrower limits than `limits` is refused at start-up. None: no check")
    max_attack_gain: float | None = Field(
        0.10, ge=0, le=1, description="a pack, mandatory or optional, whose red-team record shows an attack a request "
        "can mount drawing its concept more often than the base does on that same attack, by more than this, is "
        "refused at start-up (a pack must never make its concept more likely). None: no check")
    redteam_check: Literal["mandatory", "all"] = Field(
        "mandatory", description="which packs `max_attack_success` applies to: the mandatory ones, or all")
    threads: int = Field(4, ge=1, description="requests one worker runs concurrently (BentoML `threads`)")
    workers: int = Field(1, ge=1, description="BentoML worker processes (each loads the model)")
    timeout: int = Field(300, ge=1, description="request timeout in seconds (BentoML traffic.timeout)")
    precompose: bool = Field(True, description="build the mandatory set and mandatory+each optional pack at "
                                               "start-up so no first request pays for it")
    precompose_sets: list[list[str]] = Field(default_factory=list, description="further pack sets to build at "
                                                                                "start-up (optional names)")
    pack_set_cache: int = Field(8, ge=0, description="pack-set UNets kept beyond the precomposed ones (LRU)")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads at start-up; None: torch's")
    batching: bool = Field(True, description="concurrent requests share UNet calls, any pack sets mixed (see "
                                             "'Batching'); false: one pipeline call per image, byte-identical to "
                                             "the request served alone")
    max_batch_size: int = Field(16, ge=1, description="most images in flight in one batch (a guided image is two "
                                                      "UNet rows)")
    max_latency_ms: float = Field(5.0, ge=0, description="how long an idle batcher waits for more requests before "
                                                         "it starts a batch")
    continuous: bool = Field(True, description="requests join a running batch at a step boundary; false: a batch "
                                               "runs to its end before the next one forms")
    max_queue: int | None = Field(None, ge=1, description="images (batching) or requests (batching off) that may "
                                  "wait for the model; one more is answered 503 with Retry-After, never queued. "
                                  "None: 4 x max_batch_size images (4 x threads requests)")
    deadline: float | None = Field(None, gt=0, description="seconds a request may take from its arrival; one whose "
                                   "images are not ready by then leaves the queue or the batch and is answered 503 "
                                   "(every image served is served within it). None: only `timeout`")

    source_path: Path | None = Field(None, exclude=True, description="(set by load) the file this came from")

    @field_validator("mandatory")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"mandatory lists a pack twice: {v}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ServiceConfig":
        if self.packs != "all":
            names = [p if isinstance(p, str) else p.name for p in self.packs]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"packs lists {dup} more than once")
        # a request that gives no value gets the default: it must be one the limits allow
        for default, limit in (("default_steps", "max_steps"), ("default_guidance", "max_guidance"),
                               ("default_size", "max_size")):
            value, most = getattr(self, default), getattr(self.limits, limit)
            if value is not None and value > most:
                raise ValueError(f"{default} {value} is above limits.{limit} {most}")
        for default, limit in (("default_steps", "min_steps"), ("default_guidance", "min_guidance")):
            value, least = getattr(self, default), getattr(self.limits, limit)
            if value < least:
                raise ValueError(f"{default} {value} is below limits.{limit} {least}")
        if self.batching and self.max_batch_size < self.limits.max_images:
            raise ValueError(f"max_batch_size ({self.max_batch_size}) must be at least limits.max_images "
                             f"({self.limits.max_images}): a request's images run in one batch")
        return self

    @property
    def home(self) -> Path:
        return self.source_path.parent if self.source_path else Path.cwd()

    def resolve_path(self, value: str | None) -> Path | None:
        if value is None:
            return None
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.home / p

    def pack_names(self, lock_names: list[str]) -> list[str]:
        """Names of the packs to load, in config order ('all': the lock's, sorted)."""
        if self.packs == "all":
            return sorted(lock_names)
        return [p if isinstance(p, str) else p.name for p in self.packs]

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, env: dict[str, str] | None = None) -> "ServiceConfig":
        """The config from ``path`` (else $ERASURE_SERVICE_CONFIG, else service/config.yaml) plus env overrides."""
        env = dict(os.environ if env is None else env)
        path = Path(path or env.get(CONFIG_ENV) or DEFAULT_CONFIG).expanduser().absolute()
        if not path.is_file():
            raise InvalidArgumentError(f"service config {path} does not exist (set {CONFIG_ENV} to a YAML file)")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise InvalidArgumentError(f"service config {path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"service config {path} must be a mapping of options")
        def scalar(raw: str) -> str | None:
            return None if raw.lower() in ("none", "null") else raw

        for name, field in cls.model_fields.items():
            key = ENV_PREFIX + name.upper()
            if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
                # a section (limits, auth): ERASURE_SERVICE_<SECTION>_<OPTION>, e.g. ERASURE_SERVICE_AUTH_ENABLED
                for sub in field.annotation.model_fields:
                    if f"{key}_{sub.upper()}" in env:
                        section = data.get(name) if isinstance(data.get(name), dict) else {}
                        data[name] = {**section, sub: scalar(env[f"{key}_{sub.upper()}"])}
            elif key in env and name != "source_path":
                raw = env[key]
                if name in ("mandatory", "packs") and raw != "all":
                    data[name] = [x.strip() for x in raw.split(",") if x.strip()]  # comma-separated names
                else:
                    data[name] = scalar(raw)
        try:
            return cls.model_validate({**data, "source_path": path})
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
            raise InvalidArgumentError(f"service config {path}: {errors}") from None
