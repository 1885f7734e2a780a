"""Catalogues: many concept packs described in one YAML file, what ``erasure train-many`` trains and publishes.

A catalogue names the base once and lists packs; an entry's ``options`` are ``ESDConfig`` fields
(erasure/config.py, the flags of ``erasure train`` with ``_`` for ``-``), merged over the catalogue-wide
``options``::

    base: toy                  # 'toy', a diffusers pipeline directory or a Hub id (base_revision: its revision)
    namespace: toy             # packs are published as NAMESPACE/NAME (an entry may give its own repo)
    tag: v3                    # the tag of every pack (an entry may give its own); tags are immutable
    eval_samples: 200          # images of each pack's quick oracle evaluation (toy base; 0 skips it)
    check: {max_erased: 0.1, min_kept: 0.8}   # the quick erasure check a pack must pass to be published
    options: {templates: [toy]}
    packs:
      - name: circle
        concepts: [circle]
        method: esd-x
        options: {lr: 1.0e-4, iterations: 200, preserve: [square, triangle, star, cross]}

Each entry is validated on its own: a bad option fails that entry alone, with a message naming the entry and the
field. The **config hash** (``config_hash``) is the sha256 of the canonical training config (``ESDConfig``), the
base id and revision, and this format's version: what decides a pack's weights. Training records it in the pack's
manifest (``metrics.config_hash``); a rerun reads the published manifest through the registry
(``Registry.read_manifest``: one small file, no weights, the same on the local registry and the Hub) and recomputes
the hash from the manifest's own ``training`` and ``base``, so a pack already published with the same config is
skipped, whether train-many or ``erasure train`` made it.

    >>> from registry.catalogue import Catalogue
    >>> cat = Catalogue.load("registry/catalogues/toy.yaml")
    >>> [job.name for job in cat.jobs], cat.errors
    (['circle', 'red', 'striped', 'square'], [])
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from erasure.errors import InvalidArgumentError
from erasure.training.config import ESDConfig

from .refs import check_repo_id, check_tag

HASH_FORMAT = "erasure-train-many/1"  # bump when the hashed fields change meaning
HASH_METRIC = "config_hash"  # where the hash lives in a pack's manifest (metrics)
TOY_CATALOGUE = Path(__file__).parent / "catalogues" / "toy.yaml"


class QuickCheck(BaseModel):
    """The bar a freshly trained pack must pass before it is published, read from its quick oracle evaluation
    (``metrics.eval``: accuracy per toy concept, base and erased)."""

    model_config = ConfigDict(extra="forbid")
    max_erased: float | None = Field(0.1, ge=0, le=1, description="each erased concept's oracle accuracy with the "
                                     "pack applied must be at most this")
    min_kept: float | None = Field(None, ge=0, le=1, description="every other concept must keep at least this share "
                                   "of its base accuracy")

    def problems(self, concepts: list[str], metrics: dict) -> list[str]:
        """What fails the check (empty: the pack passes)."""
        table = metrics.get("eval")
        if not table:
            return ["no quick evaluation to check (it needs the toy base and eval_samples > 0); set `check: null` "
                    "for this pack to publish it unchecked"]
        out = []
        for concept, row in sorted(table.items()):
            if concept in concepts:
                if self.max_erased is not None and row["erased"] > self.max_erased:
                    out.append(f"{concept} still drawn on {row['erased']:.0%} of its images (base {row['base']:.0%}, "
                               f"the bar is {self.max_erased:.0%})")
            elif self.min_kept is not None and row["base"] > 0 and row["erased"] / row["base"] < self.min_kept:
                out.append(f"{concept} kept only {row['erased'] / row['base']:.0%} of its base accuracy "
                           f"({row['base']:.0%} -> {row['erased']:.0%}; the bar is {self.min_kept:.0%})")
        return out


class _Entry(BaseModel):
    """One pack of a catalogue, as written (unset fields take the catalogue's)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
    concepts: list[str]
    method: str | None = None
    options: dict[str, Any] = {}
    repo: str | None = None
    tag: str | None = None
    eval_samples: int | None = Field(None, ge=0)
    check: QuickCheck | None = None
    lock: bool = True


class _Header(BaseModel):
    """A catalogue's settings for every pack, as written."""

    model_config = ConfigDict(extra="forbid")
    base: str = "toy"
    base_revision: str | None = None
    namespace: str | None = None
    tag: str | None = None
    eval_samples: int | None = Field(None, ge=0)
    check: QuickCheck | None = QuickCheck()
    options: dict[str, Any] = {}
    packs: list[Any] = Field(min_length=1)


@dataclasses.dataclass(frozen=True)
class PackJob:
    """One valid catalogue entry, resolved: what to train, where to publish it, and its config hash."""

    name: str
    repo: str
    tag: str | None
    base: str
    base_revision: str | None
    config: ESDConfig
    eval_samples: int | None
    check: QuickCheck | None
    config_hash: str
    lock: bool = True  # `train-many --lock` locks it (false: published for its figures, not served)

    @property
    def target(self) -> str:
        return f"{self.repo}@{self.tag or 'main'}"


@dataclasses.dataclass(frozen=True)
class EntryError:
    """A catalogue entry that cannot be trained, and why (it fails alone)."""

    name: str
    message: str


def config_hash(base: str, base_revision: str | None, config: ESDConfig) -> str:
    """sha256 of the canonical JSON of what decides a pack's weights: the training config and the base."""
    canonical = json.dumps({"format": HASH_FORMAT, "base": {"id": base, "revision": base_revision},
                            "training": config.model_dump(mode="json")}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def manifest_config_hash(manifest) -> str:
    """The config hash of a pack as its manifest records it (its ``training`` and ``base``)."""
    return config_hash(manifest.base.id, manifest.base.revision, manifest.training)


def _field_error(exc: ValidationError, prefix: str = "") -> str:
    """The first pydantic error as 'field: what is wrong', with a close match for an unknown option."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    field = f"{prefix}{loc}" if loc else prefix.rstrip(".")
    if first["type"] == "extra_forbidden":
        known = list(ESDConfig.model_fields) if prefix == "options." else []
        close = difflib.get_close_matches(str(first["loc"][-1]), known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        what = "an ESDConfig field (`erasure train --help` lists them)" if prefix == "options." else "a catalogue field"
        return f"{field}: unknown option, not {what}{hint}"
    msg = first["msg"].removeprefix("Value error, ")
    return f"{field}: {msg}" if field else msg


class Catalogue:
    """A loaded catalogue: ``jobs`` (valid entries, in order) and ``errors`` (entries that fail alone)."""

    def __init__(self, path: Path | None, base: str, base_revision: str | None, jobs: list[PackJob],
                 errors: list[EntryError]):
        self.path, self.base, self.base_revision, self.jobs, self.errors = path, base, base_revision, jobs, errors

    def __repr__(self) -> str:
        return f"Catalogue({str(self.path)!r}, jobs={[j.name for j in self.jobs]}, errors={len(self.errors)})"

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Catalogue":
        """Read a catalogue file. A file that is not a catalogue is an ``InvalidArgumentError``; a bad entry is
        not: it becomes an ``EntryError`` and the other entries stay valid."""
        import yaml

        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise InvalidArgumentError(f"cannot read catalogue {path}: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise InvalidArgumentError(f"catalogue {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: Any, path: Path | None = None) -> "Catalogue":
        where = f"catalogue {path}" if path else "catalogue"
        if not isinstance(data, dict):
            raise InvalidArgumentError(f"{where} must be a mapping with a `packs` list (see registry/catalogue.py)")
        try:
            header = _Header.model_validate(data)
        except ValidationError as exc:
            raise InvalidArgumentError(f"{where}: {_field_error(exc)}") from None
        jobs: list[PackJob] = []
        errors: list[EntryError] = []
        seen: dict[str, str] = {}
        for i, raw in enumerate(header.packs):
            label = raw.get("name") if isinstance(raw, dict) and isinstance(raw.get("name"), str) else f"#{i + 1}"
            try:
                job = cls._job(header, raw)
            except _BadEntry as exc:
                errors.append(EntryError(label, f"pack {label!r}: {exc}"))
                continue
            for key in (job.name, job.repo):
                if key in seen:
                    errors.append(EntryError(label, f"pack {label!r}: {key} is already taken by the pack "
                                                    f"{seen[key]!r} above; names and repositories are unique"))
                    break
            else:
                seen.update({job.name: job.name, job.repo: job.name})
                jobs.append(job)
        return cls(path, header.base, header.base_revision, jobs, errors)

    @staticmethod
    def _job(header: _Header, raw: Any) -> PackJob:
        if not isinstance(raw, dict):
            raise _BadEntry("an entry is a mapping with name, concepts, method, options, tag")
        try:
            entry = _Entry.model_validate(raw)
        except ValidationError as exc:
            raise _BadEntry(_field_error(exc)) from None
        options = {**header.options, **entry.options}
        for own in ("concepts", "method"):
            if own in options:
                raise _BadEntry(f"options.{own}: give {own} beside options, not inside")
        if entry.method is not None:
            options["method"] = entry.method
        try:
            config = ESDConfig(concepts=entry.concepts, **options)
        except ValidationError as exc:
            loc = exc.errors()[0]["loc"]
            prefix = "" if loc and loc[0] in ("concepts", "method") else "options."
            raise _BadEntry(_field_error(exc, prefix)) from None
        if entry.repo is None and header.namespace is None:
            raise _BadEntry("no repo: give the entry a repo (NS/NAME) or the catalogue a namespace")
        repo = entry.repo or f"{header.namespace}/{entry.name}"
        tag = entry.tag if "tag" in entry.model_fields_set else header.tag
        try:
            check_repo_id(repo)
            if tag is not None:
                check_tag(tag)
        except InvalidArgumentError as exc:
            raise _BadEntry(str(exc)) from None
        eval_samples = entry.eval_samples if "eval_samples" in entry.model_fields_set else header.eval_samples
        check = entry.check if "check" in entry.model_fields_set else header.check
        return PackJob(name=entry.name, repo=repo, tag=tag, base=header.base, base_revision=header.base_revision,
                       config=config, eval_samples=eval_samples, check=check,
                       config_hash=config_hash(header.base, header.base_revision, config), lock=entry.lock)


class _BadEntry(Exception):
    """Raised while resolving one entry; becomes an EntryError."""


# --- what a rerun has to do ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Published:
    """A pack the registry already holds with the job's config: nothing to train."""

    job: PackJob
    commit_sha: str


def published_with_same_config(job: PackJob, registry) -> Published | None:
    """``Published`` if ``job.target`` names a pack trained with ``job``'s config; ``None`` if there is nothing
    there yet (or, without a tag, the head of main has another config: a new commit goes on top).

    Raises ``PushError`` when the tag already names a pack with another config: tags are immutable."""
    from .errors import PackNotFoundError, PushError, RevisionNotFoundError

    try:
        found = registry.read_manifest(job.repo, job.tag or "main")
    except (PackNotFoundError, RevisionNotFoundError):
        return None
    recorded = manifest_config_hash(found.manifest)
    if recorded == job.config_hash:
        return Published(job, found.commit_sha)
    if job.tag is None:
        return None
    raise PushError(f"tag {job.tag} of {job.repo} already names a pack trained with another config (hash "
                    f"{recorded[:12]}, this entry's is {job.config_hash[:12]}); tags are immutable: give the "
                    "catalogue a new tag")
