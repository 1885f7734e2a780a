"""A batched denoising loop whose rows carry their own prompt, negative prompt, guidance, seed, steps and pack set.

Each request keeps what the diffusers pipeline keeps per call — its own scheduler (from the base pipeline's config),
its own latents drawn from ``torch.Generator("cpu").manual_seed(seed + i)`` exactly as the pipeline draws them — and
the loop advances any set of requests one step at a time with one UNet call per image size. The UNet takes a
timestep per row, so requests at different steps of their schedules (or with different step counts) share a call;
rows of different pack sets share it through ``MixedDenoiser``. Classifier-free guidance is per request: its
unconditional (or negative-prompt) rows and its prompt rows use its pack set and its guidance scale.

What an image depends on: its request only (prompt, negative prompt, seed + i, settings, pack set). Its batch-mates
change nothing but the order of float additions inside batched kernels (service/README.md, "Batching", has
the measured bound); a request alone, one image, gives the same bytes as the diffusers pipeline.

Example:
    >>> cond = conditioner_for(pipe)
    >>> req = DenoiseRequest(cond.encode(["a red circle"]), cond.unconditional(1), seeds=[0], steps=20,
    ...                      guidance=3.0, height=64, width=64)
    >>> [[image]] = denoise(pipe, [req])
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from ..base.conditioning import Conditioning
from ..base.families import family_of
from .guidance import GuideAway, guide_away_of
from .mixed import MixedDenoiser


@dataclasses.dataclass
class DenoiseRequest:
    """One request's images: ``cond`` / ``uncond`` are one row each (the prompt; the negative prompt or the
    pipeline's unconditional), repeated for every seed. ``denoiser``: the request's pack-set denoiser (None: the
    base's)."""

    cond: Conditioning
    uncond: Conditioning
    seeds: Sequence[int]
    steps: int
    guidance: float
    height: int
    width: int
    denoiser: nn.Module | None = None


@dataclasses.dataclass(eq=False)
class Track:
    """A request in flight: its own scheduler, latents, generators and position in its schedule."""

    request: DenoiseRequest
    denoiser: nn.Module
    scheduler: object
    timesteps: torch.Tensor
    latents: torch.Tensor
    generators: list[torch.Generator]
    step_kwargs: dict
    guided: bool
    away: GuideAway | None = None  # the pack set's guidance away from its concepts (erasure/sampling/guidance.py)
    reuse_empty: bool = False  # the shift's eps(x, "") is this request's own unconditional rows (``pack`` reference)
    index: int = 0

    @property
    def done(self) -> bool:
        return self.index >= len(self.timesteps)

    @property
    def images(self) -> int:
        return len(self.request.seeds)

    @property
    def rows(self) -> int:
        """UNet rows per step: the prompt rows, and as many unconditional rows when guided."""
        return self.images * (2 if self.guided else 1)


class BatchDenoiser:
    """Starts requests, steps any set of in-flight ones together, decodes finished ones (see the module docstring).

    One thread drives it; requests may join or leave between steps."""

    def __init__(self, pipe, mixed: MixedDenoiser | None = None):
        self.pipe, self.family = pipe, family_of(pipe)
        self.denoiser = self.family.denoiser(pipe)
        self.mixed = mixed if mixed is not None else MixedDenoiser(self.denoiser)
        # per pack-set UNet: its guidance away from its concepts, encoded once rather than per request
        self._away: weakref.WeakKeyDictionary[nn.Module, GuideAway] = weakref.WeakKeyDictionary()
        self.device = self.denoiser.device
        if self.denoiser.config.get("time_cond_proj_dim") is not None:
            raise ValueError("guidance-embedded UNets (time_cond_proj_dim) are not supported by the batched loop")
        step_params = set(inspect.signature(pipe.scheduler.step).parameters)
        self._accepts_eta, self._accepts_generator = "eta" in step_params, "generator" in step_params

    def start(self, request: DenoiseRequest) -> Track:
        """A track at step 0: a fresh scheduler and the initial noise of every seed, as the pipeline draws it."""
        from diffusers.utils.torch_utils import randn_tensor

        pipe = self.pipe
        scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
        scheduler.set_timesteps(request.steps, device=self.device)
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in request.seeds]
        shape = self.family.latent_shape(pipe, 1, request.height, request.width)
        dtype = request.cond.encoder_hidden_states.dtype
        # one draw per image from its own generator, as pipeline.prepare_latents does with a list of generators
        latents = torch.cat([randn_tensor(shape, generator=g, device=self.device, dtype=dtype) for g in generators])
        latents = latents * scheduler.init_noise_sigma
        kwargs = {}
        if self._accepts_eta:
            kwargs["eta"] = 0.0
        if self._accepts_generator:
            kwargs["generator"] = generators if len(generators) > 1 else generators[0]
        guided = request.guidance > 1  # the pipeline's do_classifier_free_guidance
        denoiser = request.denoiser if request.denoiser is not None else self.denoiser
        track = Track(request, denoiser, scheduler, scheduler.timesteps, latents, generators, kwargs, guided)
        guidance = guide_away_of(denoiser)
        if guidance is not None:
            if denoiser not in self._away:
                self._away[denoiser] = GuideAway(pipe, guidance)
            track.away = self._away[denoiser]
            track.reuse_empty = (track.away.reference == "pack" and guided
                                 and track.away.is_empty(request.uncond, (request.height, request.width)))
        return track

    def step(self, tracks: Sequence[Track]) -> None:
        """Advance every track one step: one UNet call per image size, rows grouped by pack set."""
        groups: dict[tuple[int, int], list[Track]] = {}
        for track in tracks:
            if not track.done:
                groups.setdefault((track.request.height, track.request.width), []).append(track)
        for group in groups.values():
            self._step_group(group)

    def _step_group(self, tracks: list[Track]) -> None:
        # each pack set's rows adjacent, sets changing the same layers next to each other (stable: arrival order)
        first: dict[int, int] = {}
        for track in tracks:
            first.setdefault(id(track.denoiser), len(first))
        tracks = sorted(tracks, key=lambda tr: (self.mixed.order_key(tr.denoiser), first[id(tr.denoiser)]))
        samples, times, conds, segments = [], [], [], []
        for track in tracks:
            req, t = track.request, track.timesteps[track.index]
            x = torch.cat([track.latents] * 2) if track.guided else track.latents
            samples.append(track.scheduler.scale_model_input(x, t))
            times.append(t.reshape(1).expand(track.rows))
            cond = req.cond.repeat(track.images)
            conds += [req.uncond.repeat(track.images), cond] if track.guided else [cond]
            if segments and segments[-1][1] is track.denoiser:
                segments[-1] = (segments[-1][0] + track.rows, track.denoiser)
            else:
                segments.append((track.rows, track.denoiser))
        away = []  # (track, concepts guided away from at its step, its base rows)
        for track in tracks:  # the base's rows of the concepts guided away from, after every request's own rows
            if track.away is None:
                continue
            t = track.timesteps[track.index]
            active = track.away.active(t)
            if not active:
                continue
            rows = track.away.rows(track.images, (track.request.height, track.request.width), active,
                                   with_empty=not track.reuse_empty)
            samples.append(track.scheduler.scale_model_input(
                track.latents.repeat(len(rows) // track.images, 1, 1, 1), t))
            times.append(t.reshape(1).expand(len(rows)))
            conds.append(rows)
            away.append((track, active, len(rows)))
            if segments and segments[-1][1] is track.away.base_denoiser:
                segments[-1] = (segments[-1][0] + len(rows), track.away.base_denoiser)
            else:
                segments.append((len(rows), track.away.base_denoiser))
        conditioning = Conditioning.cat(conds).to(self.device)
        noise = self.mixed(torch.cat(samples), torch.cat(times), segments, **conditioning.denoiser_kwargs())
        own, start = {}, 0
        for track in tracks:
            own[id(track)] = noise[start:start + track.rows]
            start += track.rows
        shifts = {}
        for track, active, rows in away:
            reference = own[id(track)][:track.images] if track.reuse_empty else None  # its unconditional rows
            shifts[id(track)] = track.away.combine(noise[start:start + rows], track.images, active, reference)
            start += rows
        for track in tracks:
            pred = own[id(track)]
            if track.guided:
                uncond, text = pred.chunk(2)
                pred = uncond + track.request.guidance * (text - uncond)
            if id(track) in shifts:  # both branches move alike, so the guided prediction moves by the shift
                pred = pred - shifts[id(track)].to(pred.dtype)
            t = track.timesteps[track.index]
            track.latents = track.scheduler.step(pred, t, track.latents, **track.step_kwargs, return_dict=False)[0]
            track.index += 1

    def decode(self, tracks: Sequence[Track]) -> list[list]:
        """PIL images of finished tracks (one VAE call per image size), in the order given."""
        pipe, out = self.pipe, {}
        groups: dict[tuple[int, int], list[Track]] = {}
        for track in tracks:
            groups.setdefault((track.request.height, track.request.width), []).append(track)
        for group in groups.values():
            latents = torch.cat([tr.latents for tr in group])
            image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
            nsfw = None
            if getattr(pipe, "run_safety_checker", None) is not None:
                image, nsfw = pipe.run_safety_checker(image, self.device, group[0].request.cond.encoder_hidden_states
                                                      .dtype)
            denormalize = [True] * image.shape[0] if nsfw is None else [not x for x in nsfw]
            images = pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=denormalize)
            start = 0
            for track in group:
                out[id(track)] = images[start:start + track.images]
                start += track.images
        return [out[id(track)] for track in tracks]


@torch.no_grad()
def denoise(pipe, requests: Sequence[DenoiseRequest], batch: BatchDenoiser | None = None) -> list[list]:
    """Run ``requests`` together to the end (shorter schedules finish first); the images of each request."""
    batch = batch or BatchDenoiser(pipe)
    tracks = [batch.start(r) for r in requests]
    while not all(t.done for t in tracks):
        batch.step(tracks)
    return batch.decode(tracks)
