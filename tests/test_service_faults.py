"""Faults of a real `bentoml serve` (slow suite, `make test-slow`): a worker killed in the middle of a batch, and a
SIGTERM with requests in flight. Whatever happens, a client gets an answer or a closed connection at once, never a
hang, and never half an image."""

from __future__ import annotations

import concurrent.futures as cf
import io
import os
import signal
import time

import httpx
import psutil
import pytest
from PIL import Image

from service_helpers import free_port, make_world, serve, stop, wait_ready, write_config

pytestmark = pytest.mark.slow
STEPS = 50  # long enough that the fault lands while requests are in flight


def post(url: str, seed: int, timeout: float = 120) -> tuple[str, float]:
    """One /generate: "200" (a whole PNG), "503" (with Retry-After), or the transport error's name; and seconds."""
    t0 = time.monotonic()
    try:
        r = httpx.post(f"{url}/generate", json={"prompt": "a red circle", "seed": seed, "steps": STEPS},
                       timeout=timeout)
    except httpx.TransportError as exc:
        return type(exc).__name__, time.monotonic() - t0
    if r.status_code == 200:
        Image.open(io.BytesIO(r.content)).load()  # a whole image, or this raises
    elif r.status_code == 503:
        assert int(r.headers["retry-after"]) >= 1, r.headers
    return str(r.status_code), time.monotonic() - t0


@pytest.fixture()
def world(tmp_path, toy_pipe):
    return make_world(tmp_path, toy_pipe.unet)


def test_a_worker_killed_mid_batch_fails_its_requests_at_once_and_the_other_worker_serves(tmp_path, world):
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(write_config(tmp_path / "c.yaml", world, workers=2, threads=4), tmp_path / "home", log, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "worker" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        with cf.ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(post, url, seed) for seed in range(8)]
            time.sleep(2.0)
            workers[0].send_signal(signal.SIGKILL)
            results = [f.result() for f in futures]
        outcomes = {outcome for outcome, _ in results}
        assert outcomes <= {"200", "503", "RemoteProtocolError", "ReadError"}, results
        assert all(seconds < 100 for _, seconds in results), results  # an answer or a closed connection, no hang
        after = [post(url, 100 + i) for i in range(3)]  # the other worker (or the respawned one) serves
        assert [outcome for outcome, _ in after] == ["200"] * 3, (after, log.read_text()[-2000:])
    finally:
        stop(proc)


def test_sigterm_with_requests_in_flight_finishes_them_and_exits(tmp_path, world):
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(write_config(tmp_path / "c.yaml", world, threads=4), tmp_path / "home", log, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        with cf.ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(post, url, seed) for seed in range(6)]
            time.sleep(0.5)
            os.kill(proc.pid, signal.SIGTERM)
            results = [f.result() for f in futures]
        assert {outcome for outcome, _ in results} <= {"200", "503"}, results  # finished, or told to go elsewhere
        assert proc.wait(60) == 0
        with pytest.raises(httpx.TransportError):  # gone: nothing accepts a request any more
            httpx.post(f"{url}/generate", json={"prompt": "x"}, timeout=5)
    finally:
        stop(proc)
