"""The BentoML service. ``bentoml serve service.service:ErasureService`` (or ``make serve``).

Configuration: service/config.yaml, or the YAML file ``$ERASURE_SERVICE_CONFIG`` names (service/README.md lists
every option). Start-up pulls the configured packs pinned to their commit, verifies them (hashes, base
fingerprint) and composes the known pack sets, in a thread started by ``__init__`` so the probes answer at once
(``/readyz`` 503 until it is done); any refusal stops `bentoml serve` with a non-zero status and the reason as its
last line (fail closed, service/lifecycle.py). Overload is shed with 503 + Retry-After, never queued without bound.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import io
import logging
import math
import threading
import time
import typing as t
from http import HTTPStatus
from pathlib import Path

import anyio
import bentoml
from PIL import Image
from pydantic import ValidationError
from pydantic_core import PydanticCustomError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from . import lifecycle
from .auth import AccessControl
from .config import ServiceConfig
from .contract import RequestGuard, openapi_document
from .models import MAX_SEED, POLICY, GenerateRequest, GenerateResponse, PacksResponse

logger = logging.getLogger("erasure.service")
if logger.level == logging.NOTSET:  # BentoML shows its own loggers' INFO lines; show the service's too
    logger.setLevel(logging.INFO)
CONFIG = ServiceConfig.load()  # read at import: threads/workers/timeout go into the decorator below
PAGE = Path(__file__).parent / "page"
lifecycle.arm()  # in the `bentoml serve` process: a worker's refusal makes it exit non-zero

_metrics: dict[str, t.Any] = {}
_current: dict[str, "ErasureService"] = {}


def _get_metrics() -> dict[str, t.Any]:
    # Created on first use, not at import: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker after importing us.
    if not _metrics:
        import prometheus_client as prom

        _metrics["requests"] = prom.Counter("erasure_pack_requests", "Generate requests per applied pack",
                                            labelnames=["pack"])
        _metrics["compose"] = prom.Histogram("erasure_pack_set_compose_seconds", "Time to compose one pack-set UNet",
                                             labelnames=["when"],
                                             buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        _metrics["batch"] = prom.Histogram("erasure_batch_images", "Images in one batched UNet step",
                                           buckets=(1, 2, 4, 8, 12, 16, 24, 32, 48, 64))
        _metrics["left"] = prom.Counter("erasure_requests_left", "Requests whose client left (disconnected or "
                                                                 "timed out) before their images were ready")
        _metrics["shed"] = prom.Counter("erasure_requests_shed", "Generate requests answered 503 without images",
                                        labelnames=["reason"])
        _metrics["queue"] = prom.Gauge("erasure_queue_images", "Images waiting for a batch",
                                       multiprocess_mode="livesum")
    return _metrics


def _unavailable(ctx: bentoml.Context, exc: "Unavailable") -> JSONResponse:
    """The 503 of ``exc`` as an API's answer (BentoML applies the context's status and headers to it)."""
    response = exc.response()
    ctx.response.status_code = 503
    ctx.response.headers.update({k: response.headers[k] for k in ("Retry-After", "Retry-After-Ms")})
    return response


class Unavailable(Exception):
    """A generate request answered 503 with ``Retry-After`` (seconds, and ``Retry-After-Ms``): the service is
    loading, at capacity, past the request's deadline, or shutting down. ``reason`` labels the shed metric."""

    def __init__(self, message: str, retry_after: float, reason: str):
        super().__init__(message)
        self.retry_after, self.reason = retry_after, reason

    def response(self) -> JSONResponse:
        _get_metrics()["shed"].labels(reason=self.reason).inc()
        return JSONResponse({"error": str(self)}, status_code=503, headers={
            "Retry-After": str(max(1, math.ceil(self.retry_after))),
            "Retry-After-Ms": str(max(1, round(1000 * self.retry_after)))})


def _request_error(problems: list[tuple[str, str]]) -> ValidationError:
    """A 400 shaped exactly like BentoML's own for pydantic errors ({"error", "detail": [{loc, msg}]}), so a
    client reads one format whether a field failed its type or a configured limit (InvalidArgument would answer a
    bare list)."""
    return ValidationError.from_exception_data("GenerateRequest", [
        {"type": PydanticCustomError("limit", msg), "loc": (field,), "input": None} for field, msg in problems])


class ClientGone(bentoml.exceptions.BentoMLException):
    """The client went away while its request waited in the batch (nobody reads this answer)."""

    error_code = HTTPStatus.REQUEST_TIMEOUT


