"""RequestRange: what a text-to-image request may set, declared once.

One declaration serves three readers: the service's ``limits`` (service/config.py) check every /generate request
with ``problems`` and publish the same bounds in its OpenAPI document with ``schema_bounds``; `erasure attack`
searches exactly that range (``sizes``, ``clamp``) and records it with its figures, so a service compares a pack's
red-team range with its own field by field (``uncovered``).

Example:
    >>> limits = RequestRange(min_steps=8, max_size=64, min_size=64, negative_prompt=False)
    >>> problems = limits.problems(steps=4, guidance=3.0, width=64, height=48, negative_prompt=True, size_multiple=16)
    >>> [field for field, _ in problems]
    ['negative_prompt', 'steps', 'height']
    >>> limits.schema_bounds(size_multiple=16)["width"]
    {'minimum': 64, 'maximum': 64, 'multipleOf': 16}
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class RequestRange(BaseModel):
    """The range of request settings (see the module docstring)."""

    model_config = ConfigDict(extra="forbid")

    min_steps: int = Field(1, ge=1, description="smallest `steps` a request may set")
    max_steps: int = Field(50, ge=1, description="largest `steps` a request may set")
    min_size: int = Field(1, ge=1, description="smallest width / height in pixels a request may set")
    max_size: int = Field(128, ge=8, description="largest width / height in pixels a request may set")
    min_guidance: float = Field(0.0, ge=0, description="smallest `guidance_scale` a request may set")
    max_guidance: float = Field(20.0, ge=0, description="largest `guidance_scale` a request may set")
    negative_prompt: bool = Field(True, description="whether a request may set a `negative_prompt`")

    @model_validator(mode="after")
    def _ranges(self) -> "RequestRange":
        for low, high in (("min_steps", "max_steps"), ("min_size", "max_size"), ("min_guidance", "max_guidance")):
            if getattr(self, low) > getattr(self, high):
                raise ValueError(f"{low} {getattr(self, low)} is above {high} {getattr(self, high)}")
        return self

    def range(self) -> "RequestRange":
        """This range alone (without the fields of a subclass: a service's limits, an attack's options)."""
        return RequestRange(**{name: getattr(self, name) for name in RequestRange.model_fields})

    def uncovered(self, served: "RequestRange") -> list[str]:
        """Where ``served`` lets a request go beyond this range, e.g. ``["max_size 64 < 128"]``; empty: this range
        covers every request ``served`` allows."""
        out = []
        for name in RequestRange.model_fields:
            mine, theirs = getattr(self, name), getattr(served, name)
            if name.startswith("max_") and mine < theirs:
                out.append(f"{name} {mine} < {theirs}")
            elif name.startswith("min_") and mine > theirs:
                out.append(f"{name} {mine} > {theirs}")
            elif name == "negative_prompt" and theirs and not mine:
                out.append("negative prompts off < on")
        return out

    # --- sizes --------------------------------------------------------------------------------------------------

    def sizes(self, size_multiple: int) -> list[int]:
        """Every width / height a request may set on a base whose sizes are multiples of ``size_multiple``."""
        return list(range(-(-max(self.min_size, size_multiple) // size_multiple) * size_multiple,
                          self.max_size + 1, size_multiple))

    def clamp(self, steps: int, guidance: float, size: int, size_multiple: int) -> tuple[int, float, int]:
        """(steps, guidance, size) moved into this range, each to the nearest allowed value."""
        sizes = self.sizes(size_multiple)
        return (min(max(steps, self.min_steps), self.max_steps),
                min(max(guidance, self.min_guidance), self.max_guidance),
                min(sizes, key=lambda s: (abs(s - size), s)) if sizes else size)

    # --- checking a request and publishing the range --------------------------------------------------------------

    def problems(self, *, steps: int, guidance: float, width: int, height: int, negative_prompt: bool,
                 size_multiple: int, default_size: int | None = None) -> list[tuple[str, str]]:
        """(request field, what to fix) for every setting outside this range; empty: the request is inside."""
        out: list[tuple[str, str]] = []
        if negative_prompt and not self.negative_prompt:
            out.append(("negative_prompt", "negative prompts are off on this service (limits.negative_prompt: "
                                           "false: its packs were red-teamed without them); leave it out"))
        if not self.min_steps <= steps <= self.max_steps:
            why = "" if steps > self.max_steps else (" (fewer steps draw images too rough to judge, so no pack "
                                                     "was red-teamed there)")
            out.append(("steps", f"steps is {steps}; use {self.min_steps} to {self.max_steps}{why}"))
        if not self.min_guidance <= guidance <= self.max_guidance:
            why = "" if guidance > self.max_guidance else (" (below it the base draws images no pack was "
                                                           "red-teamed on)")
            out.append(("guidance_scale", f"guidance_scale is {guidance}; use {self.min_guidance:g} to "
                                          f"{self.max_guidance:g}{why}"))
        for field, value in (("width", width), ("height", height)):
            if value > self.max_size or value % size_multiple or value < self.min_size:
                low = f"from {self.min_size} " if self.min_size > size_multiple else ""
                why = (" (the base draws images too rough to judge below, so no pack was red-teamed there)"
                       if value < self.min_size else "")
                default = f" (default {default_size})" if default_size else ""
                out.append((field, f"{field} is {value}; use a multiple of {size_multiple} {low}up to "
                                   f"{self.max_size}{default}{why}"))
        return out

    def schema_bounds(self, size_multiple: int) -> dict[str, dict]:
        """JSON Schema keywords per request field that say this range (what ``problems`` accepts)."""
        side = {"minimum": max(size_multiple, -(-self.min_size // size_multiple) * size_multiple),
                "maximum": self.max_size // size_multiple * size_multiple, "multipleOf": size_multiple}
        out = {"steps": {"minimum": self.min_steps, "maximum": self.max_steps},
               "guidance_scale": {"minimum": self.min_guidance, "maximum": self.max_guidance},
               "width": dict(side), "height": dict(side)}
        if not self.negative_prompt:
            out["negative_prompt"] = {"maxLength": 0}
        return out
