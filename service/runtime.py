"""What the service does at load time and per request, without any HTTP: pull, verify, compose, generate.

Race-free per-request packs. The base pipeline is loaded once and never mutated afterwards. Each distinct pack set
(mandatory packs + the ones a request names, sorted) gets its own UNet from
``erasure.pack.compose.compose_denoiser``: the copy shares every untouched parameter tensor with the base, only the
tensors the packs touch are new (for esd-x, the cross-attention weights: ~6 % of the toy UNet). Copies live in a small
LRU cache keyed by the pack set and are built once under a per-key lock; the sets known at start-up are precomposed
and pinned.

Generation. With ``batching`` (the default) a request is a job for the batcher (service/batcher.py): one thread
runs every request in flight through shared UNet calls, each request with its own scheduler, noise and pack-set
UNet. Without it, every request runs a *fresh* pipeline object (shared vae / text encoder, a per-thread tokenizer,
the pack-set UNet, a new scheduler from config), because diffusers pipelines and schedulers keep per-call mutable
state (timesteps, step index, guidance scale). Either way nothing a request does is visible to another request.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import threading
import time
from typing import Any

import torch

from erasure.base.families import family_of
from erasure.base.loading import load_pipeline
from erasure.errors import ErasureError
from erasure.pack.compose import compose_denoiser
from erasure.pack.concept_pack import BaseWeights, ConceptPack
from erasure.redteam.families import reachable_families
from erasure.sampling.generate import share_pipeline

from .config import ServiceConfig

logger = logging.getLogger("erasure.service")

PackSet = tuple[str, ...]  # sorted pack names


class StartupError(RuntimeError):
    """The service refuses to become ready (fail closed); the message names the pack and why."""


@dataclasses.dataclass(frozen=True)
class LoadedPack:
    name: str
    pack: ConceptPack
    scale: float
    mandatory: bool
    repo: str
    sha: str  # 40-hex commit the pack was pinned to
    source: str

    def info(self) -> dict[str, Any]:
        m = self.pack.manifest
        rt = m.redteam
        redteam = None
        if rt is not None:
            family, asr = rt.worst()
            redteam = {"attack_success_rate": asr, "attack": family, "base_rate": rt.base_rate[family],
                       "asr": rt.asr, "judge": rt.judge, "seeds": rt.config.seeds}
        return {"name": self.name, "concepts": list(m.concepts), "method": m.method, "mandatory": self.mandatory,
                "scale": self.scale, "sha": self.sha, "repo": self.repo, "source": self.source,
                "base": m.base.id, "tensors": len(m.tensors), "guide_away": m.guide_away, "redteam": redteam}


@dataclasses.dataclass
class _Entry:
    denoiser: torch.nn.Module
    build_seconds: float
    extra_bytes: int  # memory of the tensors this copy does not share with the base
    pinned: bool


class PackSetCache:
    """Pack set -> UNet (compose_denoiser of the base). Built once per key; unpinned entries are evicted LRU."""

    def __init__(self, base: BaseWeights, packs: dict[str, LoadedPack], capacity: int):
        self.base, self.base_denoiser, self.packs, self.capacity = base, base.module, packs, capacity
        self._base_ptrs = {p.data_ptr() for p in base.state.values()}
        self._entries: collections.OrderedDict[PackSet, _Entry] = collections.OrderedDict()
        self._building: dict[PackSet, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: PackSet, pin: bool = False) -> tuple[torch.nn.Module, bool]:
        """The UNet for ``key`` and whether this call built it."""
        if not key:
            return self.base_denoiser, False
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                entry.pinned |= pin
                return entry.denoiser, False
            building = self._building.setdefault(key, threading.Lock())
        with building:  # one thread builds a key; others wait for it, other keys go on in parallel
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    return entry.denoiser, False
            t0 = time.perf_counter()
            denoiser = compose_denoiser(self.base, [(self.packs[n].pack, self.packs[n].scale) for n in key])
            seconds = time.perf_counter() - t0
            extra = sum(p.numel() * p.element_size() for p in denoiser.parameters()
                        if p.data_ptr() not in self._base_ptrs)
            with self._lock:
                self._entries[key] = _Entry(denoiser, seconds, extra, pin)
                self._building.pop(key, None)
                self._evict()
            logger.info("composed pack set %s in %.3f s (+%.2f MB)", list(key), seconds, extra / 2**20)
            return denoiser, True

    def _evict(self) -> None:
        unpinned = [k for k, e in self._entries.items() if not e.pinned]
        for key in unpinned[: max(0, len(unpinned) - self.capacity)]:
            del self._entries[key]

    def stats(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"packs": list(k), "build_seconds": round(e.build_seconds, 4), "extra_bytes": e.extra_bytes,
                     "pinned": e.pinned} for k, e in self._entries.items()]


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class Runtime:
    """The loaded base pipeline, the verified packs and the pack-set cache."""

    def __init__(self, config: ServiceConfig):
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        self.device = _device(config.device)
        dtype = getattr(torch, config.dtype)
        t0 = time.perf_counter()
        try:
            self.pipe = load_pipeline(config.base, device=self.device, dtype=dtype, revision=config.base_revision)
            self.family = family_of(self.pipe)
        except ErasureError as exc:
            raise StartupError(f"base pipeline {config.base!r}: {exc}") from None
        for module in self.pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval().requires_grad_(False)
        self.base_seconds = time.perf_counter() - t0
        self.native_size = self.family.native_size(self.pipe)
        # width/height must survive the VAE and every down-sampling of the denoiser without rounding
        self.size_multiple = self.family.size_multiple(self.pipe)
        # fingerprints computed once, for every pack checked or composed on it
        self.base = BaseWeights(self.family.denoiser(self.pipe))
        self.packs = self._load_packs()
        self.mandatory: PackSet = tuple(sorted(config.mandatory))
        self.cache = PackSetCache(self.base, self.packs, config.pack_set_cache)
        self._local = threading.local()
        self.precompose_seconds = self._precompose()
        self.batcher = None
        if config.batching:
            from .batcher import Batcher

            self.batcher = Batcher(self.pipe, config.max_batch_size, config.max_latency_ms, config.continuous,
                                   max_queue=config.max_queue)

    # --- start-up -----------------------------------------------------------------------------------------------

    def _load_packs(self) -> dict[str, LoadedPack]:
        cfg = self.config
        from registry import DEFAULT_REGISTRY, open_registry, registry_for_source
        from registry.lock import LockFile

        entries = {p.name: p for p in (cfg.packs if cfg.packs != "all" else []) if not isinstance(p, str)}
        lock = None
        lock_path = cfg.resolve_path(cfg.lock)
        if cfg.packs == "all" or any(isinstance(p, str) for p in cfg.packs):
            if lock_path is None:
                raise StartupError("packs are taken from the lock but `lock` is not set")
            try:
                lock = LockFile.load(lock_path)
            except ErasureError as exc:
                raise StartupError(str(exc)) from None
        names = cfg.pack_names(list(lock.entries) if lock else [])
        for option in ("mandatory", "scales"):
            unknown = sorted(set(getattr(cfg, option)) - set(names))
            if unknown:
                raise StartupError(f"`{option}` names pack(s) {unknown} that are not loaded (loaded: {names})")
        registry = None
        out: dict[str, LoadedPack] = {}
        for name in names:
            try:
                if name in entries:
                    e = entries[name]
                    if registry is None:
                        reg_path = cfg.registry
                        if reg_path and not reg_path.startswith(("http://", "https://")):
                            reg_path = str(cfg.resolve_path(reg_path))
                        # never open_registry() bare: it would follow $HF_ENDPOINT; None means the shipped one
                        registry = registry_for_source(reg_path) if reg_path else open_registry(
                            registry_dir=DEFAULT_REGISTRY)
                    pulled = registry.pull(e.repo, e.revision, base=self.base)
                    source = registry.source
                else:
                    if name not in lock.entries:
                        raise StartupError(f"pack {name!r}: not in the lock {lock_path} "
                                           f"(it locks {sorted(lock.entries) or 'nothing'})")
                    pulled = lock.fetch([name], base=self.base)[name]  # verified, base fingerprint included
                    source = lock.entries[name].source
                pack = pulled.pack
            except StartupError:
                raise
            except (ErasureError, OSError, ValueError) as exc:
                raise StartupError(f"pack {name!r}: {exc}") from None
            out[name] = LoadedPack(name=name, pack=pack, scale=float(cfg.scales.get(name, 1.0)),
                                   mandatory=name in cfg.mandatory, repo=pulled.repo, sha=pulled.commit_sha,
                                   source=source)
            logger.info("pack %r verified: %s@%s (%s, %s)", name, pulled.repo, pulled.commit_sha[:12],
                        pack.manifest.method, ", ".join(pack.manifest.concepts))
            self._check_gain(name, pack)
            if cfg.max_attack_success is not None and (cfg.redteam_check == "all" or name in cfg.mandatory):
                self._check_redteam(name, pack)
        return out

    def _check_gain(self, name: str, pack: ConceptPack) -> None:
        """Fail closed on any pack whose record shows it drawing its concept more often than the base does, on an
        attack a request can mount, by more than ``max_attack_gain``."""
        record, margin = pack.manifest.redteam, self.config.max_attack_gain
        if record is None or margin is None:
            return
        worse = record.amplified(margin, reachable_families())
        if worse:
            r = max(worse, key=lambda f: f.asr - f.base_rate)
            raise StartupError(f"pack {name!r}: draws {r.concept} more often than the base: {r.asr:.0%} vs the "
                               f"base's {r.base_rate:.0%} on its {r.family} attack {record.attack_text(r)} "
                               f"(+{100 * (r.asr - r.base_rate):.0f} points, above max_attack_gain "
                               f"{100 * margin:.0f}); drop it from the lock or retrain it")

    def _check_redteam(self, name: str, pack: ConceptPack) -> None:
        """Fail closed unless the pack's red-team record covers what a request can set and every family a
        request can reach stays at or under ``max_attack_success``."""
        cfg, lim = self.config, self.config.limits
        record, bar = pack.manifest.redteam, cfg.max_attack_success
        if record is None:
            raise StartupError(f"pack {name!r}: no red-team record (max_attack_success is {bar:.0%}); run "
                               "`erasure attack PACK --record` and publish the new revision, or set "
                               "max_attack_success: null")
        missing = [f for f in reachable_families() if f not in record.asr]
        if missing:
            raise StartupError(f"pack {name!r}: its red-team record has no {', '.join(missing)} figure; re-attack "
                               "with every family")
        narrower = record.config.uncovered(lim)
        if narrower:
            raise StartupError(f"pack {name!r}: red-teamed within narrower limits than this service allows "
                               f"({'; '.join(narrower)}); narrow `limits` or re-attack over the service's range")
        family, asr = record.worst(reachable_families())
        if asr > bar:
            raise StartupError(f"pack {name!r}: red-team attack success {asr:.0%} ({family}, base "
                               f"{record.base_rate.get(family, float('nan')):.0%}) is above max_attack_success "
                               f"{bar:.0%}")
        logger.info("pack %r red-team record: %s (bar %.0f%%)", name,
                    ", ".join(f"{f} {a:.0%}" for f, a in record.asr.items()), 100 * bar)

    def _precompose(self) -> float:
        cfg = self.config
        sets: list[PackSet] = []
        if cfg.precompose:
            sets.append(self.mandatory)
            sets += [self.pack_set([n]) for n in self.packs if n not in self.mandatory]
        for names in cfg.precompose_sets:
            unknown = sorted(set(names) - set(self.packs))
            if unknown:
                raise StartupError(f"precompose_sets names pack(s) {unknown} that are not loaded")
            sets.append(self.pack_set(names))
        t0 = time.perf_counter()
        for key in dict.fromkeys(sets):
            try:
                self.cache.get(key, pin=True)
            except ErasureError as exc:
                raise StartupError(f"pack set {list(key)}: {exc}") from None
        return time.perf_counter() - t0

    # --- per request --------------------------------------------------------------------------------------------

    def pack_set(self, requested) -> PackSet:
        return tuple(sorted(set(self.mandatory) | set(requested)))

    def _tokenizers(self) -> dict[str, Any]:
        # Tokenizers keep caches and (fast ones) a Rust object that refuses concurrent use: one set per thread
        # (SDXL has two: tokenizer and tokenizer_2).
        toks = getattr(self._local, "tokenizers", None)
        if toks is None:
            toks = self._local.tokenizers = {name: copy.deepcopy(module) for name, module in
                                             self.pipe.components.items()
                                             if name.startswith("tokenizer") and module is not None}
        return toks

    def fresh_pipeline(self, denoiser):
        """A new pipeline object: shared read-only modules, this pack set's UNet, its own scheduler, and this
        thread's tokenizers."""
        base = self.pipe
        scheduler = type(base.scheduler).from_config(base.scheduler.config)
        return share_pipeline(base, denoiser=denoiser, scheduler=scheduler, **self._tokenizers())

    def submit(self, key: PackSet, prompt: str, negative_prompt: str | None, steps: int, guidance: float,
               width: int, height: int, seeds: list[int], deadline: float | None = None):
        """Queue a request for the batcher (``batching: true``): the job (its ``future`` gives the images) and
        whether this call composed its pack set. Image i depends only on this request (see service/README.md).
        ``deadline``: the ``time.perf_counter()`` by which its images must be ready. Overloaded when the queue is
        full (nothing is composed for a refused request)."""
        from .batcher import Job, Overloaded

        batcher = self.batcher
        if batcher.queued_images() + len(seeds) > batcher.max_queue:  # before composing anything for it
            batcher.stats.shed += 1
            raise Overloaded(f"the service is at capacity ({batcher.queued_images()} images waiting, at most "
                             f"{batcher.max_queue}); retry after the time in Retry-After", batcher.retry_after())
        denoiser, built = self.cache.get(key)
        job = Job(prompt, negative_prompt, list(seeds), steps, guidance, height, width, denoiser, deadline)
        return batcher.submit(job), built

    def close(self, drain: float = 0.0) -> None:
        """Stop the batcher; requests in flight get up to ``drain`` seconds to finish."""
        if self.batcher is not None:
            self.batcher.close(drain=drain)

    def generate(self, key: PackSet, prompt: str, negative_prompt: str | None, steps: int, guidance: float,
                 width: int, height: int, seeds: list[int]) -> tuple[list, bool]:
        """One image per seed, each from its own generator and its own batch-1 call, so image i depends only on
        (prompt, seeds[i], settings, pack set), never on the other images or on concurrent requests."""
        denoiser, built = self.cache.get(key)
        pipe = self.fresh_pipeline(denoiser)
        images = []
        with torch.inference_mode():
            for seed in seeds:
                out = pipe(prompt=[prompt], negative_prompt=[negative_prompt] if negative_prompt else None,
                           num_inference_steps=steps, guidance_scale=guidance, height=height, width=width,
                           generator=torch.Generator("cpu").manual_seed(int(seed)), output_type="pil")
                images.append(out.images[0])
        return images, built
