"""The operator page in a real browser: Debian's chromium (/usr/bin/chromium, installed by `make test`) driven by
Playwright, against the real server of the `secured_server` fixture (access control on, the shipped packs,
`striped` mandatory). Saves build/artefacts/operator-page.png (the README shows a copy of it)."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import httpx
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
ARTEFACTS = Path(__file__).resolve().parents[1] / "build" / "artefacts"
# Headless and quiet: without the background-networking flags its connections to the closed network pile up.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not CHROMIUM.exists():  # fail, never skip: CI must run this test
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it as root (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=str(CHROMIUM), args=FLAGS,
            headless=True, viewport={"width": 1000, "height": 900})
        yield context
        context.close()


@pytest.fixture()
def page(browser, secured_server):
    page = browser.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(str(exc)))
    page.goto(secured_server["url"] + "/")
    yield page
    page.close()
    assert not problems, problems  # no script error, whatever the test did


def enter_key(page, key):
    page.wait_for_selector("#access:not([hidden])")
    assert "API key" in page.inner_text("#access-message")  # the page asked: GET /packs answered 401
    page.fill("#api-key", key)
    page.press("#api-key", "Enter")
    page.wait_for_selector("#pack-circle")


def images(page, selector):
    srcs = page.eval_on_selector_all(selector, "els => els.map(e => e.getAttribute('src'))")
    return [base64.b64decode(s.split(",", 1)[1]) for s in srcs]


def test_compare_mandatory_only_beside_the_selected_pack(page, secured_server):
    url, key = secured_server["url"], secured_server["keys"]["operator"]
    enter_key(page, key)
    listing = httpx.get(url + "/packs", headers={"Authorization": f"Bearer {key}"}).json()
    shas = {p["name"]: p["sha"] for p in listing["packs"]}
    # mandatory shown locked; every pack with its concepts, method and pinned sha
    assert page.is_checked("#pack-striped") and page.is_disabled("#pack-striped")
    assert "locked" in page.inner_text("li.pack.mandatory")
    meta = page.inner_text("#pack-square-meta")
    assert "concepts: square" in meta and "esd-u" in meta and shas["square"][:12] in meta
    # keyboard only: tick circle with Space, generate with Ctrl+Enter
    page.focus("#pack-circle")
    page.keyboard.press("Space")
    assert page.is_checked("#pack-circle")
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    page.wait_for_function("document.querySelectorAll('.pair img').length === 2")
    base, selected = images(page, ".pair img")
    assert base != selected
    captions = page.eval_on_selector_all(".pair figcaption", "els => els.map(e => e.innerText)")
    assert "x-erasure-packs: striped\n" in captions[0] and "x-erasure-packs: circle,striped" in captions[1]
    assert all("x-erasure-seed: 0" in c for c in captions)
    assert f"circle={shas['circle'][:12]}" in captions[1] and f"striped={shas['striped'][:12]}" in captions[0]
    # what the page shows is exactly what the API returns for that request
    body = {"prompt": "a red circle", "packs": ["circle"], "seed": 0, "steps": 4, "guidance_scale": 3,
            "width": 64, "height": 64}
    api = httpx.post(url + "/generate", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert api.content == selected
    assert Image.open(io.BytesIO(selected)).size == (64, 64)
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTEFACTS / "operator-page.png"), full_page=True)


def test_bad_input_shows_the_servers_message(page, secured_server):
    enter_key(page, secured_server["keys"]["operator"])
    page.fill("#prompt", "")
    page.click("#generate")
    page.wait_for_selector("#error:not([hidden])")
    assert "prompt is empty" in page.inner_text("#error") and page.get_attribute("#prompt", "aria-invalid") == "true"
    assert page.locator(".pair img").count() == 0
    page.fill("#prompt", "a blue square")
    page.fill("#steps", "99")
    page.click("#generate")
    page.wait_for_function("document.querySelector('#error').innerText.includes('steps is 99')")
    assert "400" in page.inner_text("#error") and "use 1 to 8" in page.inner_text("#error")
    assert page.get_attribute("#steps", "aria-invalid") == "true"
    # the page goes on working
    page.fill("#steps", "2")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('.pair img').length === 2")
    assert page.is_hidden("#error") and page.get_attribute("#steps", "aria-invalid") is None
    assert "done" in page.inner_text("#status")


def test_grid_packs_by_seeds(page, secured_server):
    enter_key(page, secured_server["keys"]["operator"])
    page.check("#pack-circle")
    page.check("#pack-square")
    page.check("input[name=mode][value=grid]")
    page.fill("#grid-seeds", "2")
    page.fill("#steps", "2")
    page.click("#generate")
    page.wait_for_function("document.querySelectorAll('table.grid img').length === 8", timeout=60_000)
    rows = page.eval_on_selector_all("table.grid tr", "rows => rows.map(r => r.querySelector('th').innerText)")
    assert rows[1:] == ["mandatory only", "+ circle", "+ square", "+ circle + square"]
    grid = images(page, "table.grid img")
    assert len(set(grid)) == 8  # every pack set and seed draws its own image
    packs = page.eval_on_selector_all("table.grid img", "els => els.map(e => e.dataset.packs)")
    assert packs == (["striped"] * 2 + ["circle,striped"] * 2 + ["square,striped"] * 2
                     + ["circle,square,striped"] * 2)
    assert page.inner_text("#progress-text") == "8 / 8 image(s)" and "done" in page.inner_text("#status")


def pct(x: float) -> str:
    return f"{int(x * 100 + 0.5)} %"  # the page's toFixed(0): halves round up


def test_red_team_records_are_shown_next_to_their_packs(browser, secured_server):
    """Each pack's red-team record in /packs renders next to it, worst family first, then every family's rate; a
    pack without one (here: square's record taken out of the real listing on its way to the page) shows none."""
    key = secured_server["keys"]["operator"]
    listing = httpx.get(secured_server["url"] + "/packs", headers={"Authorization": f"Bearer {key}"}).json()["packs"]
    assert all(p["redteam"] is not None for p in listing)  # every shipped pack carries its record
    page = browser.new_page()

    def without_square_record(route):
        response = route.fetch()
        if response.status != 200:  # the first call, before the key is entered: 401 as it is
            return route.fulfill(response=response)
        body = response.json()
        for p in body["packs"]:
            if p["name"] == "square":
                p["redteam"] = None
        route.fulfill(response=response, json=body)

    page.route("**/packs", without_square_record)
    page.goto(secured_server["url"] + "/")
    enter_key(page, key)
    assert "red-team" not in page.inner_text("#pack-square-meta")
    for p in listing:
        if p["name"] == "square":
            continue
        meta, record = page.inner_text(f"#pack-{p['name']}-meta"), p["redteam"]
        worst = (f"red-team: {pct(record['attack_success_rate'])} attack success ({record['attack']}), "
                 f"base {pct(record['base_rate'])}")
        assert worst in meta, (p["name"], meta)
        for family, rate in record["asr"].items():
            assert f"{family} {pct(rate)}" in meta, (p["name"], family, meta)
    page.close()
