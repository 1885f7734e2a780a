"""Overload and fail-closed, through a real `bentoml serve`. Prints JSON.

    python bench/overload.py [--clients 160] [--requests-per-client 10] [--deadline 30] [--steps 8]

1. Burst: ``--clients`` concurrent clients (default 10 x max_batch_size) each send ``--requests-per-client`` requests
   to the shipped toy service with a ``deadline``; every answer must be 200, 429 or 503 with Retry-After. Figures:
   the count of each status, p50 / p99 latency of the 200s (the deadline bounds them), of the 503s (shed at
   admission: immediate), the Retry-After values, and the queue bound.
2. Fail closed: `ERASURE_SERVICE_MANDATORY=red bentoml serve .` (red's record is above max_attack_success): its exit
   status, the seconds until it exited, and its last line.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from service_helpers import BENTOML, free_port, serve, stop, wait_ready  # noqa: E402  (the tests' helpers)


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, round(q * (len(xs) - 1)))], 3) if xs else None


def burst(args) -> dict:
    import httpx
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="overload-bench-"))
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "lock": str(REPO / "service" / "packs.lock"), "device": "cpu", "torch_threads": args.torch_threads,
        "default_steps": args.steps, "max_batch_size": args.max_batch_size, "deadline": args.deadline,
        "limits": {"min_steps": 1, "max_size": 64, "min_size": 64}, "max_attack_success": None}))
    port, log = free_port(), tmp / "serve.log"
    proc = serve(config, tmp / "home", log, port)
    url = f"http://127.0.0.1:{port}"
    results: list[tuple[int, float, dict]] = []
    try:
        wait_ready(proc, url, log)
        packs = [[], ["circle"], ["striped"], ["circle", "square"]]

        def client(i: int) -> list[tuple[int, float, dict]]:
            out = []
            with httpx.Client(timeout=args.deadline + 60) as http:
                for j in range(args.requests_per_client):
                    t0 = time.perf_counter()
                    r = http.post(f"{url}/generate", json={"prompt": "a red circle", "seed": 1000 * i + j,
                                                           "packs": packs[(i + j) % len(packs)]})
                    out.append((r.status_code, time.perf_counter() - t0, dict(r.headers)))
            return out

        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.clients) as pool:
            for part in pool.map(client, range(args.clients)):
                results += part
        wall = time.perf_counter() - t0
    finally:
        stop(proc)
    codes = collections.Counter(code for code, _, _ in results)
    ok = [s for code, s, _ in results if code == 200]
    shed = [s for code, s, _ in results if code == 503]
    retry = [int(h.get("retry-after", 0)) for code, _, h in results if code == 503]
    return {
        "clients": args.clients, "requests": len(results), "wall_s": round(wall, 1), "statuses": dict(codes),
        "only_200_429_503": set(codes) <= {200, 429, 503},
        "every_503_has_retry_after": all(h.get("retry-after") and h.get("retry-after-ms")
                                         for code, _, h in results if code == 503),
        "deadline_s": args.deadline, "ok_latency_s": {"p50": pct(ok, 0.5), "p99": pct(ok, 0.99), "max": pct(ok, 1)},
        "shed_latency_s": {"p50": pct(shed, 0.5), "p99": pct(shed, 0.99)},
        "retry_after_s": {"min": min(retry, default=None), "max": max(retry, default=None)},
        "served_per_s": round(len(ok) / wall, 2),
        "queue_bound_images": 4 * args.max_batch_size,
    }


def fail_closed() -> dict:
    env = {**os.environ, "ERASURE_SERVICE_MANDATORY": "red", "BENTOML_DO_NOT_TRACK": "True",
           "BENTOML_HOME": tempfile.mkdtemp(prefix="overload-bench-home-")}
    env.pop("ERASURE_SERVICE_CONFIG", None)
    t0 = time.perf_counter()
    r = subprocess.run([BENTOML, "serve", ".", "--port", str(free_port()), "--host", "127.0.0.1"], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=300)
    return {"command": "ERASURE_SERVICE_MANDATORY=red bentoml serve .", "exit_status": r.returncode,
            "seconds": round(time.perf_counter() - t0, 1),
            "last_line": (r.stdout + r.stderr).strip().splitlines()[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (default 10 x max batch size)")
    ap.add_argument("--requests-per-client", type=int, default=10)
    ap.add_argument("--deadline", type=float, default=30.0, help="the service's `deadline`, seconds")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--torch-threads", type=int, default=2)
    args = ap.parse_args()
    args.clients = args.clients or 10 * args.max_batch_size
    print(json.dumps({"fail_closed": fail_closed(), "burst": burst(args)}, indent=2))


if __name__ == "__main__":
    main()
