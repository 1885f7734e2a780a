"""The shipped default (service/config.yaml: the toy base and the packs locked in service/packs.lock) erases
through HTTP: the oracle reads the images /generate returns.

It runs in a child process: BentoML registers its Prometheus metrics once per process, and tests/test_service.py
already serves another configuration in this one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import io, json, sys
import numpy as np
from PIL import Image
from starlette.testclient import TestClient
from erasure.toy.oracle import Oracle
from service.service import ErasureService

PROMPTS = ["a red circle", "a photo of a blue disc", "a dotted green circle", "a yellow disk", "a circle",
           "a simple purple circle"]
oracle, out = Oracle.load(), {}
import service.service as module
with TestClient(app=ErasureService.to_asgi()) as client:
    assert module._current["svc"].wait_ready(300)
    out["listed"] = [p["name"] for p in client.post("/packs", json={}).json()["packs"]]
    for packs in ([], ["circle"]):
        images, headers = [], []
        for seed, prompt in enumerate(PROMPTS):
            r = client.post("/generate", json={"prompt": prompt, "packs": packs, "seed": seed})
            assert r.status_code == 200, r.text
            headers.append(r.headers["x-erasure-packs"])
            images.append(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")))
        out[",".join(packs) or "base"] = {"shapes": oracle.classify(np.stack(images))["shape"], "headers": headers}
print(json.dumps(out))
"""


def test_the_shipped_circle_pack_erases_circles_through_http():
    env = {k: v for k, v in os.environ.items() if k != "ERASURE_SERVICE_CONFIG"}  # the shipped default
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, "-c", CHILD], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert {"circle", "striped", "square"} <= set(out["listed"])
    assert out["base"]["shapes"].count("circle") >= 5 and set(out["base"]["headers"]) == {""}
    assert out["circle"]["shapes"].count("circle") <= 1 and set(out["circle"]["headers"]) == {"circle"}
