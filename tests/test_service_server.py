"""The service through a real ``bentoml serve`` subprocess (one per session, shared) and ``bentoml build``.

Same world as tests/test_service.py (packs circle, red, striped, square (mandatory) from a test registry), except
that square is an esd-u pack (most of the UNet) and the server runs the default, ``batching: true``."""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from service_helpers import BENTOML, commit_dir, free_port, make_world, serve, stop, write_config

REPO = Path(__file__).resolve().parents[1]
STEPS = 4
BOUND = 2  # max abs pixel difference alone vs in a mixed batch (service/README.md, "Batching": measured 1)
SETS = [[], ["circle"], ["red"], ["circle", "red", "striped"]]


@pytest.fixture(scope="session")
def server(tmp_path_factory, toy_pipe):
    import bentoml

    root = tmp_path_factory.mktemp("server-world")
    lock = make_world(root, toy_pipe.unet, methods={"square": "esd-u"})
    config = write_config(root / "config.yaml", lock, mandatory=["square"], default_steps=STEPS)
    port, log = free_port(), root / "serve.log"
    proc = serve(config, root / "bentoml-home", log, port)
    url = f"http://127.0.0.1:{port}"
    try:
        client = bentoml.SyncHTTPClient(url, server_ready_timeout=180)
    except Exception:
        stop(proc)
        raise AssertionError(f"bentoml serve did not become ready:\n{log.read_text()[-3000:]}")
    yield {"url": url, "client": client, "lock": lock, "log": log}
    client.close()
    stop(proc)


def post(url: str, **body) -> httpx.Response:
    body.setdefault("prompt", "a red circle")
    body.setdefault("steps", STEPS)
    r = httpx.post(f"{url}/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r


def test_server_generates_a_png_with_headers(server):
    r = post(server["url"], packs=["circle"], seed=5)
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    assert r.headers["x-erasure-packs"] == "circle,square" and r.headers["x-erasure-seed"] == "5"
    locked = json.loads(server["lock"].read_text())["packs"]
    assert r.headers["x-erasure-pack-shas"] == ",".join(f"{n}={locked[n]['revision']}" for n in ("circle", "square"))
    assert post(server["url"], packs=["circle"], seed=5).content == r.content
    assert httpx.get(f"{server['url']}/readyz").status_code == 200


def pixels(content: bytes):
    import numpy as np

    return np.asarray(Image.open(io.BytesIO(content)).convert("RGB")).astype(np.int16)


def batch_sizes(url: str) -> tuple[float, float]:
    """(images stepped, UNet steps) so far, from the batcher's Prometheus histogram."""
    text = httpx.get(f"{url}/metrics").text
    value = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
             if line.startswith(("erasure_batch_images_sum", "erasure_batch_images_count"))}
    return value.get("erasure_batch_images_sum", 0.0), value.get("erasure_batch_images_count", 0.0)


def test_server_mixed_batch_matches_alone_and_mandatory_on_every_row(server):
    """32 requests over 4 pack sets (the mandatory esd-u square in every row), different guidance and negative
    prompts, 16 at a time: each image within BOUND of the same request alone; the batches held several images."""
    import numpy as np

    url = server["url"]
    requests = [{"prompt": ["a red circle", "a blue square"][i % 2], "packs": SETS[i % 4], "seed": i // 4,
                 "guidance_scale": [3.0, 6.0, 1.0][i % 3], "negative_prompt": "green" if i % 5 == 0 else None}
                for i in range(32)]
    alone = [pixels(post(url, **r).content) for r in requests]
    images0, steps0 = batch_sizes(url)
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda r: post(url, **r), requests))
    images, steps = batch_sizes(url)
    assert (images - images0) / (steps - steps0) > 2  # mean images per UNet step while they ran together
    for r, a, b in zip(requests, alone, together):
        assert b.headers["x-erasure-packs"] == ",".join(sorted({"square", *r["packs"]}))
        assert np.abs(pixels(b.content) - a).max() <= BOUND
    assert len({a.tobytes() for a in alone}) > 16


def test_server_bad_request_in_a_batch_is_a_400_on_its_own(server):
    url = server["url"]
    good = [{"prompt": "a red circle", "packs": SETS[i % 4], "seed": 500 + i, "steps": STEPS} for i in range(4)]
    bad = [{"prompt": "x", "packs": ["nope"]}, {"prompt": "x", "steps": 10_000}, {"prompt": ""},
           {"prompt": "x", "exclude": ["square"]}]
    expected = [post(url, **b).content for b in good]
    with cf.ThreadPoolExecutor(8) as pool:
        out = list(pool.map(lambda b: httpx.post(f"{url}/generate", json=b, timeout=120),
                            [x for pair in zip(good, bad) for x in pair]))
    assert [r.status_code for r in out] == [200, 400] * 4, [r.text for r in out]
    import numpy as np

    assert all(np.abs(pixels(r.content) - pixels(e)).max() <= BOUND for r, e in zip(out[::2], expected))


def test_server_client_that_times_out_does_not_stall_the_batch(server):
    """A client gives up (its own timeout: it closes the connection) on a long request: the others are served,
    the request leaves the batch (counted in /metrics)."""
    url = server["url"]

    def leaving():
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{url}/generate", json={"prompt": "a red circle", "steps": 50, "num_images": 4}, timeout=1.0)

    left = lambda: sum(float(line.split()[1]) for line in httpx.get(f"{url}/metrics").text.splitlines()
                       if line.startswith("erasure_requests_left_total"))
    before = left()
    with cf.ThreadPoolExecutor(2) as pool:
        gone = pool.submit(leaving)
        time.sleep(0.3)
        r = post(url, packs=["red"], seed=9)
        gone.result()
    assert r.headers["x-erasure-packs"] == "red,square"
    deadline = time.time() + 30
    while left() == before and time.time() < deadline:
        time.sleep(0.2)
    assert left() == before + 1
    post(url, seed=10)


