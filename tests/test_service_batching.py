"""Batched serving in-process: ``TestClient(ErasureService.to_asgi())`` with ``batching: true``.

World: packs circle, red (esd-x), square (esd-u: most of the UNet) and striped (esd-x, mandatory) from a test
registry. "Alone" images come from the runtime's unbatched path (one pipeline call per image), which the batched
path equals byte for byte for a request served alone (tests/test_denoise.py)."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import importlib
import io
import json
import os
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from service_helpers import forget_bentoml_metrics, make_world, write_config

STEPS = 3
BOUND = 2  # max abs pixel difference alone vs in a mixed batch (service/README.md, "Batching": measured 1)
SETS = [[], ["circle"], ["square"], ["circle", "red"]]


@pytest.fixture(scope="module")
def served(tmp_path_factory, toy_pipe):
    from starlette.testclient import TestClient

    root = tmp_path_factory.mktemp("batching-world")
    lock = make_world(root, toy_pipe.unet, methods={"square": "esd-u"})
    config = write_config(root / "config.yaml", lock, mandatory=["striped"], default_steps=STEPS, batching=True,
                          max_batch_size=16, max_latency_ms=20)
    old_env, threads = os.environ.get("ERASURE_SERVICE_CONFIG"), torch.get_num_threads()
    os.environ["ERASURE_SERVICE_CONFIG"] = str(config)
    module = sys.modules.get("service.service") or importlib.import_module("service.service")
    old_config = module.CONFIG
    module.CONFIG = module.ServiceConfig.load(config)  # __init__ reads it; one module, one set of metrics
    forget_bentoml_metrics()  # tests/test_service.py ran another app in this process
    app = module.ErasureService.to_asgi()
    try:
        with TestClient(app=app) as client:
            svc = module._current["svc"]
            assert svc.wait_ready(120), svc.refusal
            assert svc.runtime.batcher is not None
            yield {"client": client, "app": app, "svc": svc, "rt": svc.runtime}
    finally:
        module.CONFIG = old_config
        torch.set_num_threads(threads)
        if old_env is None:
            os.environ.pop("ERASURE_SERVICE_CONFIG", None)
        else:
            os.environ["ERASURE_SERVICE_CONFIG"] = old_env


def body(i: int, packs=None, **extra) -> dict:
    prompts = ["a red circle", "a blue square", "a striped star", "a dotted green triangle"]
    return {"prompt": prompts[i % 4], "packs": SETS[i % 4] if packs is None else packs, "seed": 40 + i,
            "steps": STEPS, **extra}


def alone(rt, b: dict, packs=None) -> np.ndarray:
    """The request's image from the unbatched path (the diffusers pipeline, one call per image)."""
    key = rt.pack_set(b["packs"]) if packs is None else tuple(packs)
    [image], _ = rt.generate(key, b["prompt"], b.get("negative_prompt"), b["steps"],
                             b.get("guidance_scale", rt.config.default_guidance), 64, 64, [b["seed"]])
    return np.asarray(image.convert("RGB")).astype(np.int16)


def png(r) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")).astype(np.int16)


def burst(client, bodies: list[dict], route: str = "/generate") -> list:
    with cf.ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: client.post(route, json=b), bodies))


def test_mixed_batch_matches_each_request_alone_and_mandatory_applies_to_every_row(served):
    """esd-x and esd-u pack sets, negative prompts and guidance scales mixed in one batch; the mandatory pack
    (striped) is in every row: each image is within BOUND of the request alone *with* striped, and further than
    BOUND from it without striped."""
    rt, client = served["rt"], served["client"]
    bodies = [body(i, negative_prompt="red" if i % 3 == 0 else None, guidance_scale=[3.0, 7.5, 1.0][i % 3])
              for i in range(12)]
    stats = rt.batcher.stats
    images, steps = stats.images_stepped, stats.steps
    responses = burst(client, bodies)
    assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses if r.status_code != 200]
    assert (stats.images_stepped - images) / (stats.steps - steps) > 2  # they shared UNet steps
    for b, r in zip(bodies, responses):
        assert r.headers["x-erasure-packs"] == ",".join(sorted({"striped", *b["packs"]}))
        assert np.abs(png(r) - alone(rt, b)).max() <= BOUND
    b = bodies[0]  # packs []: the mandatory pack alone
    assert np.abs(png(responses[0]) - alone(rt, b, packs=[])).max() > BOUND


def test_a_bad_request_in_a_batch_is_a_400_on_its_own(served):
    rt, client = served["rt"], served["client"]
    good = [body(i) for i in range(6)]
    bad = [{"prompt": "x", "packs": ["nope"], "steps": STEPS}, {"prompt": "", "steps": STEPS},
           {"prompt": "x", "steps": 10_000}, {"prompt": "x", "width": 50, "steps": STEPS},
           {"prompt": "x", "disable": ["striped"]}, {"prompt": "x", "num_images": 99}]
    mixed = [x for pair in zip(good, bad) for x in pair]
    responses = burst(client, mixed)
    for b, r in zip(mixed, responses):
        if b in bad:
            assert r.status_code == 400, (b, r.text)
        else:
            assert r.status_code == 200, r.text
            assert np.abs(png(r) - alone(rt, b)).max() <= BOUND


