"""Guiding away from a pack's concepts at sampling time, on the base's prediction of them.

A pack's weights erase what prompts *naming* its concept draw. A prompt naming nothing ("one", "please") draws the
base's prior, which can be the concept (the toy base draws red for "one" on a third of its images), and no delta
trained on the concept's prompts reaches it. A pack with ``guide_away`` s > 0 therefore also moves every prediction
of its pack set by, per its ``guide_away_reference``,

    "empty":   - s (eps*(x, concept) - eps*(x, ""))
    "prompt":  - s (eps*(x, p + " " + concept) - eps*(x, p))      (p: the image's own prompt)

eps* being the base, whatever packs are applied. Both branches of classifier-free guidance move alike, so the guided
prediction moves by the same amount at any guidance scale. The base's prediction is used because a pack's own
prediction for its concept is already erased (guiding away from it would guide *towards* the concept). The empty
reference moves every image the same way whatever it asks for (on red it turns green prompts blue); the prompt
reference removes only what naming the concept would add to *this* prompt (docs/robustness.md measures both).
Cost: per pack set, two base UNet rows per image and step for the empty reference (one more per further concept),
likewise two for the prompt reference, whose rows are the image's own.

Where it is applied: ``with_packs`` pipelines (``erasure generate``, ``eval``, ``attack``, training previews) through
a forward hook on their UNet; the service's batched loop (``erasure.denoise``) adds the rows to its UNet calls, with
each request's prompt. The hook knows an image's prompt by its encoding: the pipeline's ``encode_prompt`` remembers
what it encodes, soft prompts are remembered by whoever encodes them (``GuideAway.remember``), and an encoding
nobody remembered is refused rather than sampled unguided.

Example:
    >>> pipe = with_packs(base_pipe, [(ConceptPack.from_pretrained("packs/circle"), 1.0)])
    >>> guide_away_of(pipe.unet).pairs             # the pack's manifest says guide_away 1.0, reference "empty"
    (('circle', 1.0),)
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
from collections.abc import Callable, Sequence

import torch
from torch import nn

from .conditioning import Conditioning, conditioner_for

_ATTRIBUTE = "erasure_guide_away"
_HOOK_ATTRIBUTE = "erasure_guide_away_hook"
_REMEMBERED = 512  # prompt encodings the hook keeps (oldest dropped): a pipeline call's, an optimiser step's


class UnknownPromptError(RuntimeError):
    """A pack set guiding away relative to the prompt was called with a prompt encoding nobody remembered."""


@dataclasses.dataclass(frozen=True)
class PackSetGuidance:
    """What ``compose_unet`` leaves on a pack-set UNet: the (concept, scale) pairs relative to the empty prompt
    (``pairs``) and to each image's prompt (``relative``), and the base UNet whose prediction of them is guided away
    from (kept out of the module tree: not a submodule of the pack set)."""

    pairs: tuple[tuple[str, float], ...]
    base_unet: nn.Module
    relative: tuple[tuple[str, float], ...] = ()


def set_guide_away(unet: nn.Module, terms: Sequence[tuple[str, float, str]], base_unet: nn.Module) -> None:
    """Record on a pack-set UNet which concepts it guides away from: (concept, scale, reference) terms, those with
    scale 0 dropped."""
    pairs = tuple((c, float(s)) for c, s, reference in terms if s and reference == "empty")
    relative = tuple((c, float(s)) for c, s, reference in terms if s and reference == "prompt")
    if pairs or relative:
        object.__setattr__(unet, _ATTRIBUTE, PackSetGuidance(pairs, base_unet, relative))


def guide_away_of(unet: nn.Module) -> PackSetGuidance | None:
    """The guidance a pack-set UNet applies; None for the base and packs without ``guide_away``."""
    return getattr(unet, _ATTRIBUTE, None)


def _key(row: torch.Tensor) -> str:
    t = row.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha1(f"{tuple(t.shape)}".encode() + t.numpy().tobytes()).hexdigest()


class GuideAway:
    """The shift of a pack set (see the module docstring) for rows of latents, from the base UNet and the pipeline's
    own text conditioning.

    Row layout (``rows``): per empty-reference concept its ``n`` rows, then ``n`` unconditional rows; then per
    prompt-reference concept ``n`` rows of each image's prompt with the concept appended, then ``n`` rows of the
    prompts themselves (``prompt_rows``)."""

    def __init__(self, pipe, guidance: PackSetGuidance):
        self.pairs, self.relative, self.base_unet = guidance.pairs, guidance.relative, guidance.base_unet
        self.tokenizer = pipe.tokenizer
        self.conditioner = conditioner_for(pipe, self.base_unet.device, self.base_unet.dtype)
        self._remembered: collections.OrderedDict[str, Conditioning] = collections.OrderedDict()
        self._lock = threading.RLock()  # pipelines of one pack set may sample in several threads (the service)
        self._local = threading.local()

    @property
    def encoding(self) -> bool:
        """Whether this thread is inside the conditioner (encode_prompt's wrapper must not remember then)."""
        return getattr(self._local, "encoding", False)

    # --- the prompt-relative rows ---------------------------------------------------------------------------------

    def relative_texts(self, prompt: str, reserved: int = 0) -> list[str]:
        """[p + " " + c for each prompt-reference concept c] + [p], with p cut to the tokens that leave room for the
        longest concept (and ``reserved`` more, e.g. soft tokens): a prompt filling the encoder's context must not
        push the concept out of its own reference."""
        longest = max(len(self.tokenizer(c, add_special_tokens=False).input_ids) for c, _ in self.relative)
        room = self.tokenizer.model_max_length - 2 - reserved - longest
        ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
        if len(ids) > room:
            prompt = self.tokenizer.decode(ids[:room])
        return [f"{prompt} {c}".strip() for c, _ in self.relative] + [prompt]

    def _encode(self, texts: Sequence[str], size) -> Conditioning:
        with self._lock:
            self._local.encoding = True
            try:
                return self.conditioner.encode(texts, size)
            finally:
                self._local.encoding = False

    def prompt_rows(self, prompts: Sequence[str], size: tuple[int, int],
                    encode: Callable[[list[str]], Conditioning] | None = None, reserved: int = 0) -> Conditioning:
        """The prompt-reference rows for one latent per prompt (block per concept, then the prompts), encoded by
        ``encode`` (default: the pipeline's text encoder)."""
        texts = [self.relative_texts(p, reserved) for p in prompts]
        encode = encode or (lambda batch: self._encode(batch, size))
        return Conditioning.cat([encode([t[j] for t in texts]) for j in range(len(self.relative) + 1)])

    def remember(self, encoded: torch.Tensor, prompts: Sequence[str],
                 encode: Callable[[list[str]], Conditioning] | None = None, reserved: int = 0) -> None:
        """Record that the rows of ``encoded`` ([B, L, D], as handed to the UNet; each prompt's rows consecutive when
        there are more rows than prompts) encode ``prompts``, so the hook can find their prompt-relative rows."""
        if not self.relative or not len(prompts):
            return
        rows = self.prompt_rows(prompts, self.conditioner.default_size, encode, reserved)
        blocks, per_prompt = len(self.relative) + 1, len(encoded) // len(prompts)
        with self._lock:
            for i, row in enumerate(encoded):
                key, p = _key(row), i // per_prompt
                self._remembered[key] = rows[[p + j * len(prompts) for j in range(blocks)]].to("cpu")
                self._remembered.move_to_end(key)
            while len(self._remembered) > _REMEMBERED:
                self._remembered.popitem(last=False)

    def recall(self, cond: Conditioning) -> Conditioning:
        """The prompt-reference rows of the prompts encoded as ``cond`` (rows of remembered encodings)."""
        with self._lock:
            found = [self._remembered.get(_key(row)) for row in cond.encoder_hidden_states]
        if any(f is None for f in found):
            raise UnknownPromptError(
                "this pack set guides away from its concepts relative to each image's prompt, and was called with "
                "a prompt encoding it was not given: pass prompt=... to the pipeline (not prompt_embeds), or "
                "GuideAway.remember the encoding first")
        blocks = len(self.relative) + 1
        rows = Conditioning.cat([Conditioning.cat([f[j:j + 1] for f in found]) for j in range(blocks)])
        if cond.added_cond_kwargs is not None and "time_ids" in cond.added_cond_kwargs:  # the call's own sizes
            rows.added_cond_kwargs["time_ids"] = cond.added_cond_kwargs["time_ids"].repeat(blocks, 1)
        return rows

    # --- the shift ------------------------------------------------------------------------------------------------

    def rows(self, n: int, size: tuple[int, int], prompt_rows: Conditioning | None = None) -> Conditioning:
        """The base rows for ``n`` latents (layout in the class docstring); ``prompt_rows`` from ``prompt_rows`` or
        ``recall``, needed when a concept is guided away from relative to the prompt."""
        parts = []
        if self.pairs:
            per_image = Conditioning.cat([self._encode([c for c, _ in self.pairs], size),
                                          self._encode([""], size)])
            parts += [per_image[i:i + 1].repeat(n) for i in range(len(per_image))]
        if self.relative:
            if prompt_rows is None:
                raise UnknownPromptError("this pack set guides away relative to each image's prompt: the sampler "
                                         "must pass the prompts")
            parts.append(prompt_rows.to(self.base_unet.device))
        return Conditioning.cat(parts)

    def combine(self, predictions: torch.Tensor, n: int) -> torch.Tensor:
        """The shift, from the base's predictions on ``rows(n, ...)`` (in that order)."""
        parts, shift = predictions.split(n), 0
        if self.pairs:
            k = len(self.pairs)
            empty, parts = parts[:k + 1], parts[k + 1:]
            shift = shift + sum(s * (part - empty[-1]) for (_, s), part in zip(self.pairs, empty[:-1]))
        if self.relative:
            shift = shift + sum(s * (part - parts[-1]) for (_, s), part in zip(self.relative, parts[:-1]))
        return shift

    @torch.no_grad()
    def shift(self, sample: torch.Tensor, timestep, size: tuple[int, int],
              prompt_rows: Conditioning | None = None) -> torch.Tensor:
        rows = self.rows(sample.shape[0], size, prompt_rows).to(sample.device)
        n, k = sample.shape[0], len(rows) // sample.shape[0]
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(n)
        out = self.base_unet(sample.repeat(k, 1, 1, 1), t.repeat(k), return_dict=False, **rows.unet_kwargs())[0]
        return self.combine(out, n)


def installed_guide_away(pipe) -> GuideAway | None:
    """The ``GuideAway`` the hook on ``pipe.unet`` applies (None: none); callers that encode prompts themselves
    (soft prompts) ``remember`` their encodings on it."""
    return getattr(pipe.unet, _HOOK_ATTRIBUTE, None)


def install_guide_away(pipe) -> None:
    """Make ``pipe`` guide away from its packs' concepts on every UNet call, when ``pipe.unet`` is a pack-set UNet
    from ``compose_unet`` that asks for it: a forward hook on the UNet (once per UNet, shared by every pipeline
    object using it) and, for the prompt reference, this pipeline's ``encode_prompt`` remembering its encodings.
    ``share_pipeline`` calls it, so every pipeline object of a pack set applies it however it was made."""
    guidance = guide_away_of(pipe.unet)
    if guidance is None:
        return
    away = installed_guide_away(pipe)
    if away is None:
        away = GuideAway(pipe, guidance)
        object.__setattr__(pipe.unet, _HOOK_ATTRIBUTE, away)
        pipe.unet.register_forward_hook(_hook(away, pipe.vae_scale_factor), with_kwargs=True)
    if away.relative:  # the pipeline's own encodings of its prompts are remembered as it makes them
        original = pipe.encode_prompt

        def encode_prompt(prompt=None, *args, **kwargs):
            out = original(prompt, *args, **kwargs)
            if prompt is not None and not away.encoding:
                away.remember(out[0], [prompt] if isinstance(prompt, str) else list(prompt))
            return out

        object.__setattr__(pipe, "encode_prompt", encode_prompt)


def _hook(away: GuideAway, scale: int):
    def hook(module, args, kwargs, output):
        sample = args[0] if args else kwargs["sample"]
        timestep = torch.as_tensor(args[1] if len(args) > 1 else kwargs["timestep"]).reshape(-1)
        size = (sample.shape[-2] * scale, sample.shape[-1] * scale)
        n, half = sample.shape[0], sample.shape[0] // 2
        twice = n % 2 == 0 and n > 0 and torch.equal(sample[:half], sample[half:]) and (
            timestep.numel() == 1 or torch.equal(timestep[:half], timestep[half:]))
        rows = slice(half, n) if twice else slice(0, n)  # classifier-free guidance: the prompts are the second half
        prompt_rows = None
        if away.relative:
            states = args[2] if len(args) > 2 else kwargs["encoder_hidden_states"]
            prompt_rows = away.recall(Conditioning(states, kwargs.get("added_cond_kwargs"))[rows])
        t = timestep[rows] if timestep.numel() > 1 else timestep
        shift = away.shift(sample[rows], t, size, prompt_rows)
        if twice:  # the same latents twice, one shift for both
            shift = shift.repeat(2, 1, 1, 1)
        if isinstance(output, tuple):
            return (output[0] - shift.to(output[0].dtype), *output[1:])
        output.sample = output.sample - shift.to(output.sample.dtype)
        return output

    return hook
