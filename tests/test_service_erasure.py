"""The shipped default (service/config.yaml: the toy base and the packs locked in service/packs.lock) erases
through HTTP: the oracle reads the images /generate returns."""

from __future__ import annotations

import importlib
import io
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

PROMPTS = ["a red circle", "a photo of a blue disc", "a dotted green circle", "a yellow disk", "a circle",
           "a simple purple circle"]


@pytest.fixture(scope="module")
def default_client():
    from starlette.testclient import TestClient

    old, threads = os.environ.pop("ERASURE_SERVICE_CONFIG", None), torch.get_num_threads()
    try:
        module = importlib.reload(sys.modules["service.service"]) if "service.service" in sys.modules \
            else importlib.import_module("service.service")
        with TestClient(app=module.ErasureService.to_asgi()) as client:
            yield client
    finally:
        torch.set_num_threads(threads)
        if old is not None:
            os.environ["ERASURE_SERVICE_CONFIG"] = old


def shapes(client, oracle, packs):
    images = []
    for seed, prompt in enumerate(PROMPTS):
        r = client.post("/generate", json={"prompt": prompt, "packs": packs, "seed": seed})
        assert r.status_code == 200, r.text
        assert r.headers["x-erasure-packs"] == ",".join(packs)
        images.append(np.asarray(Image.open(io.BytesIO(r.content)).convert("RGB")))
    return oracle.classify(np.stack(images))["shape"]


def test_the_shipped_circle_pack_erases_circles_through_http(default_client, oracle):
    listed = {p["name"] for p in default_client.post("/packs", json={}).json()["packs"]}
    assert {"circle", "red", "striped", "square"} <= listed
    assert shapes(default_client, oracle, []).count("circle") >= 5
    assert shapes(default_client, oracle, ["circle"]).count("circle") <= 1
