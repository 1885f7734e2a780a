"""``erasure train-many``: train a catalogue's packs as Ray tasks and publish each that passes its quick check.

One pack = one Ray task (``cpus_per_pack`` CPUs; one GPU each when the cluster has GPUs, and it trains on
``cuda``): train (``erasure.train.train_pack``), check (``QuickCheck``), push to the registry. Before any task
starts, every entry's target (``NS/NAME@TAG``) is read through the registry: a pack published with the same config
hash is skipped, so a rerun after a crash or a lost worker trains only what is missing. A task works in
``work/NAME`` and checkpoints there: a task Ray retries after a lost worker (``max_retries``), or a rerun on the same
machine, resumes training from the checkpoint, or publishes a finished pack without training it again. One
failed pack (bad option, failed check, error) does not stop the others; the result names each with its error.

    >>> from registry.catalogue import Catalogue
    >>> from registry.train_many import RegistryAddress, train_many
    >>> result = train_many(Catalogue.load("registry/catalogues/toy.yaml"), RegistryAddress(registry_dir="reg"))
    >>> [(o.name, o.status) for o in result.outcomes]
    [('circle', 'published'), ('red', 'published'), ('striped', 'published'), ('square', 'skipped')]

On a remote cluster (``ray_address``) every worker needs this package installed, the registry reachable (an
endpoint, or a registry directory on a shared file system) and its credentials (``HF_TOKEN``) in its environment.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

from erasure.errors import ErasureError

from .catalogue import HASH_METRIC, Catalogue, PackJob, manifest_config_hash, published_with_same_config
from .errors import ClusterError, MissingExtraError, QuickCheckError

STATUSES = ("queued", "loading", "training", "checking", "publishing", "published", "skipped", "failed")


@dataclasses.dataclass(frozen=True)
class RegistryAddress:
    """Where packs are published, in a form a Ray worker can open on its own: an endpoint or an absolute path."""

    endpoint: str | None = None
    registry_dir: str | None = None

    @classmethod
    def resolve(cls, endpoint: str | None = None, registry_dir: str | os.PathLike | None = None) -> "RegistryAddress":
        """As ``open_registry`` chooses: ``endpoint``, else ``registry_dir``, else ``HF_ENDPOINT``, else the shipped
        local registry; fixed here so that every worker opens the same one."""
        from . import DEFAULT_REGISTRY, open_registry

        open_registry(endpoint=endpoint, registry_dir=registry_dir)  # the same argument checks, before any work
        if endpoint:
            return cls(endpoint=endpoint)
        if registry_dir:
            return cls(registry_dir=str(Path(registry_dir).expanduser().absolute()))
        if os.environ.get("HF_ENDPOINT"):
            return cls(endpoint=os.environ["HF_ENDPOINT"])
        return cls(registry_dir=str(DEFAULT_REGISTRY))

    def open(self):
        from . import open_registry

        return open_registry(endpoint=self.endpoint, registry_dir=self.registry_dir)


@dataclasses.dataclass
class PackOutcome:
    """What happened to one catalogue entry."""

    name: str
    target: str  # NS/NAME@TAG ('?' for an entry too broken to say)
    status: str  # 'published' (trained now), 'skipped' (already published with this config) or 'failed'
    commit_sha: str | None = None
    seconds: float = 0.0  # time in its task (training, check, push)
    resumed: bool = False  # training continued from a checkpoint, or a finished pack was published as it was
    figures: str = ""  # the erased concepts' quick-check figures, e.g. 'circle 98% -> 0%'
    error: str | None = None


@dataclasses.dataclass
class TrainManyResult:
    outcomes: list[PackOutcome]
    seconds: float  # wall time of the whole run

    def by_status(self, status: str) -> list[PackOutcome]:
        return [o for o in self.outcomes if o.status == status]

    @property
    def failed(self) -> list[PackOutcome]:
        return self.by_status("failed")


# Set before a local Ray starts (a cluster, --ray ADDRESS, has its own): Ray reads the first at import, "0" keeps
# it on 127.0.0.1 (its node address, every server it starts) instead of the machine's network address; the second
# runs its workers at the driver's priority instead of Ray's default nice 15, which on a shared machine hands the
# CPU to every other process while the packs train.
LOCAL_RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_worker_niceness": "0"}


@dataclasses.dataclass(frozen=True)
class TaskResources:
    """What each pack's Ray task asks for and where it trains."""

    num_cpus: float
    num_gpus: float
    device: str  # 'cuda' when the task holds a GPU
    threads: int | None  # torch threads on the CPU (None on a GPU: torch's default)

    @classmethod
    def for_cluster(cls, cluster: dict, cpus_per_pack: float = 1, gpus_per_pack: float | None = None):
        """One GPU per pack when the cluster has GPUs (``gpus_per_pack`` overrides), else CPUs only."""
        gpus = (1 if cluster.get("GPU", 0) > 0 else 0) if gpus_per_pack is None else gpus_per_pack
        return cls(num_cpus=cpus_per_pack, num_gpus=gpus, device="cuda" if gpus > 0 else "cpu",
                   threads=None if gpus > 0 else max(1, int(cpus_per_pack)))


