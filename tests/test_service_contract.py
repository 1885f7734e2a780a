"""The OpenAPI document tells the truth: schemathesis (all checks) against the real server, the document following
the configuration, and bodies BentoML cannot parse answered 415 instead of 500."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from service.config import Auth, Limits
from service.contract import openapi_document

SCHEMATHESIS = str(Path(sys.executable).parent / "schemathesis")
MIN_CASES = 300


def test_schemathesis_all_checks_pass_against_the_real_server(secured_server, tmp_path):
    """Every check schemathesis has (server errors, status codes, content types, response schemas and headers,
    schema-valid requests accepted, invalid ones rejected, undeclared methods, auth ignored) over /docs.json,
    with a fixed seed so CI reruns the same cases."""
    key = secured_server["keys"]["operator"]
    t0 = time.perf_counter()
    run = subprocess.run([SCHEMATHESIS, "run", f"{secured_server['url']}/docs.json",
                          "--header", f"Authorization: Bearer {key}", "--checks", "all", "--max-examples", "20",
                          "--seed", "15", "--report", "json", "--report-dir", str(tmp_path / "report")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    [report_file] = (tmp_path / "report").glob("*.json")
    report = json.loads(report_file.read_text())
    cases = report["test_cases"]
    print(f"schemathesis: {cases['generated']} cases, {cases['with_failures']} with failures, {seconds:.1f} s")
    assert run.returncode == 0 and cases["with_failures"] == 0 and cases["errored"] == 0, run.stdout[-6000:]
    assert cases["generated"] >= MIN_CASES, cases
    assert key not in run.stdout  # schemathesis masks the header in what it prints


def _request(doc):
    return doc["components"]["schemas"]["GenerateRequest"]["properties"]


def test_the_document_follows_the_configuration():
    from service.service import ErasureService

    spec = ErasureService.openapi_spec.asdict()
    small = openapi_document(spec, limits=Limits(max_steps=8, max_size=100, max_images=2, max_prompt_chars=50,
                                                 max_guidance=7.5), size_multiple=16, packs=["b", "a"], auth=None)
    big = openapi_document(spec, limits=Limits(), size_multiple=64, packs=[], auth=Auth(enabled=True))
    p = _request(small)
    assert (p["steps"]["maximum"], p["guidance_scale"]["maximum"], p["num_images"]["maximum"]) == (8, 7.5, 2)
    assert (p["width"]["minimum"], p["width"]["maximum"], p["width"]["multipleOf"]) == (16, 96, 16)
    assert p["prompt"]["maxLength"] == p["negative_prompt"]["maxLength"] == 50 and p["prompt"]["pattern"] == r"\S"
    assert p["packs"]["items"]["enum"] == ["a", "b"] and p["packs"]["uniqueItems"]
    assert p["seed"]["maximum"] == 2**53 - 1 and p["negative_prompt"]["nullable"] and p["steps"]["nullable"]
    shipped = _request(openapi_document(spec, limits=Limits(min_steps=4, min_size=48), size_multiple=16, packs=[],
                                        auth=None))
    assert (shipped["steps"]["minimum"], shipped["width"]["minimum"], shipped["height"]["minimum"]) == (4, 48, 48)
    closed = _request(openapi_document(spec, limits=Limits(negative_prompt=False, min_guidance=3.0), size_multiple=16,
                                       packs=[], auth=None))
    assert closed["negative_prompt"]["maxLength"] == 0 and closed["prompt"]["maxLength"] == 300
    assert (closed["guidance_scale"]["minimum"], p["guidance_scale"]["minimum"]) == (3.0, 0)
    q = _request(big)
    assert (q["steps"]["maximum"], q["width"]["maximum"], q["height"]["multipleOf"]) == (50, 128, 64)
    assert q["packs"]["maxItems"] == 0  # nothing loaded: any name would be refused
    # error bodies: one schema, `detail` a list of {loc, msg, type}
    for doc in (small, big):
        for route in ("/generate", "/generate_json", "/packs"):
            responses = doc["paths"][route]["post"]["responses"]
            assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
            assert "415" in responses
        assert doc["components"]["schemas"]["Error"]["properties"]["detail"]["type"] == "array"
        assert set(doc["paths"]["/packs"]) == {"get", "post"} and "get" in doc["paths"]["/"]
    # access control appears only when it is on
    assert "securitySchemes" not in small["components"] and "security" not in small["paths"]["/generate"]["post"]
    gen = big["paths"]["/generate"]["post"]
    assert gen["security"] == [{"bearer": []}] and {"401", "403", "429"} <= set(gen["responses"])
    assert gen["responses"]["429"]["headers"]["Retry-After"]["required"]
    assert "security" not in big["paths"]["/livez"]["get"] and "security" not in big["paths"]["/metrics"]["get"]


def test_the_served_document_is_this_deployments(secured_server):
    url, cfg = secured_server["url"], secured_server["config"]
    assert httpx.get(f"{url}/docs.json").status_code == 401  # it names the loaded packs
    doc = httpx.get(f"{url}/docs.json", headers={"Authorization": f"Bearer {secured_server['keys']['operator']}"})
    p = _request(doc.json())
    assert p["steps"]["maximum"] == cfg.limits.max_steps == 8
    assert p["width"]["maximum"] == cfg.limits.max_size == 64 and p["width"]["multipleOf"] == 16
    assert p["num_images"]["maximum"] == cfg.limits.max_images and p["prompt"]["maxLength"] == 100
    assert p["packs"]["items"]["enum"] == ["circle", "square", "striped"]
    assert doc.json()["paths"]["/metrics"]["get"]["security"] == [{"bearer": []}]  # protect_metrics


@pytest.mark.parametrize("content_type", [
    "multipart/form-data", "multipart/form-data; boundary=", "multipart/form-data; boundary=xyz", "text/plain",
    "application/x-www-form-urlencoded", "garbage;;;", "application/json; charset=latin-1", "image/png"])
def test_a_body_that_is_not_json_is_415_never_500(secured_server, content_type):
    url, key = secured_server["url"], secured_server["keys"]["operator"]
    for route in ("/generate", "/generate_json", "/packs"):
        r = httpx.post(url + route, content=b'{"prompt": "x"}', timeout=30,
                       headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})
        assert r.status_code == 415, (route, content_type, r.status_code, r.text)
        assert "Content-Type: application/json" in r.json()["error"]


def test_methods_errors_and_json_bodies(secured_server):
    url, key = secured_server["url"], secured_server["keys"]["operator"]
    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.request("OPTIONS", f"{url}/packs", headers=auth)
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD, POST"
    assert httpx.get(f"{url}/generate", headers=auth).status_code == 405
    # no Content-Type is read as JSON; charset=utf-8 is fine
    r = httpx.post(f"{url}/generate", content=b'{"prompt": "a circle", "steps": 1}', headers=auth, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    r = httpx.post(f"{url}/generate_json", content=b'{"prompt": "", "steps": 99, "seed": 9007199254740992}',
                   headers={**auth, "Content-Type": "application/json; charset=UTF-8"}, timeout=60)
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert isinstance(detail, list) and all({"loc", "msg", "type"} <= set(d) for d in detail)
    assert {d["loc"][0] for d in detail} == {"prompt"}  # pydantic's checks come first, then the limits
    r = httpx.post(f"{url}/generate_json", json={"prompt": "x", "steps": 99, "seed": 9007199254740992},
                   headers=auth, timeout=60)
    assert r.status_code == 400 and [d["loc"] for d in r.json()["detail"]] == [["steps"], ["seed"]]
    assert "use 0 to 9007199254740991" in r.text and "use 1 to 8" in r.text
