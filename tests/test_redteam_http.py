"""Each shipped pack mandatory in a real `bentoml serve`, attacked through every request field (bench/redteam_http.py):
the concept stays rare and nothing but a documented 400 is refused. Slow: a server per pack, ~50 requests each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="the shipped v3 packs do not hold under attack yet (docs/robustness.md): a "
                   "mandatory one is refused at start-up; remove this mark when a robust pack holds")
@pytest.mark.parametrize("pack", ["circle", "red", "striped", "square"])
def test_a_mandatory_shipped_pack_holds_against_every_request_field(pack, tmp_path):
    out = tmp_path / "http.json"
    run = subprocess.run([sys.executable, str(REPO / "bench" / "redteam_http.py"), "--packs", pack, "--seeds", "2",
                          "--json", str(out)], cwd=REPO, capture_output=True, text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())["packs"][pack]
    assert figures["redteam"] is not None  # the shipped packs carry their red-team record (or it would not start)
    assert all(r["status"] == 400 for r in figures["refused"]), figures["refused"]
    assert figures["overall_rate"] <= 0.10, (figures["overall_rate"], figures["worst"])
