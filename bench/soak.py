"""Soak: a long run through a real `bentoml serve`, with the server's memory, open files and latency sampled
throughout. Prints JSON (and a line per sample on stderr).

    python bench/soak.py [--requests 10000] [--clients 16] [--steps 4] [--sample-every 30]

Clients send ``--requests`` requests, each naming one of 10 pack sets of the shipped lock (every subset a request can
name, mandatory none; the pack-set cache is smaller than that, so sets are evicted and composed again). Every
``--sample-every`` seconds: the serve process tree's RSS and open files (psutil), and p50 / p99 of the latencies
finished in that window. Growth is measured from the end of the first minute (warm-up: caches filling) to the end.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import itertools
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from service_helpers import free_port, serve, stop, wait_ready  # noqa: E402  (the tests' helpers)

PACK_SETS = [[], ["circle"], ["red"], ["striped"], ["square"], ["circle", "red"], ["circle", "striped"],
             ["red", "square"], ["circle", "red", "striped"], ["circle", "red", "square", "striped"]]


def pct(xs: list[float], q: float) -> float | None:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, round(q * (len(xs) - 1)))], 3) if xs else None


def tree_usage(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of the serve process and its workers."""
    import psutil

    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    rss, files = 0, 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            files += p.num_fds()  # files, sockets and pipes: what a leak would grow
        except psutil.Error:
            pass
    return rss / 2**20, files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sample-every", type=float, default=30.0)
    ap.add_argument("--pack-set-cache", type=int, default=4, help="the server's pack_set_cache (below 10: churn)")
    ap.add_argument("--torch-threads", type=int, default=2)
    args = ap.parse_args()

    import httpx
    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="soak-bench-"))
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({
        "lock": str(REPO / "service" / "packs.lock"), "device": "cpu", "torch_threads": args.torch_threads,
        "default_steps": args.steps, "pack_set_cache": args.pack_set_cache, "precompose": False,
        "limits": {"min_steps": 1, "max_size": 64, "min_size": 64}, "max_attack_success": None}))
    port, log = free_port(), tmp / "serve.log"
    proc = serve(config, tmp / "home", log, port)
    url = f"http://127.0.0.1:{port}"
    lock, latencies, statuses, samples = threading.Lock(), [], {}, []
    counter, done = itertools.count(), threading.Event()
    try:
        wait_ready(proc, url, log)
        rss, files = tree_usage(proc.pid)
        samples.append({"t_s": 0, "served": 0, "rss_mib": round(rss, 1), "open_files": files, "p50_s": None,
                        "p99_s": None})
        t0 = time.perf_counter()

        def client() -> None:
            with httpx.Client(timeout=300) as http:
                while (i := next(counter)) < args.requests:
                    start = time.perf_counter()
                    r = http.post(f"{url}/generate", json={"prompt": "a red circle", "seed": i,
                                                           "packs": PACK_SETS[i % len(PACK_SETS)]})
                    with lock:
                        latencies.append((time.perf_counter() - t0, time.perf_counter() - start))
                        statuses[r.status_code] = statuses.get(r.status_code, 0) + 1

        def sampler() -> None:
            last = 0.0
            while not done.wait(args.sample_every):
                now = time.perf_counter() - t0
                rss, files = tree_usage(proc.pid)
                with lock:
                    window = [s for t, s in latencies if last < t <= now]
                    served = len(latencies)
                sample = {"t_s": round(now), "served": served, "rss_mib": round(rss, 1), "open_files": files,
                          "p50_s": pct(window, 0.5), "p99_s": pct(window, 0.99)}
                samples.append(sample)
                print(json.dumps(sample), file=sys.stderr, flush=True)
                last = now

        watcher = threading.Thread(target=sampler, daemon=True)
        watcher.start()
        with cf.ThreadPoolExecutor(args.clients) as pool:
            for f in [pool.submit(client) for _ in range(args.clients)]:
                f.result()
        done.set()
        watcher.join()
        wall = time.perf_counter() - t0
        rss, files = tree_usage(proc.pid)
        samples.append({"t_s": round(wall), "served": len(latencies), "rss_mib": round(rss, 1),
                        "open_files": files, "p50_s": None, "p99_s": None})
    finally:
        stop(proc)
    warm = next((s for s in samples if s["t_s"] >= 60), samples[0])
    end = samples[-1]
    halves = [[s for t, s in latencies if (t <= wall / 2) == first] for first in (True, False)]
    print(json.dumps({
        "requests": len(latencies), "statuses": statuses, "wall_s": round(wall, 1),
        "requests_per_s": round(len(latencies) / wall, 2), "pack_sets": len(PACK_SETS),
        "pack_set_cache": args.pack_set_cache, "steps": args.steps, "clients": args.clients,
        "rss_mib": {"start": samples[0]["rss_mib"], "after_1_min": warm["rss_mib"], "end": end["rss_mib"]},
        "open_files": {"start": samples[0]["open_files"], "after_1_min": warm["open_files"],
                       "end": end["open_files"]},
        "latency_s": {"first_half": {"p50": pct(halves[0], 0.5), "p99": pct(halves[0], 0.99)},
                      "second_half": {"p50": pct(halves[1], 0.5), "p99": pct(halves[1], 0.99)}},
        "samples": samples,
    }, indent=2))


if __name__ == "__main__":
    main()
