"""Access control: API keys stored hashed, Bearer on every route but the probes and the page shell, 401 / 403 /
429 + Retry-After, keys never logged. The unit tests use service/auth.py directly; the rest go through the real
``bentoml serve`` of the ``secured_server`` fixture (tests/conftest.py)."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from service.auth import AccessControl, ApiKeys, KeysError, RateLimiter, hash_key, main, new_key
from service.config import Auth, ServiceConfig

GOOD = {"prompt": "a red circle", "steps": 1, "seed": 3}


# --- keys, limiter, config -------------------------------------------------------------------------------------


def test_key_lines_from_a_file_and_the_environment(tmp_path):
    a, b, c = new_key(), new_key(), new_key()
    assert a.startswith("erk_") and len(a) > 40 and a != b
    (tmp_path / "keys").write_text(f"# ops\nalice {hash_key(a)}\n\nbatch {hash_key(b)} rate_limit=600  # bulk\n")
    keys = ApiKeys.load(Auth(enabled=True, keys_file="keys"), tmp_path, env={"ERASURE_API_KEYS": f"ci {hash_key(c)}"})
    assert [(k.name, k.rate_limit) for k in keys.keys] == [("alice", None), ("batch", 600), ("ci", None)]
    assert keys.match(a).name == "alice" and keys.match(b).name == "batch" and keys.match(c).name == "ci"
    assert keys.match(a + "x") is None and keys.match("") is None
    assert hash_key(a) == "sha256:" + keys.keys[0].digest  # only the digest is held


def test_bad_key_configuration_is_refused_without_echoing_a_key(tmp_path):
    plain = new_key()
    (tmp_path / "keys").write_text(f"alice {plain}\n")  # a plain key pasted where its hash belongs
    with pytest.raises(KeysError) as err:
        ApiKeys.load(Auth(enabled=True, keys_file="keys"), tmp_path, env={})
    assert "entry 1" in str(err.value) and "new-key" in str(err.value) and plain not in str(err.value)
    with pytest.raises(KeysError, match="more than once"):
        ApiKeys.parse(f"a {hash_key('x')}, a {hash_key('y')}", "env")
    with pytest.raises(KeysError, match="no API key is configured"):
        ApiKeys.load(Auth(enabled=True), tmp_path, env={})
    with pytest.raises(KeysError, match="missing"):
        ApiKeys.load(Auth(enabled=True, keys_file="missing"), tmp_path, env={})
    with pytest.raises(KeysError):  # the middleware refuses to build: the service does not start without keys
        AccessControl(None, Auth(enabled=True), tmp_path)


def test_rate_limiter_is_a_token_bucket_per_key():
    now = [100.0]
    limiter = RateLimiter(clock=lambda: now[0])
    assert [limiter.acquire("a", 2) for _ in range(2)] == [0.0, 0.0]
    assert limiter.acquire("a", 2) == pytest.approx(30.0)  # one token per 30 s at 2 per minute
    assert limiter.acquire("b", 2) == 0.0  # buckets are per key
    now[0] += 15
    assert limiter.acquire("a", 2) == pytest.approx(15.0)
    now[0] += 15
    assert limiter.acquire("a", 2) == 0.0
    assert all(limiter.acquire("c", 0) == 0.0 for _ in range(100))  # 0 = unlimited


def test_new_key_command_prints_a_key_and_its_line(capsys):
    assert main(["new-key", "bob", "--rate-limit", "30"]) == 0
    out = capsys.readouterr().out
    key = re.search(r"erk_\S+", out).group(0)
    line = out.strip().splitlines()[-1].split(":  ", 1)[1]
    [entry] = ApiKeys.parse(line, "printed").keys
    assert entry.name == "bob" and entry.rate_limit == 30 and ApiKeys([entry]).match(key) is entry


def test_auth_options_from_the_environment(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("auth: {rate_limit: 10}\nlimits: {max_steps: 30}\n")
    cfg = ServiceConfig.load(path, env={"ERASURE_SERVICE_AUTH_ENABLED": "true",
                                        "ERASURE_SERVICE_AUTH_KEYS_FILE": "/run/secrets/keys",
                                        "ERASURE_SERVICE_LIMITS_MAX_IMAGES": "2"})
    assert cfg.auth == Auth(enabled=True, keys_file="/run/secrets/keys", rate_limit=10)
    assert (cfg.limits.max_steps, cfg.limits.max_images) == (30, 2)
    assert not ServiceConfig.load(env={}).auth.enabled  # off on the embedded default


# --- through the real server -----------------------------------------------------------------------------------

PROTECTED = [("POST", "/generate", GOOD), ("POST", "/generate_json", GOOD), ("GET", "/packs", None),
             ("POST", "/packs", {}), ("GET", "/docs.json", None), ("GET", "/schema.json", None),
             ("GET", "/metrics", None)]


def call(url, method, path, body=None, key=None, scheme="Bearer"):
    headers = {"Authorization": f"{scheme} {key}"} if key is not None else {}
    return httpx.request(method, url + path, json=body, headers=headers, timeout=60)


def test_probes_and_the_page_shell_need_no_key(secured_server):
    url = secured_server["url"]
    for path in ("/livez", "/readyz", "/healthz"):
        assert httpx.get(url + path).status_code == 200, path
    page = httpx.get(url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"] and "page/page.js" in page.text
    for path in ("/page/page.js", "/page/page.css", "/docs"):
        assert httpx.get(url + path).status_code == 200, path
    assert httpx.get(url + "/page/../packs").status_code in (401, 404)  # no way round the key through /page


def test_no_key_is_401_a_wrong_key_403_the_right_key_passes(secured_server):
    url, keys = secured_server["url"], secured_server["keys"]
    for method, path, body in PROTECTED:
        r = call(url, method, path, body)
        assert r.status_code == 401, (path, r.text)
        assert r.headers["www-authenticate"].startswith("Bearer") and "Authorization: Bearer" in r.json()["error"]
        assert call(url, method, path, body, key=keys["operator"], scheme="Basic").status_code == 401
        r = call(url, method, path, body, key=new_key())
        assert r.status_code == 403 and "not accepted" in r.json()["error"], (path, r.text)
        r = call(url, method, path, body, key=keys["operator"])
        assert r.status_code == 200, (path, r.text)
    # the key from $ERASURE_API_KEYS works as well as the keys file's
    r = call(url, "POST", "/generate", GOOD, key=keys["deploy"])
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-erasure-packs"] == "striped"


def test_rate_limit_is_per_key_429_with_retry_after(secured_server):
    url, keys = secured_server["url"], secured_server["keys"]
    assert [call(url, "POST", "/generate_json", {"prompt": ""}, key=keys["tiny"]).status_code
            for _ in range(2)] == [400, 400]  # refused requests still spend the key's budget
    r = call(url, "POST", "/generate", GOOD, key=keys["tiny"])
    assert r.status_code == 429, r.text
    assert 1 <= int(r.headers["retry-after"]) <= 30 and "rate limit of 2" in r.json()["error"]
    assert call(url, "GET", "/packs", key=keys["tiny"]).status_code == 200  # only generate requests are limited
    assert call(url, "POST", "/generate", GOOD, key=keys["operator"]).status_code == 200  # other keys go on


def test_bentoml_client_with_a_token(secured_server):
    import bentoml
    from bentoml.exceptions import BentoMLException

    url, keys = secured_server["url"], secured_server["keys"]
    with bentoml.SyncHTTPClient(url, token=keys["operator"]) as client:
        out = client.generate_json(prompt="a red circle", packs=["circle"], seed=1, steps=1)
        out = out if isinstance(out, dict) else out.model_dump()
        assert out["packs"] == ["circle", "striped"] and len(out["images"]) == 1
    with pytest.raises(BentoMLException):
        bentoml.SyncHTTPClient(url, token=new_key()).packs()


def test_keys_never_reach_the_log(secured_server):
    url, keys, log = secured_server["url"], secured_server["keys"], secured_server["log"]
    stranger = new_key()
    for key in (*keys.values(), stranger):
        call(url, "GET", "/packs", key=key)
    call(url, "POST", "/generate", {"prompt": "x", "steps": 1}, key=keys["operator"])
    call(url, "POST", "/generate", {"prompt": "x", "steps": 1})
    deadline = time.time() + 10
    while "403 GET /packs" not in log.read_text() and time.time() < deadline:
        time.sleep(0.2)
    text = log.read_text()
    assert "access control on: 3 API key(s) ['operator', 'tiny', 'deploy']" in text
    assert "403 GET /packs from 127.0.0.1: the key presented is not one of the configured keys" in text
    assert "401 POST /generate from 127.0.0.1: no bearer key" in text
    for key in (*keys.values(), stranger):
        assert key not in text and key[4:20] not in text
    assert "Bearer erk_" not in text
