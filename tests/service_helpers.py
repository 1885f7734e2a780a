"""A registry, a lock and a service config for the service tests, with packs built against the real toy base UNet
(random esd-x deltas of ~1e-2, so images visibly differ; real fingerprints, so start-up verification is real)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from factories import make_pack

REPO = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).parent / "bentoml")
PACKS = {"circle": ("circle",), "red": ("red",), "striped": ("striped",), "square": ("square",)}


def make_world(root: Path, unet, packs: dict[str, tuple] = PACKS, other_base: tuple[str, ...] = (),
               methods: dict[str, str] | None = None, redteam: dict | None = None) -> Path:
    """root/registry (local registry with test/NAME tag v1), root/packs.lock locking them all; returns the lock.
    ``methods``: pack -> ESD method of its random delta (default esd-x); ``redteam``: pack name -> the
    RedTeamRecord its manifest carries."""
    from registry import open_registry
    from registry.lock import LockFile

    root = Path(root)
    reg_dir = root / "registry"
    reg_dir.mkdir(parents=True, exist_ok=True)
    reg = open_registry(registry_dir=reg_dir)
    lock = LockFile(root / "packs.lock")
    for i, (name, concepts) in enumerate(packs.items()):
        pack_dir = root / "src" / name
        method = (methods or {}).get(name, "esd-x")
        make_pack(pack_dir, unet, name, concepts, seed=i, base_id="toy", other_base=name in other_base,
                  method=method, magnitude=3e-3 if method == "esd-u" else 1e-2, redteam=(redteam or {}).get(name))
        reg.push(pack_dir, f"test/{name}", tag="v1")
        lock.add(name, reg.pull(f"test/{name}", "v1"), source=str(reg_dir))
    lock.save()
    return root / "packs.lock"


def write_config(path: Path, lock: Path, **options) -> Path:
    # random test packs carry no red-team record: the check is off unless a test sets max_attack_success
    data = {"lock": str(lock), "device": "cpu", "threads": 4, "default_steps": 6, "torch_threads": 1,
            "max_attack_success": None, **options}
    Path(path).write_text(yaml.safe_dump(data))
    return Path(path)


def commit_dir(lock: Path, name: str) -> Path:
    """The registry directory holding the locked commit of ``name`` (to tamper with it)."""
    import json

    e = json.loads(Path(lock).read_text())["packs"][name]
    src = Path(e["source"])
    src = src if src.is_absolute() else Path(lock).parent / src
    return src / e["repo"] / "commits" / e["revision"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(config: Path, home: Path, log: Path, port: int, **env) -> subprocess.Popen:
    environment = {**os.environ, "ERASURE_SERVICE_CONFIG": str(config), "BENTOML_HOME": str(home),
                   "BENTOML_DO_NOT_TRACK": "True", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.Popen([BENTOML, "serve", "service.service:ErasureService", "--port", str(port),
                             "--host", "127.0.0.1"], cwd=REPO, env=environment, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # our own process group (start_new_session)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 300) -> None:
    """Until ``url``'s /readyz answers 200; raises RuntimeError with the log's tail if the server exits (a refusal
    to start makes it exit with status 3), refuses to start or times out."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"bentoml serve exited:\n{log.read_text()[-3000:]}")
        if "erasure service refusing to start" in log.read_text(errors="replace"):
            raise RuntimeError(f"the service refused to start:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"bentoml serve did not become ready in {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def forget_bentoml_metrics() -> None:
    """BentoML registers its request metrics in prometheus_client's default registry once per ASGI app; a second
    in-process app in one test process needs the first one's unregistered (prometheus_client has no public
    listing of collectors, hence the private map)."""
    import prometheus_client

    registry = prometheus_client.REGISTRY
    for collector, names in list(registry._collector_to_names.items()):
        if any(name.startswith("bentoml_") for name in names):
            registry.unregister(collector)