def test_server_64_concurrent_requests_over_4_pack_sets_none_lost(server):
    url = server["url"]
    requests = [{"prompt": ["a red circle", "a blue square"][i % 2], "packs": SETS[i % 4], "seed": 2000 + i,
                 "steps": 2} for i in range(64)]
    with cf.ThreadPoolExecutor(64) as pool:
        out = list(pool.map(lambda r: httpx.post(f"{url}/generate", json=r, timeout=300), requests))
    assert [r.status_code for r in out] == [200] * 64
    assert [r.headers["x-erasure-seed"] for r in out] == [str(r["seed"]) for r in requests]
    assert [r.headers["x-erasure-packs"] for r in out] == [",".join(sorted({"square", *r["packs"]}))
                                                           for r in requests]
    assert len({r.content for r in out}) == 64


def test_server_bentoml_client(server):
    from bentoml.exceptions import BentoMLException

    client = server["client"]
    packs = client.packs()
    packs = packs if isinstance(packs, dict) else packs.model_dump()
    assert sorted(p["name"] for p in packs["packs"]) == ["circle", "red", "square", "striped"]
    assert packs["mandatory"] == ["square"]
    out = client.generate_json(prompt="a red circle", packs=["red"], seed=2, steps=STEPS, num_images=2)
    out = out if isinstance(out, dict) else out.model_dump()
    assert out["seeds"] == [2, 3] and out["packs"] == ["red", "square"] and len(out["images"]) == 2
    with pytest.raises(BentoMLException, match="unknown pack"):
        client.generate_json(prompt="a red circle", packs=["nope"])
    assert httpx.get(f"{server['url']}/packs").json()["packs"] == packs["packs"]


def test_server_bad_input_is_4xx(server):
    url = server["url"]
    for body in ({"prompt": ""}, {"prompt": "x", "packs": ["nope"]}, {"prompt": "x", "steps": 10_000},
                 {"prompt": "x", "disable": ["square"]}, {"prompt": "x", "nope": 1}, {"prompt": "x", "seed": "a"}):
        r = httpx.post(f"{url}/generate", json=body, timeout=60)
        assert r.status_code == 400, (body, r.text)
    r = httpx.post(f"{url}/generate", content=b"{", headers={"content-type": "application/json"}, timeout=60)
    assert r.status_code == 400


def test_server_metrics(server):
    post(server["url"], packs=["striped"], seed=1)
    text = httpx.get(f"{server['url']}/metrics").text
    assert 'erasure_pack_requests_total{pack="striped"}' in text
    assert "erasure_pack_set_compose_seconds_count" in text
    assert "erasure_queue_images" in text  # images waiting for a batch (sheds: erasure_requests_shed_total)


def test_server_refuses_a_tampered_pack(tmp_path, toy_pipe):
    """Fail closed: the worker refuses with a line naming the pack, /readyz never answers 200, and `bentoml serve`
    itself exits with status 3 and that reason as its last line."""
    lock = make_world(tmp_path, toy_pipe.unet, packs={"circle": ("circle",), "red": ("red",)})
    delta = commit_dir(lock, "red") / "delta.safetensors"
    data = bytearray(delta.read_bytes())
    data[100] ^= 1
    delta.write_bytes(bytes(data))
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(write_config(tmp_path / "c.yaml", lock), tmp_path / "home", log, port)
    try:
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            try:
                assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code != 200
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert proc.poll() is not None and proc.returncode == 3, log.read_text()[-2000:]
    finally:
        stop(proc)
    last = log.read_text().strip().splitlines()[-1]
    assert last.startswith("erasure service refusing to start: pack 'red'") and "sha256 of delta.safetensors" in last


def test_a_pack_that_makes_its_concept_more_likely_stops_bentoml_serve(tmp_path):
    """Fail closed, and a pack must never make its concept more likely: red's record shows it drawing red more
    often than the base (75 % vs 31 %), so a lock naming it, even as an optional pack, makes `bentoml serve` exit
    with status 3 and that reason as its last line (no respawn loop, no probe that hangs)."""
    from registry import DEFAULT_REGISTRY, open_registry
    from registry.lock import LockFile

    lock, reg = LockFile(tmp_path / "packs.lock"), open_registry(registry_dir=DEFAULT_REGISTRY)
    for name, tag in (("circle", "v5-away-attack4"), ("red", "v5-attack4")):
        lock.add(name, reg.pull(f"toy/{name}", tag), reg.source)
    lock.save()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True",
           "ERASURE_SERVICE_LOCK": str(lock.path)}
    env.pop("ERASURE_SERVICE_CONFIG", None)  # the shipped config, its lock swapped
    r = subprocess.run([BENTOML, "serve", ".", "--port", str(free_port()), "--host", "127.0.0.1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)  # a respawn loop would never exit
    last = (r.stdout + r.stderr).strip().splitlines()[-1]
    assert r.returncode == 3, (r.returncode, last)
    assert last == ("erasure service refusing to start: pack 'red': draws red more often than the base: 75% vs the "
                    "base's 31% on its prompt attack `hollow hollow background` (+44 points, above max_attack_gain "
                    "10); drop it from the lock or retrain it")
