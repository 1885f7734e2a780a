"""Pack-set cache hits behind a gateway: round-robin vs routing on the pack set, two local replicas.

    flock /work/helpers/heavy.lock python bench/pack_set_routing.py [--requests 120] [--sets 6] [--cache 3]

Two `bentoml serve` replicas of the service (one worker each, the shipped toy packs of service/packs.lock, no
precomposed sets, ``pack_set_cache`` = ``--cache``) and this script as the gateway. Requests draw one of ``--sets``
pack sets at random (seeded) and go to a replica either round-robin or by a hash of the pack set (what a gateway
does with the ``X-Erasure-Pack-Set`` header: docs/scale-out.md). A miss is a request whose replica had to compose
its pack set (``X-Erasure-Pack-Set-Built: true``). Prints JSON: hit rate, latency of hits and misses, wall time.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from service_helpers import free_port, serve, stop, wait_ready  # noqa: E402  (the tests' real-server helpers)

PACKS = ["circle", "red", "striped", "square"]


def pack_set_key(packs: list[str]) -> str:
    """What a client puts in X-Erasure-Pack-Set: the requested packs, sorted, comma-separated."""
    return ",".join(sorted(packs))


def by_hash(key: str, n: int) -> int:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % n


def run(urls: list[str], sets: list[list[str]], order: list[int], policy: str, steps: int) -> dict:
    rr = itertools.cycle(range(len(urls)))
    rows = []
    start = time.perf_counter()
    for i in order:
        packs = sets[i]
        key = pack_set_key(packs)
        replica = next(rr) if policy == "round-robin" else by_hash(key, len(urls))
        t = time.perf_counter()
        r = httpx.post(f"{urls[replica]}/generate", json={"prompt": "a red circle", "packs": packs, "seed": 0,
                                                         "steps": steps},
                       headers={"X-Erasure-Pack-Set": key}, timeout=300)
        r.raise_for_status()
        rows.append({"replica": replica, "set": key, "miss": r.headers["x-erasure-pack-set-built"] == "true",
                     "seconds": time.perf_counter() - t})
    wall = time.perf_counter() - start
    hits = [r["seconds"] for r in rows if not r["miss"]]
    misses = [r["seconds"] for r in rows if r["miss"]]
    return {
        "requests": len(rows), "hit_rate": round(len(hits) / len(rows), 3), "misses": len(misses),
        "p50_hit_ms": round(statistics.median(hits) * 1000, 1) if hits else None,
        "p50_miss_ms": round(statistics.median(misses) * 1000, 1) if misses else None,
        "mean_ms": round(statistics.mean(r["seconds"] for r in rows) * 1000, 1), "wall_seconds": round(wall, 1),
        "sets_per_replica": {str(k): sorted({r["set"] for r in rows if r["replica"] == k}) for k in range(len(urls))},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--sets", type=int, default=6, help="distinct pack sets requested")
    p.add_argument("--cache", type=int, default=3, help="pack_set_cache of each replica")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    all_sets = [list(c) for k in (1, 2, 3) for c in itertools.combinations(PACKS, k)]
    rng = random.Random(args.seed)
    sets = rng.sample(all_sets, args.sets)
    order = [rng.randrange(len(sets)) for _ in range(args.requests)]
    work = Path(tempfile.mkdtemp(prefix="routing-bench-"))
    report = {"sets": [pack_set_key(s) for s in sets], "cache_per_replica": args.cache, "steps": args.steps,
              "loadavg_start": os.getloadavg()}
    for policy in ("round-robin", "pack-set-hash"):  # fresh replicas for each policy: cold caches alike
        procs, urls = [], []
        try:
            for k in range(2):
                config = work / f"{policy}-{k}.yaml"
                config.write_text(yaml.safe_dump({
                    "lock": str(REPO / "service" / "packs.lock"), "device": "cpu", "threads": 1, "workers": 1,
                    "precompose": False, "pack_set_cache": args.cache, "torch_threads": 1}))
                port = free_port()
                procs.append(serve(config, work / f"home-{policy}-{k}", work / f"{policy}-{k}.log", port))
                urls.append(f"http://127.0.0.1:{port}")
            for k, (proc, url) in enumerate(zip(procs, urls)):
                wait_ready(proc, url, work / f"{policy}-{k}.log")
            report[policy] = run(urls, sets, order, policy, args.steps)
        finally:
            for proc in procs:
                stop(proc)
    report["loadavg_end"] = os.getloadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
