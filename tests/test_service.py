"""The BentoML service in-process: ``TestClient(ErasureService.to_asgi())`` (lifespan runs ``__init__``), plus the
runtime's start-up refusals. Packs are random esd-x deltas built against the real toy base (tests/service_helpers).

Config of the shared service: packs circle, red, striped, square from a test registry; square is mandatory;
`batching: false` (one pipeline call per image: the byte-identical path). Batching: tests/test_service_batching.py."""

from __future__ import annotations

import base64
import concurrent.futures as cf
import importlib
import io
import json
import os
import sys

import pytest
import torch
from PIL import Image

from factories import redteam_record
from service_helpers import commit_dir, make_world, write_config

STEPS = 4  # mechanics, not image quality: keep the suite fast on 2 cores
SETS = [[], ["circle"], ["red"], ["circle", "red", "striped"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory, toy_pipe):
    root = tmp_path_factory.mktemp("service-world")
    record = redteam_record({"prompt": 0.02, "settings": 0.05}, "square", min_steps=3, min_size=32,
                            negative_prompt=False)
    lock = make_world(root, toy_pipe.unet, redteam={"square": record})
    config = write_config(root / "config.yaml", lock, mandatory=["square"], default_steps=STEPS, batching=False,
                          limits={"max_steps": 30, "max_size": 128, "max_images": 4, "max_prompt_chars": 100,
                                  "min_steps": 3, "min_size": 32, "negative_prompt": False},
                          max_attack_success=0.1)
    return {"root": root, "lock": lock, "config": config}


@pytest.fixture(scope="module")
def svc_module(world):
    old, threads = os.environ.get("ERASURE_SERVICE_CONFIG"), torch.get_num_threads()
    os.environ["ERASURE_SERVICE_CONFIG"] = str(world["config"])
    try:
        # CONFIG is read when service.service is imported: (re)import it under this test's config
        module = importlib.reload(sys.modules["service.service"]) if "service.service" in sys.modules \
            else importlib.import_module("service.service")
        yield module
    finally:
        torch.set_num_threads(threads)  # the config's torch_threads: 1 is process-wide
        if old is None:
            os.environ.pop("ERASURE_SERVICE_CONFIG", None)
        else:
            os.environ["ERASURE_SERVICE_CONFIG"] = old


@pytest.fixture(scope="module")
def client(svc_module):
    from starlette.testclient import TestClient

    with TestClient(app=svc_module.ErasureService.to_asgi()) as c:
        svc = svc_module._current["svc"]
        assert svc.wait_ready(120), svc.refusal  # start-up runs in a thread: the probes answer meanwhile
        yield c


def gen(client, **body):
    body.setdefault("prompt", "a red circle")
    body.setdefault("steps", STEPS)
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r


def test_probes(client):
    assert client.get("/readyz").status_code == 200
    assert client.get("/livez").status_code == 200


def test_generate_png_and_headers(client, world):
    r = gen(client, packs=["circle"], seed=7)
    assert r.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(r.content))
    assert image.size == (64, 64) and image.format == "PNG"
    assert r.headers["x-erasure-packs"] == "circle,square"  # square is mandatory
    assert r.headers["x-erasure-seed"] == "7"
    assert r.headers["x-erasure-mandatory"] == "square"
    locked = json.loads(world["lock"].read_text())["packs"]
    shas = dict(kv.split("=") for kv in r.headers["x-erasure-pack-shas"].split(","))
    assert shas == {n: locked[n]["revision"] for n in ("circle", "square")}


def test_same_request_same_bytes_and_packs_change_the_image(client):
    a = gen(client, packs=["circle"], seed=3).content
    assert gen(client, packs=["circle"], seed=3).content == a
    assert gen(client, packs=["circle"], seed=4).content != a
    assert gen(client, packs=["red"], seed=3).content != a
    assert gen(client, seed=3).content != a