def require_ray(local: bool = True):
    """The ``ray`` module, or a one-line error saying what to install. ``local``: a local Ray will be started here,
    on the loopback interface only."""
    if local and "ray" not in sys.modules:
        for key, value in LOCAL_RAY_ENV.items():
            os.environ.setdefault(key, value)
    try:
        import ray
    except ImportError:
        raise MissingExtraError("train-many runs its packs on Ray, which is not installed: "
                                "pip install 'erasure[ray]'") from None
    return ray


# --- the task (runs in a Ray worker) -------------------------------------------------------------------------------


class ProgressBoard:
    """A Ray actor the tasks report to and the driver reads: {pack name: {status, iteration, ...}}."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def update(self, name: str, **fields) -> None:
        self.rows.setdefault(name, {}).update(fields)

    def snapshot(self) -> dict[str, dict]:
        return self.rows


def _figures(job: PackJob, metrics: dict) -> str:
    table = metrics.get("eval") or {}
    return ", ".join(f"{c} {table[c]['base']:.0%} -> {table[c]['erased']:.0%}" for c in job.config.concepts
                     if c in table)


def _marker(job: PackJob) -> dict:
    """What an earlier attempt in the work directory must have had to be continued: same weights, same eval."""
    return {HASH_METRIC: job.config_hash, "eval_samples": job.eval_samples, "name": job.name}


def _reusable(job: PackJob, out: Path, marker: Path):
    """(resume, finished pack) from an earlier attempt at the same config in ``out``; (False, None) otherwise."""
    from erasure.errors import PackError
    from erasure.pack.concept_pack import ConceptPack
    from erasure.training.train import CHECKPOINT

    try:
        same = json.loads(marker.read_text()) == _marker(job)
    except (OSError, ValueError):
        same = False
    if not same or not out.is_dir():
        return False, None
    if (out / CHECKPOINT).is_file():
        return True, None
    try:
        pack = ConceptPack.from_pretrained(out)
    except PackError:
        return False, None
    return False, pack if manifest_config_hash(pack.manifest) == job.config_hash else None


def train_and_publish(job: PackJob, where: RegistryAddress, work_dir: str, device: str = "cpu",
                      threads: int | None = None, board=None) -> PackOutcome:
    """Train ``job`` in ``work_dir/NAME`` (resuming an earlier attempt at the same config), check it, push it.

    Raises ``QuickCheckError`` (not published) or whatever training / pushing raised."""
    from erasure.files import atomic_write_text
    from erasure.training.train import train_pack

    if threads:
        import torch

        torch.set_num_threads(threads)
    start = time.perf_counter()

    def report(**fields):
        if board is not None:
            board.update.remote(job.name, **fields)

    work = Path(work_dir)
    out, marker = work / job.name, work / f".{job.name}.train-many.json"
    resume, pack = _reusable(job, out, marker)
    finished_before = pack is not None
    if not resume and pack is None:
        shutil.rmtree(out, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_text(marker, json.dumps(_marker(job)) + "\n")
    if pack is None:
        report(status="loading", iteration=0, total=job.config.iterations, started=time.time())
        last = [0.0]

        def progress(trainer):
            now = time.perf_counter()
            if now - last[0] > 0.5 or trainer.iteration == job.config.iterations:
                last[0] = now
                report(status="training", iteration=trainer.iteration)
                if trainer.iteration == job.config.iterations:
                    report(status="checking")

        pack = train_pack(job.base, job.config, out, name=job.name, revision=job.base_revision, resume=resume,
                          eval_samples=job.eval_samples, progress=False, device=device, callback=progress,
                          metrics={HASH_METRIC: job.config_hash})
    figures = _figures(job, pack.manifest.metrics)
    if job.check is not None:
        problems = job.check.problems(job.config.concepts, pack.manifest.metrics)
        if problems:
            raise QuickCheckError(f"quick check failed: {'; '.join(problems)}; not published (the pack is in {out})")
    report(status="publishing", figures=figures)
    pushed = where.open().push(out, job.repo, tag=job.tag)
    return PackOutcome(job.name, job.target, "published", commit_sha=pushed.commit_sha,
                       seconds=round(time.perf_counter() - start, 1), resumed=resume or finished_before,
                       figures=figures)


# --- the driver --------------------------------------------------------------------------------------------------


def _error_text(exc: BaseException) -> str:
    """One line for the summary: an ErasureError's own message, else the exception's type and first line."""
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError carries the task's exception
    exc = cause if isinstance(cause, BaseException) else exc
    if isinstance(exc, ErasureError):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _table(outcomes: dict[str, PackOutcome], rows: dict[str, dict], order: list[str], elapsed: float,
           width: int = 120):
    from rich.table import Table

    table = Table(title=f"erasure train-many ({elapsed:.0f} s)", title_justify="left")
    targets = [outcomes[n].target if n in outcomes else rows.get(n, {}).get("target", "") for n in order]
    widths = {"pack": max(map(len, order + ["pack"])), "target": max(map(len, targets + ["target"])),
              "status": len("publishing"), "progress": len("progress"), "seconds": len("seconds")}
    for col, width in widths.items():
        table.add_column(col, no_wrap=True, min_width=width)
    room = width - sum(widths.values()) - 3 * (len(widths) + 1) - 1  # borders and padding of 6 columns
    table.add_column("result", no_wrap=True, overflow="ellipsis", max_width=max(12, room))
    for name in order:
        o, row = outcomes.get(name), rows.get(name, {})
        status = o.status if o else row.get("status", "queued")
        style = {"published": "green", "skipped": "cyan", "failed": "red"}.get(status, "")
        total = row.get("total")
        progress = f"{row.get('iteration', 0)}/{total}" if total and not o else ""
        since = row.get("started")
        seconds = f"{o.seconds:.0f}" if o and o.seconds else (f"{time.time() - since:.0f}" if since and not o else "")
        if o and o.status == "failed":
            result = o.error or ""
        elif o:
            result = " ".join(x for x in ((o.commit_sha or "")[:12], o.figures, "(resumed)" if o.resumed else "") if x)
        else:
            result = row.get("figures", "")
        table.add_row(name, (o.target if o else row.get("target", "")), f"[{style}]{status}[/]" if style else status,
                      progress, seconds, result)
    return table


def train_many(catalogue: Catalogue, where: RegistryAddress, *, work_dir: str | os.PathLike = "build/train-many",
               ray_address: str | None = None, num_cpus: int | None = None, cpus_per_pack: float = 1,
               gpus_per_pack: float | None = None, max_retries: int = 2, console=None) -> TrainManyResult:
    """Skip what is published with the same config, train the rest as Ray tasks, publish what passes its check.

    Uses the running Ray if ``ray.init`` was called, else starts one: ``ray.init(ray_address)`` for a cluster, a
    local one with ``num_cpus`` otherwise (and shuts down what it started). ``gpus_per_pack`` defaults to 1 when
    the cluster has GPUs (the pack then trains on ``cuda``), else 0."""
    from rich.console import Console
    from rich.live import Live

    ray = require_ray(local=ray_address is None)
    console = console or Console(stderr=True)
    start = time.perf_counter()
    order = [job.name for job in catalogue.jobs] + [e.name for e in catalogue.errors]
    outcomes: dict[str, PackOutcome] = {e.name: PackOutcome(e.name, "?", "failed", error=e.message)
                                        for e in catalogue.errors}
    registry = where.open()
    todo: list[PackJob] = []
    for job in catalogue.jobs:
        try:
            found = published_with_same_config(job, registry)
        except ErasureError as exc:
            outcomes[job.name] = PackOutcome(job.name, job.target, "failed", error=str(exc))
            continue
        if found is not None:
            outcomes[job.name] = PackOutcome(job.name, job.target, "skipped", commit_sha=found.commit_sha,
                                             figures="published with this config")
        else:
            todo.append(job)

    started = False
    try:
        if todo:
            if not ray.is_initialized():
                kwargs = {"address": ray_address} if ray_address else {"num_cpus": num_cpus, "include_dashboard": False}
                try:
                    ray.init(**kwargs, log_to_driver=False, logging_level="ERROR", configure_logging=True)
                except Exception as exc:  # ConnectionError, a bad address, a local start-up failure
                    where_ray = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray"
                    raise ClusterError(f"cannot start or reach {where_ray}: {_error_text(exc)}") from None
                started = True
            res = TaskResources.for_cluster(ray.cluster_resources(), cpus_per_pack, gpus_per_pack)
            device, threads = res.device, res.threads
            task = ray.remote(train_and_publish).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus,
                                                         max_retries=max_retries, retry_exceptions=False)
            board = ray.remote(ProgressBoard).options(num_cpus=0).remote()
            work = str(Path(work_dir).expanduser().absolute())
            for job in todo:
                board.update.remote(job.name, status="queued", target=job.target)
            pending = {task.remote(job, where, work, device, threads, board): job for job in todo}
            rows: dict[str, dict] = {}
            with Live(_table(outcomes, rows, order, 0, console.width), console=console, refresh_per_second=2,
                      transient=False) as live:
                while pending:
                    done, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
                    for ref in done:
                        job = pending.pop(ref)
                        try:
                            outcomes[job.name] = ray.get(ref)
                        except Exception as exc:  # one pack's failure, whatever it is, stays that pack's
                            outcomes[job.name] = PackOutcome(job.name, job.target, "failed", error=_error_text(exc))
                        if not console.is_terminal:
                            o = outcomes[job.name]
                            console.print(f"{o.name}: {o.status} {o.error or (o.commit_sha or '')[:12]}")
                    rows = ray.get(board.snapshot.remote())
                    live.update(_table(outcomes, rows, order, time.perf_counter() - start, console.width))
            if not console.is_terminal:
                console.line()  # Live leaves its last render without a newline off a terminal
        else:
            console.print(_table(outcomes, {}, order, time.perf_counter() - start, console.width))
    finally:
        if started:
            ray.shutdown()
    return TrainManyResult([outcomes[name] for name in order], seconds=round(time.perf_counter() - start, 1))
