"""deploy/: the Kubernetes manifests against the Kubernetes API schemas (kubernetes-validate, offline, strict), the
kustomize rendering when kubectl is installed, the BentoCloud config against BentoML's own deployment schema, and
the local stand-in for replicas: `workers: 2` in one real `bentoml serve`."""

from __future__ import annotations

import concurrent.futures as cf
import shutil
import subprocess
import time
from pathlib import Path

import attr
import httpx
import pytest
import yaml

from service_helpers import free_port, make_world, serve, stop, write_config

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "kubernetes"
K8S_VERSION = "1.32.0"  # the oldest Kubernetes these manifests claim (autoscaling/v2, sidecar-free)
RESOURCES = ("deployment.yaml", "service.yaml", "hpa.yaml")


def k8s_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_kubernetes_manifests_validate_against_the_api_schemas():
    import kubernetes_validate as kv

    kinds = {}
    for name in RESOURCES:
        for doc in k8s_docs((K8S / name).read_text()):
            kv.validate(doc, K8S_VERSION, strict=True)
            kinds[doc["kind"]] = doc
    assert set(kinds) == {"Deployment", "Service", "HorizontalPodAutoscaler"}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e for e in container["env"]}
    assert env["ERASURE_SERVICE_CONFIG"]["value"] == "/etc/erasure/config.yaml"
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == "/etc/erasure"]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == "erasure-config"
    # the API keys the config names come from a Secret mounted where the config looks
    from service.config import ServiceConfig

    keys = Path(ServiceConfig.load(K8S / "config.yaml", env={}).auth.keys_file)
    [keys_mount] = [m for m in container["volumeMounts"] if keys.parent == Path(m["mountPath"])]
    assert [v for v in pod["volumes"] if v["name"] == keys_mount["name"]][0]["secret"]["secretName"]
    labels = kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert kinds["Service"]["spec"]["selector"] == labels == kinds["Deployment"]["spec"]["selector"]["matchLabels"]
    hpa = kinds["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == kinds["Deployment"]["metadata"]["name"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "bentoml_service_request_in_progress"

    # the validator refuses what it should (a misspelt probe), so passing means something
    broken = k8s_docs((K8S / "deployment.yaml").read_text())[0]
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = container["readinessProbe"]
    with pytest.raises(kv.ValidationError, match="readinesProbe"):
        kv.validate(broken, K8S_VERSION, strict=True)


def test_the_configmap_carries_the_service_lock_and_a_valid_config():
    """deploy/kubernetes/packs.lock is the lock the service ships (`make packs` writes both); config.yaml is a valid
    ServiceConfig whose lock is the file beside it (where the ConfigMap mounts it)."""
    from registry.lock import LockFile
    from service.config import ServiceConfig

    assert (K8S / "packs.lock").read_bytes() == (REPO / "service" / "packs.lock").read_bytes()
    cfg = ServiceConfig.load(K8S / "config.yaml", env={})
    assert cfg.device == "cuda" and cfg.resolve_path(cfg.lock) == K8S / "packs.lock" and cfg.auth.enabled
    assert sorted(LockFile.load(K8S / "packs.lock").entries) == ["circle", "square", "striped"]
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert kustomization["resources"] == list(RESOURCES)
    [generator] = kustomization["configMapGenerator"]
    assert generator["name"] == "erasure-config" and generator["files"] == ["config.yaml", "packs.lock"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed (the schema test still runs)")
def test_kustomize_renders_valid_objects_with_the_lock_configmap():
    import kubernetes_validate as kv

    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = {d["kind"]: d for d in k8s_docs(out.stdout)}
    for doc in docs.values():
        kv.validate(doc, K8S_VERSION, strict=True)
    cm = docs["ConfigMap"]
    assert cm["metadata"]["name"].startswith("erasure-config-")  # the content hash: a new lock rolls the pods
    assert cm["data"]["packs.lock"] == (REPO / "service" / "packs.lock").read_text()
    volumes = docs["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert [v["configMap"]["name"] for v in volumes if "configMap" in v] == [cm["metadata"]["name"]]


def strict_keys(data, cls, where="") -> list[str]:
    """Keys of ``data`` that the attrs class ``cls`` (BentoML's cloud schema) does not declare, recursively."""
    import typing

    if not attr.has(cls) or not isinstance(data, dict):
        return []
    fields = attr.fields_dict(cls)
    bad = [f"{where}{k}" for k in data if k not in fields]
    for key, value in data.items():
        if key not in fields:
            continue
        ann = fields[key].type
        ann = typing.get_type_hints(cls).get(key, ann)
        union = typing.get_origin(ann) in (typing.Union, getattr(__import__("types"), "UnionType", None))
        args = [a for a in typing.get_args(ann) if a is not type(None)] if union else [ann]
        for arg in args:
            if typing.get_origin(arg) is dict and isinstance(value, dict):
                inner = typing.get_args(arg)[1]
                for k, v in value.items():
                    bad += strict_keys(v, inner, f"{where}{key}.{k}.")
            elif attr.has(arg):
                bad += strict_keys(value, arg, f"{where}{key}.")
    return bad


def test_bentocloud_config_matches_bentomls_deployment_schema():
    from _bentoml_sdk.service.config import TrafficSchema, validate
    from bentoml._internal.cloud.schemas.schemasv2 import CreateDeploymentSchema
    from bentoml._internal.cloud.schemas.utils import cloud_converter

    from service.config import ENV_PREFIX, ServiceConfig
    from service.service import ErasureService

    data = yaml.safe_load((REPO / "deploy" / "bentocloud.yaml").read_text())
    schema = cloud_converter.structure(data, CreateDeploymentSchema)
    assert strict_keys(data, CreateDeploymentSchema) == []
    typo = yaml.safe_load((REPO / "deploy" / "bentocloud.yaml").read_text())  # the walk can fail, at any depth
    typo["services"][ErasureService.name]["scaling"]["min_replica"] = 1
    assert strict_keys({**typo, "servics": {}}, CreateDeploymentSchema) == [
        "servics", f"services.{ErasureService.name}.scaling.min_replica"]
    assert list(schema.services) == [ErasureService.name]  # BentoCloud keys services by their BentoML name
    service = schema.services[ErasureService.name]
    assert service.scaling.min_replicas >= 1 and service.scaling.max_replicas > service.scaling.min_replicas
    traffic = service.config_overrides["traffic"]
    assert set(traffic) <= set(TrafficSchema.__annotations__) and validate({"traffic": traffic})["traffic"]
    for env in schema.envs:
        assert env.name.startswith(ENV_PREFIX)
        assert env.name.removeprefix(ENV_PREFIX).lower() in ServiceConfig.model_fields, env.name


def test_two_workers_serve_the_same_packs_and_the_same_bytes(tmp_path, toy_pipe):
    """`workers: 2` in one `bentoml serve`: each worker loads and verifies the lock on its own; both report the
    same pack shas and give the same bytes for the same request (what replicas behind a load balancer must do)."""
    lock = make_world(tmp_path, toy_pipe.unet, packs={"circle": ("circle",), "red": ("red",)})
    # batching off: concurrent identical requests would share a batch, which moves pixels by up to 1/255
    # (service/README.md, "Batching"); this checks the workers' packs and bytes, so each image is a batch of one
    config = write_config(tmp_path / "config.yaml", lock, workers=2, threads=2, default_steps=4, batching=False)
    port, log = free_port(), tmp_path / "serve.log"
    proc = serve(config, tmp_path / "home", log, port)
    url = f"http://127.0.0.1:{port}"
    body = {"prompt": "a red circle", "packs": ["circle", "red"], "seed": 3, "steps": 4}

    def generate(_):
        r = httpx.post(f"{url}/generate", json=body, timeout=120)
        while r.status_code == 503 and "starting" in r.text:  # this worker is still loading: retry, as a client does
            time.sleep(0.5)
            r = httpx.post(f"{url}/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.headers["x-erasure-worker"], r.headers["x-erasure-pack-shas"], r.content

    try:
        answers: dict[str, set] = {}
        deadline = time.time() + 240
        while len(answers) < 2 and time.time() < deadline:
            try:
                with cf.ThreadPoolExecutor(8) as pool:  # concurrent requests spread over the workers
                    for worker, shas, png in pool.map(generate, range(8)):
                        answers.setdefault(worker, set()).add((shas, png))
            except httpx.TransportError:
                time.sleep(1)  # not listening yet
        assert set(answers) == {"1", "2"}, f"{answers.keys()}\n{log.read_text()[-3000:]}"
        assert len(set().union(*answers.values())) == 1  # one (shas, bytes) pair whichever worker answered
        [(shas, _)] = answers["1"]
        import json

        locked = json.loads(lock.read_text())["packs"]
        assert shas == ",".join(f"{n}={locked[n]['revision']}" for n in ("circle", "red"))
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        assert "bentoml_service_request_in_progress" in metrics  # what deploy/kubernetes/hpa.yaml scales on
    finally:
        stop(proc)