def test_concurrent_requests_match_sequential(client):
    """32 requests over 4 pack sets, 8 at a time (the service runs 4 in parallel): each answer is byte for byte
    the answer the same request gets alone, so no request saw another's weights or scheduler state."""
    requests = [{"prompt": ["a red circle", "a blue square", "a striped star"][i % 3], "packs": SETS[i % 4],
                 "seed": 100 + i // 4} for i in range(32)]
    alone = [gen(client, **r).content for r in requests]
    with cf.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: gen(client, **r), requests))
    assert [r.content for r in together] == alone
    assert [r.headers["x-erasure-packs"] for r in together] == [",".join(sorted({"square", *r["packs"]}))
                                                                for r in requests]
    assert len(set(alone)) > 16


def test_images_depend_only_on_their_own_seed(client):
    r = client.post("/generate_json", json={"prompt": "a red circle", "packs": ["red"], "seed": 10, "num_images": 3,
                                            "steps": STEPS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seeds"] == [10, 11, 12] and body["packs"] == ["red", "square"]
    singles = [gen(client, packs=["red"], seed=s).content for s in (10, 11, 12)]
    assert [base64.b64decode(x) for x in body["images"]] == singles
    grid = gen(client, packs=["red"], seed=10, num_images=2)
    assert Image.open(io.BytesIO(grid.content)).size == (128, 64)
    assert grid.headers["x-erasure-seeds"] == "10,11"


def test_packs_listing(client, world):
    locked = json.loads(world["lock"].read_text())["packs"]
    for r in (client.get("/packs"), client.post("/packs")):
        assert r.status_code == 200, r.text
        body = r.json()
        packs = {p["name"]: p for p in body["packs"]}
        assert sorted(packs) == ["circle", "red", "square", "striped"]
        assert packs["circle"]["concepts"] == ["circle"] and packs["circle"]["method"] == "esd-x"
        assert packs["square"]["mandatory"] and not packs["red"]["mandatory"]
        assert packs["square"]["redteam"]["asr"] == {"prompt": 0.02, "settings": 0.05}  # held, so it started
        assert packs["square"]["redteam"]["seeds"] == 64 and packs["red"]["redteam"] is None
        assert all(p["sha"] == locked[n]["revision"] and p["repo"] == f"test/{n}" and p["scale"] == 1.0
                   for n, p in packs.items())
        assert body["mandatory"] == ["square"] and body["limits"]["max_steps"] == 30
        assert body["limits"]["negative_prompt"] is False  # the square pack was red-teamed without them
        precomposed = {tuple(s["packs"]) for s in body["pack_sets"] if s["pinned"]}
        assert {("square",), ("circle", "square"), ("red", "square"), ("square", "striped")} <= precomposed


BAD = [
    ({"prompt": "x", "packs": ["nope"]}, ["unknown pack", "circle", "red", "square", "striped"]),
    ({"prompt": ""}, ["prompt is empty"]),
    ({"prompt": "   "}, ["prompt is empty"]),
    ({"prompt": "x" * 101}, ["prompt is 101 characters", "at most 100"]),
    ({"prompt": "x", "negative_prompt": "green"}, ["negative_prompt", "off on this service", "leave it out"]),
    ({"prompt": "x", "steps": 31}, ["steps is 31", "3 to 30"]),
    ({"prompt": "x", "steps": 2}, ["steps is 2", "3 to 30", "too rough to judge"]),
    ({"prompt": "x", "width": 16}, ["width is 16", "from 32 up to 128", "too rough to judge"]),
    ({"prompt": "x", "steps": 0}, ["steps", "greater than or equal to 1"]),
    ({"prompt": "x", "width": 256}, ["width is 256", "up to 128"]),
    ({"prompt": "x", "height": 50}, ["height is 50", "multiple of 16"]),
    ({"prompt": "x", "guidance_scale": 21.0}, ["guidance_scale", "0 to 20"]),
    ({"prompt": "x", "guidance_scale": -1}, ["guidance_scale", "greater than or equal to 0"]),
    ({"prompt": "x", "num_images": 5}, ["num_images is 5", "1 to 4"]),
    ({"prompt": "x", "num_images": 0}, ["num_images", "greater than or equal to 1"]),
    ({"prompt": "x", "seed": -1}, ["seed", "greater than or equal to 0"]),
    ({"prompt": "x", "steps": "4"}, ["steps", "valid integer"]),
    ({"prompt": "x", "steps": 4.5}, ["steps", "valid integer"]),
    ({"prompt": 3}, ["prompt", "valid string"]),
    ({"prompt": "x", "packs": "circle"}, ["packs", "valid array"]),
    ({"prompt": "x", "packs": ["red", "red"]}, ["['red'] more than once"]),
    ({"prompt": "x", "disable": ["square"]}, ["cannot remove packs", "square", "mandatory"]),
    ({"prompt": "x", "exclude": ["square"]}, ["cannot remove packs", "mandatory"]),
    ({"prompt": "x", "colour": "red"}, ["colour", "Extra inputs are not permitted"]),
    ({}, ["prompt", "Field required"]),
]


@pytest.mark.parametrize("route", ["/generate", "/generate_json"])
def test_bad_requests_are_400_with_a_fix(client, route):
    for body, words in BAD:
        r = client.post(route, json=body)
        assert r.status_code == 400, (body, r.status_code, r.text)
        assert all(w in r.text for w in words), (body, r.text)
    for raw in (b"{not json", b"", b"[1, 2]", b'"a red circle"'):
        r = client.post(route, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, (raw, r.status_code, r.text)


def test_mandatory_pack_applies_even_when_named(client):
    a = gen(client, packs=["square"], seed=1)
    b = gen(client, packs=[], seed=1)
    assert a.headers["x-erasure-packs"] == b.headers["x-erasure-packs"] == "square"
    assert a.content == b.content


def test_base_is_never_mutated_and_copies_share_untouched_tensors(svc_module, client, toy_pipe):
    from erasure.pack.concept_pack import fingerprint

    svc = svc_module._current["svc"]
    rt = svc.runtime
    base = dict(rt.pipe.unet.named_parameters())
    before = fingerprint(base, base)
    gen(client, packs=["circle", "striped"], seed=5)  # an uncached set: built on demand
    assert fingerprint(dict(rt.pipe.unet.named_parameters()), base) == before
    assert fingerprint(base, base) == fingerprint(dict(toy_pipe.unet.named_parameters()), base)
    unet, built = rt.cache.get(("circle", "square", "striped"))
    assert not built
    copy = dict(unet.named_parameters())
    shared = [n for n in base if copy[n] is base[n]]
    touched = set(rt.packs["circle"].pack.delta)
    assert set(base) - set(shared) == touched  # only the touched (attn2) tensors are new
    stats = {tuple(s["packs"]): s for s in rt.cache.stats()}[("circle", "square", "striped")]
    assert stats["extra_bytes"] == sum(base[n].numel() * 4 for n in touched)


# --- start-up: fail closed -----------------------------------------------------------------------------------


def _runtime(config):
    from service.config import ServiceConfig
    from service.runtime import Runtime

    return Runtime(ServiceConfig.load(config))


def test_startup_refuses_a_tampered_pack(tmp_path, toy_pipe):
    from service.runtime import StartupError

    lock = make_world(tmp_path, toy_pipe.unet, packs={"circle": ("circle",), "red": ("red",)})
    delta = commit_dir(lock, "red") / "delta.safetensors"
    data = bytearray(delta.read_bytes())
    data[-1] ^= 1
    delta.chmod(0o644)
    delta.write_bytes(bytes(data))
    with pytest.raises(StartupError, match=r"pack 'red'.*sha256 of delta.safetensors"):
        _runtime(write_config(tmp_path / "c.yaml", lock))


def test_startup_refuses_a_pack_for_another_base(tmp_path, toy_pipe):
    from service.runtime import StartupError

    lock = make_world(tmp_path, toy_pipe.unet, packs={"circle": ("circle",), "alien": ("x",)}, other_base=("alien",))
    with pytest.raises(StartupError, match=r"pack 'alien'.*another base"):
        _runtime(write_config(tmp_path / "c.yaml", lock))


def test_startup_refuses_bad_configuration(tmp_path, toy_pipe):
    from erasure.errors import InvalidArgumentError
    from service.runtime import StartupError

    lock = make_world(tmp_path, toy_pipe.unet, packs={"circle": ("circle",)})
    with pytest.raises(StartupError, match=r"mandatory.*\['red'\].*not loaded"):
        _runtime(write_config(tmp_path / "a.yaml", lock, mandatory=["red"]))
    with pytest.raises(StartupError, match=r"no lock file"):
        _runtime(write_config(tmp_path / "b.yaml", tmp_path / "missing.lock"))
    with pytest.raises(StartupError, match=r"pack 'red': not in the lock"):
        _runtime(write_config(tmp_path / "c.yaml", lock, packs=["circle", "red"]))
    with pytest.raises(InvalidArgumentError, match="limits.max_steps"):
        _runtime(write_config(tmp_path / "d.yaml", lock, limits={"max_steps": 0}))
    with pytest.raises(InvalidArgumentError, match="unknown_option"):
        _runtime(write_config(tmp_path / "e.yaml", lock, unknown_option=1))
    with pytest.raises(InvalidArgumentError, match="min_steps 9 is above max_steps 8"):
        _runtime(write_config(tmp_path / "f.yaml", lock, limits={"min_steps": 9, "max_steps": 8}))
    with pytest.raises(InvalidArgumentError, match="default_guidance 3.0 is below limits.min_guidance 5.0"):
        _runtime(write_config(tmp_path / "g.yaml", lock, limits={"min_guidance": 5.0}))


def test_startup_refuses_a_mandatory_pack_without_a_redteam_record_or_above_the_bar(tmp_path, toy_pipe, caplog):
    from service.runtime import StartupError

    from factories import redteam_record

    records = {"red": redteam_record({"prompt": 0.05, "settings": 0.30, "soft-prompt": 0.2}, "red"),
               "striped": redteam_record({"prompt": 0.05, "settings": 0.08, "soft-prompt": 0.6}, "striped",
                                         min_steps=4, min_size=48),
               "square": redteam_record({"prompt": 0.0, "settings": 0.0}, "square", max_size=64),
               "green": redteam_record({"prompt": 0.0, "settings": 0.0}, "green", negative_prompt=False,
                                       min_guidance=3.0)}
    lock = make_world(tmp_path, toy_pipe.unet, packs={"circle": ("circle",), "red": ("red",),
                                                      "striped": ("striped",), "square": ("square",),
                                                      "green": ("green",)},
                      redteam=records)

    def start(name, **options):
        return _runtime(write_config(tmp_path / f"{name}.yaml", lock, **{"max_attack_success": 0.1, **options}))

    with pytest.raises(StartupError, match=r"pack 'circle': no red-team record \(max_attack_success is 10%\)"):
        start("none", mandatory=["circle"])
    with pytest.raises(StartupError, match=r"pack 'red': red-team attack success 30% \(settings, base 100%\) is "
                                           r"above max_attack_success 10%"):
        start("above", mandatory=["red"])
    with pytest.raises(StartupError, match=r"pack 'square': red-teamed within narrower limits.*max_size 64 < 128"):
        start("narrow", mandatory=["square"])
    with pytest.raises(StartupError, match=r"pack 'striped': red-teamed within narrower limits.*min_steps 4 > 1"):
        start("wide", mandatory=["striped"], limits={"min_size": 48})  # this service would serve 1 to 3 steps too
    with pytest.raises(StartupError, match=r"pack 'green': red-teamed within narrower limits.*min_guidance 3.0 > 0"):
        start("unguided", mandatory=["green"], limits={"negative_prompt": False})
    with pytest.raises(StartupError, match=r"pack 'green': red-teamed within narrower limits.*negative prompts off"):
        start("negative", mandatory=["green"])  # red-teamed without negative prompts; this service takes them
    assert start("no-negative", mandatory=["green"],
                 limits={"min_guidance": 3.0, "negative_prompt": False}).packs["green"].mandatory
    # white-box figures need the weights, which the service never serves: only prompt and settings count
    narrowed = {"min_steps": 4, "min_size": 48}  # the range striped's red team covered
    rt = start("ok", mandatory=["striped"], limits=narrowed)
    info = {p["name"]: p for p in (lp.info() for lp in rt.packs.values())}
    assert info["striped"]["redteam"]["asr"] == {"prompt": 0.05, "settings": 0.08, "soft-prompt": 0.6}
    assert info["circle"]["redteam"] is None  # optional packs are not checked by default...
    with pytest.raises(StartupError, match=r"pack 'circle': no red-team record"):
        start("all", mandatory=["striped"], limits=narrowed, redteam_check="all")  # ...unless every pack must hold
    assert start("loose", mandatory=["red"], max_attack_success=0.3).packs["red"].mandatory
    assert start("off", mandatory=["circle"], max_attack_success=None).packs["circle"].mandatory


def test_packs_by_repo_from_a_registry_and_scales(tmp_path, toy_pipe):
    lock = make_world(tmp_path, toy_pipe.unet, packs={"circle": ("circle",), "red": ("red",)})
    config = write_config(tmp_path / "c.yaml", lock, registry="registry", scales={"red": 0.5}, mandatory=["red"],
                          packs=["circle", {"name": "red", "repo": "test/red", "revision": "v1"}])
    rt = _runtime(config)
    assert rt.packs["red"].scale == 0.5 and rt.packs["red"].mandatory and rt.packs["red"].repo == "test/red"
    assert rt.packs["red"].sha == json.loads(lock.read_text())["packs"]["red"]["revision"]


def test_config_environment_overrides(tmp_path):
    from service.config import ServiceConfig

    path = tmp_path / "c.yaml"
    path.write_text("lock: sub/packs.lock\nthreads: 2\n")
    cfg = ServiceConfig.load(path, env={"ERASURE_SERVICE_DEVICE": "cuda", "ERASURE_SERVICE_THREADS": "8",
                                        "ERASURE_SERVICE_MANDATORY": "circle, red"})
    assert (cfg.device, cfg.threads, cfg.mandatory) == ("cuda", 8, ["circle", "red"])
    assert cfg.resolve_path(cfg.lock) == tmp_path / "sub" / "packs.lock"
    default = ServiceConfig.load(env={})
    assert default.base == "toy" and default.packs == "all" and default.mandatory == []
    assert default.resolve_path(default.lock).name == "packs.lock"


def test_page_document_and_guard_without_access_control(client):
    """The embedded default has no access control: the page, the listing and the document answer without a key;
    the document carries this configuration's limits; a body that is not JSON is a 415, not BentoML's 500."""
    page = client.get("/")
    assert page.status_code == 200 and "page/page.js" in page.text
    doc = client.get("/docs.json").json()
    request = doc["components"]["schemas"]["GenerateRequest"]["properties"]
    assert request["steps"]["maximum"] == 30 and request["num_images"]["maximum"] == 4
    assert request["packs"]["items"]["enum"] == ["circle", "red", "square", "striped"]
    assert "securitySchemes" not in doc["components"]
    for route in ("/generate", "/generate_json", "/packs"):
        r = client.post(route, content=b'{"prompt": "x"}', headers={"content-type": "multipart/form-data"})
        assert r.status_code == 415, (route, r.text)


def test_startup_refuses_any_pack_that_makes_its_concept_more_likely(tmp_path, toy_pipe):
    """A pack must never make its concept more likely: one whose record shows an attack a request can mount drawing
    the concept more often than the base by more than max_attack_gain is refused, mandatory or optional; a white-box
    figure (the soft prompt is optimised on the pack) does not count."""
    from service.runtime import StartupError

    from factories import redteam_record

    records = {"red": redteam_record({"prompt": 0.5, "settings": 0.1}, "red", "hollow hollow background",
                                     base_rate={"prompt": 0.2, "settings": 0.1}),
               "circle": redteam_record({"prompt": 0.05, "settings": 0.0, "soft-prompt": 0.9}, "circle",
                                        base_rate={"prompt": 0.1, "settings": 0.0, "soft-prompt": 0.1})}
    lock = make_world(tmp_path, toy_pipe.unet, packs={"circle": ("circle",), "red": ("red",)}, redteam=records)
    with pytest.raises(StartupError) as err:
        _runtime(write_config(tmp_path / "a.yaml", lock, max_attack_gain=0.1))  # red is only optional here
    assert str(err.value) == ("pack 'red': draws red more often than the base: 50% vs the base's 20% on its prompt "
                              "attack `hollow hollow background` (+30 points, above max_attack_gain 10); drop it "
                              "from the lock or retrain it")
    assert _runtime(write_config(tmp_path / "b.yaml", lock, max_attack_gain=0.35)).packs["red"]
    assert _runtime(write_config(tmp_path / "c.yaml", lock, max_attack_gain=None)).packs["circle"]
