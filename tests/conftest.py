import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in the default test run may reach the network
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def toy_pipe():
    from erasure.base.loading import load_pipeline

    return load_pipeline("toy")


@pytest.fixture(scope="session")
def oracle():
    from erasure.toy.oracle import Oracle

    return Oracle.load()


@pytest.fixture()
def random_pipe(tmp_path):
    from factories import random_toy_pipe

    return random_toy_pipe(tmp_path)


@pytest.fixture(scope="session")
def secured_server(tmp_path_factory):
    """One real ``bentoml serve`` with access control on, shared by the page, contract and auth tests: the shipped
    packs (service/packs.lock), `striped` mandatory, small limits (a schema-valid request costs at most 8 steps of
    2 images at 64 px). Keys: `operator` (keys file, unlimited), `tiny` (keys file, 2 generate requests per
    minute), `deploy` (from $ERASURE_API_KEYS)."""
    import httpx
    import yaml

    from service.auth import KEYS_ENV, hash_key, new_key
    from service.config import ServiceConfig

    from service_helpers import REPO, free_port, serve, stop

    root = tmp_path_factory.mktemp("secured-server")
    keys = {name: new_key() for name in ("operator", "tiny", "deploy")}
    (root / "keys.txt").write_text("# test keys (sha256 only)\n"
                                   f"operator {hash_key(keys['operator'])}\n"
                                   f"tiny     {hash_key(keys['tiny'])}  rate_limit=2   # per minute\n")
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "lock": str(REPO / "service" / "packs.lock"), "device": "cpu", "threads": 4, "torch_threads": 1,
        "mandatory": ["striped"], "default_steps": 4,
        "max_attack_success": None,  # the shipped packs do not hold under the red team (docs/robustness.md)
        "limits": {"max_steps": 8, "max_size": 64, "max_images": 2, "max_prompt_chars": 100, "max_guidance": 12.0},
        "auth": {"enabled": True, "keys_file": "keys.txt", "protect_metrics": True},
    }))
    port, log = free_port(), root / "serve.log"
    proc = serve(config, root / "bentoml-home", log, port, **{KEYS_ENV: f"deploy {hash_key(keys['deploy'])}"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    try:
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(f"bentoml serve did not become ready:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"url": url, "keys": keys, "log": log, "config": ServiceConfig.load(config, env={})}
    finally:
        stop(proc)