# Routes BentoML does not make: GET /packs (its API routes are POST only; POST /packs is the same listing, for
# bentoml clients), the operator page at / (BentoML's Swagger UI moves to /docs) and the truthful /docs.json.
def _ready_service() -> "ErasureService":
    svc = _current.get("svc")
    if svc is None:
        raise Unavailable("the service is starting; retry after the time in Retry-After", 5.0, "loading")
    svc._check_ready()
    return svc


async def _get_packs(request: Request) -> JSONResponse:
    try:
        return JSONResponse(_ready_service().packs_info().model_dump(mode="json"))
    except Unavailable as exc:
        return exc.response()


async def _openapi(request: Request) -> JSONResponse:
    try:
        return JSONResponse(_ready_service().openapi())
    except Unavailable as exc:
        return exc.response()


async def _page(request: Request) -> FileResponse:
    return FileResponse(PAGE / "index.html", headers={"cache-control": "no-cache"})


async def _swagger(request: Request) -> Response:
    import _bentoml_impl.server as bentoml_server  # BentoML's Swagger UI page; it reads ./docs.json

    return FileResponse(Path(bentoml_server.__file__).parent / "main-openapi.html")


_extra_routes = Starlette(routes=[
    Route("/", _page, methods=["GET"]),
    Route("/packs", _get_packs, methods=["GET"]),
    Route("/docs.json", _openapi, methods=["GET"]),
    Route("/docs", _swagger, methods=["GET"]),
    Mount("/page", StaticFiles(directory=PAGE), name="page"),
])


@bentoml.asgi_app(_extra_routes, path="/")
@bentoml.service(name="erasure", workers=CONFIG.workers, threads=CONFIG.threads,
                 traffic={"timeout": CONFIG.timeout})