async def _leave(app, svc, payload: dict, how: str, after: float = 0.5) -> None:
    """``disconnects``: POST /generate straight into the ASGI app, the client disconnecting after ``after`` seconds;
    ``times out``: the generate coroutine cancelled after ``after`` seconds (what BentoML's traffic timeout does
    to the handler)."""
    if how == "times out":
        from service.models import GenerateRequest

        try:
            await asyncio.wait_for(svc._generate(GenerateRequest(**payload)), after)
        except asyncio.TimeoutError:
            return
        raise AssertionError("the request finished before it timed out")
    data, started, body_sent = json.dumps(payload).encode(), time.perf_counter(), []
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/generate", "raw_path": b"/generate", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                         (b"host", b"testserver")], "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}

    async def receive():
        if not body_sent:
            body_sent.append(True)
            return {"type": "http.request", "body": data, "more_body": False}
        while time.perf_counter() - started < after:
            await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def send(message):
        pass

    await app(scope, receive, send)


@pytest.mark.parametrize("how", ["disconnects", "times out"])
def test_a_client_that_leaves_does_not_stall_the_batch(served, how):
    rt, client, app = served["rt"], served["client"], served["app"]
    stats = rt.batcher.stats
    cancelled, completed = stats.cancelled, stats.completed
    long = {"prompt": "a red circle", "packs": ["square"], "steps": 50, "num_images": 4, "seed": 1}
    with cf.ThreadPoolExecutor(1) as pool:
        leaving = pool.submit(client.portal.call, lambda: _leave(app, served["svc"], long, how))
        time.sleep(0.2)
        r = client.post("/generate", json=body(1))
        assert r.status_code == 200, r.text
        leaving.result(timeout=60)
    deadline = time.time() + 30
    while stats.cancelled == cancelled and time.time() < deadline:
        time.sleep(0.05)
    assert stats.cancelled == cancelled + 1 and stats.completed == completed + 1  # the long one never finished
    r = client.post("/generate", json=body(2))  # and the batcher goes on
    assert r.status_code == 200


def test_64_concurrent_requests_over_4_pack_sets_none_lost(served):
    rt, client = served["rt"], served["client"]
    bodies = [dict(body(i), steps=2, seed=1000 + i) for i in range(64)]
    responses = burst(client, bodies, "/generate_json")
    assert [r.status_code for r in responses] == [200] * 64
    out = [r.json() for r in responses]
    assert [o["seeds"] for o in out] == [[b["seed"]] for b in bodies]
    assert [o["packs"] for o in out] == [sorted({"striped", *b["packs"]}) for b in bodies]
    assert len({o["images"][0] for o in out}) == 64
    for b, o in list(zip(bodies, out))[::8]:
        import base64

        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(o["images"][0]))).convert("RGB")).astype(np.int16)
        assert np.abs(image - alone(rt, b)).max() <= BOUND


@pytest.mark.parametrize("continuous", [True, False])
def test_requests_join_a_running_batch_only_when_continuous(toy_pipe, continuous):
    """A short request sent while a long one runs finishes first when it may join at a step boundary; with
    ``continuous: false`` it waits for the running batch to end."""
    from service.batcher import Batcher, Job

    batcher = Batcher(toy_pipe, max_batch_size=4, max_latency_ms=0, continuous=continuous)
    try:
        done: list[str] = []
        long = batcher.submit(Job("a red circle", None, [0], 12, 3.0, 64, 64))
        long.future.add_done_callback(lambda f: done.append("long"))
        while batcher.stats.steps < 2:
            time.sleep(0.01)
        short = batcher.submit(Job("a blue square", None, [1], 2, 3.0, 32, 32))  # another size: its own UNet call
        short.future.add_done_callback(lambda f: done.append("short"))
        short.future.result(timeout=120), long.future.result(timeout=120)
        assert done == (["short", "long"] if continuous else ["long", "short"])
        assert short.future.result()[0].size == (32, 32)
    finally:
        batcher.close()


def test_overload_is_shed_with_retry_after_and_the_queue_stays_bounded(served):
    """A burst beyond ``max_queue`` (images waiting for a batch): the requests over it are answered 503 at once with
    Retry-After (seconds) and Retry-After-Ms, never queued; the admitted ones are served (/metrics, which carries
    the shed count and the queue depth, is checked on a real server: tests/test_service_server.py)."""
    rt, client, batcher = served["rt"], served["client"], served["rt"].batcher
    old = batcher.max_queue
    batcher.max_queue = 2
    try:
        shed_before = batcher.stats.shed
        responses = burst(client, [body(i, steps=12) for i in range(16)])
    finally:
        batcher.max_queue = old
    codes = [r.status_code for r in responses]
    assert set(codes) == {200, 503} and codes.count(503) == batcher.stats.shed - shed_before, codes
    for r in responses:
        if r.status_code == 503:
            assert "at capacity" in r.json()["error"] and int(r.headers["retry-after"]) >= 1
            assert int(r.headers["retry-after-ms"]) >= 1


def test_a_request_past_its_deadline_leaves_and_is_a_503(served):
    """``deadline``: a request whose images cannot be ready in time leaves the queue or the batch and is answered
    503 (no image is served late); one that fits is served."""
    svc, client = served["svc"], served["client"]
    old = svc.config
    svc.config = old.model_copy(update={"deadline": 0.3})
    try:
        late = client.post("/generate", json=body(0, steps=50))
        svc.config = old.model_copy(update={"deadline": 60.0})
        in_time = client.post("/generate", json=body(1))
    finally:
        svc.config = old
    assert late.status_code == 503 and "within its deadline (0.3 s)" in late.json()["error"], late.text
    assert int(late.headers["retry-after"]) >= 1 and in_time.status_code == 200