class ErasureService:
    """Text-to-image with concept-erasure packs: mandatory packs always apply, requests may add optional ones."""

    def __init__(self) -> None:
        self.config = CONFIG
        self.runtime = None
        self.refusal: str | None = None  # why start-up was refused (served in-process; a worker exits instead)
        self._ready = threading.Event()
        self._openapi: dict[str, t.Any] | None = None
        self._limiter: anyio.CapacityLimiter | None = None  # batching off: `threads` generations at a time
        _current["svc"] = self
        threading.Thread(target=self._load, name="erasure-load", daemon=True).start()

    def _load(self) -> None:
        """Load the base, pull, verify and compose the packs; on a refusal, stop the server (fail closed)."""
        from .runtime import Runtime, StartupError

        try:
            rt = Runtime(CONFIG)
            size = CONFIG.default_size or rt.native_size
            if size > CONFIG.limits.max_size or size % rt.size_multiple:
                # a request without width/height would be refused: say so now rather than on every request
                raise StartupError(f"the default size {size} is not a multiple of {rt.size_multiple} up to "
                                   f"limits.max_size {CONFIG.limits.max_size}; set default_size")
        except Exception as exc:  # a refusal, or anything unexpected: both stop the service
            self.refusal = str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"
            logger.error("%s%s", lifecycle.PREFIX, self.refusal, exc_info=not isinstance(exc, StartupError))
            lifecycle.refuse(self.refusal)
            return
        POLICY["mandatory"] = rt.mandatory
        metrics = _get_metrics()
        for entry in rt.cache.stats():
            metrics["compose"].labels(when="startup").observe(entry["build_seconds"])
        if rt.batcher is not None:
            rt.batcher.on_step = metrics["batch"].observe
            rt.batcher.on_queue = metrics["queue"].set
        self.runtime = rt
        logger.info("erasure service ready: base %s on %s, packs %s (mandatory %s), %d pack sets precomposed in "
                    "%.2f s", CONFIG.base, rt.device, sorted(rt.packs), list(rt.mandatory), len(rt.cache.stats()),
                    rt.precompose_seconds)
        self._ready.set()

    def __is_ready__(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until start-up is done (True) or refused / timed out (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.refusal is not None or (end is not None and time.monotonic() > end):
                return False
        return True

    def _check_ready(self) -> None:
        if not self._ready.is_set():
            if self.refusal is not None:
                raise Unavailable(f"{lifecycle.PREFIX}{self.refusal}", 60.0, "refused")
            raise Unavailable("the service is starting (loading the base and verifying the packs); retry after the "
                              "time in Retry-After", 5.0, "loading")

    @bentoml.on_shutdown
    def _close(self) -> None:
        if self.runtime is not None:
            self.runtime.close(drain=CONFIG.deadline or 30.0)

    # --- APIs ---------------------------------------------------------------------------------------------------

    @bentoml.api(input_spec=GenerateRequest)
    async def generate(self, ctx: bentoml.Context, **fields: t.Any) -> Image.Image:
        """One PNG (num_images > 1: the images side by side in one PNG, image i from seed + i). Headers:
        X-Erasure-Packs, X-Erasure-Pack-Shas, X-Erasure-Seed, X-Erasure-Seeds, X-Erasure-Mandatory, X-Erasure-Worker.
        503 with Retry-After when the service is starting, at capacity or past the request's deadline."""
        try:
            result = await self._generate(GenerateRequest.model_construct(**fields), ctx.request)
        except Unavailable as exc:
            return _unavailable(ctx, exc)
        images = result.pop("pil")
        ctx.response.headers.update({
            "X-Erasure-Packs": ",".join(result["packs"]),
            "X-Erasure-Pack-Shas": ",".join(f"{n}={s}" for n, s in result["pack_shas"].items()),
            "X-Erasure-Seed": str(result["seeds"][0]),
            "X-Erasure-Seeds": ",".join(map(str, result["seeds"])),
            "X-Erasure-Mandatory": ",".join(result["mandatory"]),
            "X-Erasure-Pack-Set-Built": str(result["pack_set_built"]).lower(),
            "X-Erasure-Worker": str(bentoml.server_context.worker_index or ""),
        })
        if len(images) == 1:
            return images[0]
        grid = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)))
        x = 0
        for im in images:
            grid.paste(im, (x, 0))
            x += im.width
        return grid

    @bentoml.api(input_spec=GenerateRequest)
    async def generate_json(self, ctx: bentoml.Context, **fields: t.Any) -> GenerateResponse:
        """The images as base64 PNGs, with the seeds, packs, pinned shas and settings used (503 as /generate)."""
        try:
            result = await self._generate(GenerateRequest.model_construct(**fields), ctx.request)
        except Unavailable as exc:
            return _unavailable(ctx, exc)

        def encode(pil: list[Image.Image]) -> list[str]:
            images = []
            for im in pil:
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                images.append(base64.b64encode(buf.getvalue()).decode())
            return images

        return GenerateResponse(images=await anyio.to_thread.run_sync(encode, result.pop("pil")), **result)

    @bentoml.api(route="/packs")
    def packs(self) -> PacksResponse:
        """The loaded packs (name, concepts, method, mandatory, scale, pinned sha, repo), limits and defaults (503
        with Retry-After while the service is starting)."""
        try:
            self._check_ready()
        except Unavailable as exc:
            return exc.response()
        return self.packs_info()

    def openapi(self) -> dict[str, t.Any]:
        """The OpenAPI document (/docs.json): BentoML's, told with this configuration's limits and packs."""
        if self._openapi is None:
            self._openapi = openapi_document(
                ErasureService.openapi_spec.asdict(), limits=self.config.limits,
                size_multiple=self.runtime.size_multiple, packs=list(self.runtime.packs),
                auth=self.config.auth if self.config.auth.enabled else None)
        return self._openapi

    def packs_info(self) -> PacksResponse:
        rt, cfg = self.runtime, self.config
        return PacksResponse(
            base=cfg.base, device=rt.device, dtype=cfg.dtype, worker=bentoml.server_context.worker_index,
            mandatory=list(rt.mandatory),
            packs=[p.info() for p in rt.packs.values()],
            defaults={"steps": cfg.default_steps, "guidance_scale": cfg.default_guidance,
                      "width": cfg.default_size or rt.native_size, "height": cfg.default_size or rt.native_size},
            limits={**cfg.limits.model_dump(), "size_multiple": rt.size_multiple},
            pack_sets=rt.cache.stats(),
        )

    # --- the work -----------------------------------------------------------------------------------------------

    def _settings(self, req: GenerateRequest) -> dict[str, t.Any]:
        """Apply defaults and check the configured limits; every problem found goes into one 400."""
        rt, cfg, lim = self.runtime, self.config, self.config.limits
        size = cfg.default_size or rt.native_size
        s = {"steps": req.steps or cfg.default_steps,
             "guidance": cfg.default_guidance if req.guidance_scale is None else req.guidance_scale,
             "width": req.width or size, "height": req.height or size}
        problems: list[tuple[str, str]] = []
        unknown = [p for p in req.packs if p not in rt.packs]
        if unknown:
            problems.append(("packs", f"unknown pack(s) {unknown}; loaded packs: {sorted(rt.packs) or 'none'} "
                                      "(GET /packs lists them)"))
        for field in ("prompt", "negative_prompt"):
            text = getattr(req, field) or ""
            if len(text) > lim.max_prompt_chars:
                problems.append((field, f"{field} is {len(text)} characters; shorten it to at most "
                                        f"{lim.max_prompt_chars}"))
        problems += lim.problems(steps=s["steps"], guidance=s["guidance"], width=s["width"], height=s["height"],
                                 negative_prompt=bool(req.negative_prompt), size_multiple=rt.size_multiple,
                                 default_size=size)
        if req.num_images > lim.max_images:
            problems.append(("num_images", f"num_images is {req.num_images}; use 1 to {lim.max_images}"))
        if req.seed > MAX_SEED - lim.max_images + 1:
            problems.append(("seed", f"seed is {req.seed}; use 0 to {MAX_SEED - lim.max_images + 1} (image i uses "
                                     "seed + i)"))
        if problems:
            raise _request_error(problems)
        return s

    async def _generate(self, req: GenerateRequest, request: Request | None = None) -> dict[str, t.Any]:
        self._check_ready()
        t0 = time.perf_counter()
        deadline = t0 + self.config.deadline if self.config.deadline else None
        s = self._settings(req)
        rt = self.runtime
        key = rt.pack_set(req.packs)
        seeds = [req.seed + i for i in range(req.num_images)]
        args = (key, req.prompt, req.negative_prompt, s["steps"], s["guidance"], s["width"], s["height"], seeds)
        if rt.batcher is None:  # one pipeline call per image in a worker thread, `threads` at a time
            images, built = await self._generate_unbatched(args, deadline)
        else:
            from .batcher import BatcherClosed, DeadlineExceeded, Overloaded

            try:
                job, built = await anyio.to_thread.run_sync(functools.partial(rt.submit, *args, deadline=deadline))
                images = await self._wait(job, request)
            except Overloaded as exc:
                raise Unavailable(str(exc), exc.retry_after, "capacity") from None
            except DeadlineExceeded:
                raise Unavailable(f"the request could not be served within its deadline ({self.config.deadline:g} "
                                  "s); retry after the time in Retry-After", rt.batcher.retry_after(),
                                  "deadline") from None
            except BatcherClosed as exc:  # shutting down: try another replica
                raise Unavailable(f"{exc}; retry on another replica", 1.0, "shutting_down") from None
        seconds = time.perf_counter() - t0
        metrics = _get_metrics()
        for name in key:
            metrics["requests"].labels(pack=name).inc()
        if not key:
            metrics["requests"].labels(pack="(none)").inc()
        if built:
            entry = next((e for e in rt.cache.stats() if tuple(e["packs"]) == key), None)
            if entry:
                metrics["compose"].labels(when="request").observe(entry["build_seconds"])
        return {"pil": images, "seeds": seeds, "packs": list(key),
                "pack_shas": {n: rt.packs[n].sha for n in key}, "mandatory": list(rt.mandatory),
                "prompt": req.prompt, "negative_prompt": req.negative_prompt, "steps": s["steps"],
                "guidance_scale": s["guidance"], "width": s["width"], "height": s["height"],
                "pack_set_built": built, "seconds": round(seconds, 4)}

    async def _generate_unbatched(self, args: tuple, deadline: float | None) -> tuple[list, bool]:
        """Batching off: ``threads`` pipeline calls at a time, at most ``max_queue`` requests waiting for one."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.config.threads)
        waiting, most = self._limiter.statistics().tasks_waiting, self.config.max_queue or 4 * self.config.threads
        seconds = getattr(self, "_request_seconds", 1.0)
        if waiting >= most:
            raise Unavailable(f"the service is at capacity ({waiting} requests waiting, at most {most}); retry after "
                              "the time in Retry-After", seconds * (waiting + 1) / self.config.threads, "capacity")
        t0 = time.perf_counter()
        with anyio.move_on_after(math.inf if deadline is None else deadline - t0) as scope:
            images, built = await anyio.to_thread.run_sync(functools.partial(self.runtime.generate, *args),
                                                           limiter=self._limiter)
        if scope.cancelled_caught:  # waited past its deadline, or finished after it: not served late
            raise Unavailable(f"the request could not be served within its deadline ({self.config.deadline:g} s); "
                              "retry after the time in Retry-After", seconds, "deadline")
        self._request_seconds = 0.8 * seconds + 0.2 * (time.perf_counter() - t0)
        return images, built

    async def _wait(self, job, request: Request | None) -> list[Image.Image]:
        """The job's images; if the client disconnects or the request times out (cancelled), the job leaves the
        batch at the next step so it holds no one up."""
        future = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=0.25)
                if done:
                    return future.result()
                if request is not None and await request.is_disconnected():
                    raise ClientGone("the client disconnected before its images were ready")
        except (asyncio.CancelledError, ClientGone):
            job.cancel()
            _get_metrics()["left"].inc()
            raise


# Middlewares run in the order added: access control first (a request without a key learns nothing else),
# then the request guard (methods, Content-Type), then BentoML's request parsing.
if CONFIG.auth.enabled:
    ErasureService.add_asgi_middleware(AccessControl, auth=CONFIG.auth, home=CONFIG.home)
ErasureService.add_asgi_middleware(RequestGuard)
