"""Batched serving through `bentoml serve`, against the bare pipeline's batched ceiling. Prints JSON.

    python bench/batching_bench.py [--steps 20] [--torch-threads 2] [--concurrency 1 4 16] [--rounds 2]

Two real servers run side by side on the shipped toy base and lock (service/packs.lock: circle, red, striped esd-x;
square esd-u): one with `batching: true` (the default) and one with `batching: false` (the unbatched path: one
pipeline call per image, `threads` at a time). Clients are closed-loop threads posting /generate (one 64x64 image,
`--steps` DDIM steps, guidance 3). Figures:
- requests/s at each concurrency, all on one pack set (["circle"]), cycling 4 esd-x sets ([], [circle], [red],
  [circle, red, striped]) and cycling 4 sets one of which holds the esd-u pack ([circle, red, square]); rounds
  alternate the three so background load hits them alike;
- the bare pipeline's ceiling measured in this process in the same run (before and after the servers' runs, same
  torch threads): images/s of one pipeline call generating a batch as large as the concurrency;
- ratio = batched requests/s / ceiling; four_sets / one_set;
- p50/p95 latency at concurrency 1, batched vs unbatched server, requests alternated between them.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]
from service_helpers import free_port, serve, stop, wait_ready  # noqa: E402  (the tests' real-server helpers)

PROMPTS = ["a red circle", "a blue square", "a striped green star", "a dotted yellow triangle"]
ONE_SET = [["circle"]]
FOUR_SETS = [[], ["circle"], ["red"], ["circle", "red", "striped"]]  # esd-x packs only
FOUR_SETS_U = [[], ["circle"], ["red"], ["circle", "red", "square"]]  # one set holds the esd-u pack


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def start_server(config: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    return serve(config, config.parent / f"bentoml-{config.stem}", log, port), f"http://127.0.0.1:{port}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--torch-threads", type=int, default=2, help="torch threads of the servers and the ceiling")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests-per-client", type=int, default=3, help="requests each client sends per run "
                                                                        "(at least 12 per run)")
    ap.add_argument("--rounds", type=int, default=2, help="alternated rounds of (one set, four sets)")
    ap.add_argument("--latency-n", type=int, default=20, help="requests per server for the concurrency-1 latency")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-latency-ms", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=4, help="BentoML threads of the unbatched server")
    args = ap.parse_args()

    import httpx
    import torch
    import yaml

    torch.set_num_threads(args.torch_threads)
    from erasure.base.loading import load_pipeline

    tmp = Path(tempfile.mkdtemp(prefix="batching-bench-"))
    common = {"lock": str(REPO / "service" / "packs.lock"), "device": "cpu", "torch_threads": args.torch_threads,
              "default_steps": args.steps}
    configs = {"batched": {**common, "batching": True, "max_batch_size": args.max_batch_size,
                           "max_latency_ms": args.max_latency_ms},
               "unbatched": {**common, "batching": False, "threads": args.threads}}
    servers = {}
    for name, cfg in configs.items():
        path = tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        servers[name] = start_server(path, tmp / f"{name}.log")
    try:
        for name, (proc, url) in servers.items():
            wait_ready(proc, url, tmp / f"{name}.log")
        pipe = load_pipeline("toy")

        def ceiling(batch: int) -> float:
            gens = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
            t = time.perf_counter()
            with torch.inference_mode():
                pipe(prompt=[PROMPTS[i % 4] for i in range(batch)], num_inference_steps=args.steps,
                     guidance_scale=3.0, height=64, width=64, generator=gens, output_type="pil")
            return batch / (time.perf_counter() - t)

        local = __import__("threading").local()

        def post(url: str, i: int, packs: list[str]) -> float:
            client = getattr(local, "client", None)
            if client is None:
                client = local.client = httpx.Client(timeout=600)
            t = time.perf_counter()
            r = client.post(f"{url}/generate", json={"prompt": PROMPTS[i % 4], "packs": packs, "seed": i,
                                                     "steps": args.steps})
            if r.status_code != 200:
                raise SystemExit(f"{url}: {r.status_code} {r.text[:500]}")
            return time.perf_counter() - t

        def load(url: str, concurrency: int, sets: list[list[str]]) -> dict:
            n = max(12, concurrency * args.requests_per_client)
            plan = [(i, sets[i % len(sets)]) for i in range(n)]
            t = time.perf_counter()
            with cf.ThreadPoolExecutor(concurrency) as pool:
                lat = list(pool.map(lambda a: post(url, *a), plan))
            return {"rps": n / (time.perf_counter() - t), "lat": lat}

        batched, unbatched = servers["batched"][1], servers["unbatched"][1]
        for url in (batched, unbatched):  # warm-up: first calls, every pack set composed
            for i, packs in enumerate(FOUR_SETS + FOUR_SETS_U[-1:]):
                post(url, i, packs)
        ceiling(max(args.concurrency))  # warm-up: first-call costs of the in-process pipeline
        before = {c: ceiling(c) for c in args.concurrency}

        runs: dict[int, dict[str, list]] = {c: {"one": [], "four": [], "four_u": []} for c in args.concurrency}
        for _ in range(args.rounds):
            for c in args.concurrency:
                runs[c]["one"].append(load(batched, c, ONE_SET))
                runs[c]["four"].append(load(batched, c, FOUR_SETS))
                runs[c]["four_u"].append(load(batched, c, FOUR_SETS_U))
        top = max(args.concurrency)
        today = [load(unbatched, top, ONE_SET) for _ in range(args.rounds)]

        lat: dict[str, list[float]] = {"batched": [], "unbatched": []}
        for i in range(args.latency_n):  # concurrency 1, alternating servers
            for name, url in (("batched", batched), ("unbatched", unbatched)):
                lat[name].append(post(url, 10_000 + i, ["circle"]))
        after = {c: ceiling(c) for c in args.concurrency}
        metrics = httpx.get(f"{batched}/metrics").text
    finally:
        for proc, _ in servers.values():
            stop(proc)

    def mean_rps(rs: list[dict]) -> float:
        return statistics.mean(r["rps"] for r in rs)

    throughput = {}
    for c in args.concurrency:
        ceil = (before[c] + after[c]) / 2
        one, four, four_u = (mean_rps(runs[c][k]) for k in ("one", "four", "four_u"))
        throughput[str(c)] = {
            "bare_ceiling_img_s": round(ceil, 3), "ceiling_before_after": [round(before[c], 3), round(after[c], 3)],
            "one_set_rps": round(one, 3), "four_sets_rps": round(four, 3), "four_sets_esd_u_rps": round(four_u, 3),
            "one_set_vs_ceiling": round(one / ceil, 3), "four_sets_vs_one_set": round(four / one, 3),
            "four_sets_esd_u_vs_one_set": round(four_u / one, 3),
            "runs_rps": {k: [round(r["rps"], 3) for r in v] for k, v in runs[c].items()},
            "one_set_latency_p50_ms": round(1000 * pct([x for r in runs[c]["one"] for x in r["lat"]], 0.5), 1),
        }
    sums = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
            if line.startswith(("erasure_batch_images_sum", "erasure_batch_images_count"))}
    out = {
        "mode": "bentoml serve (two servers: batching true / false), httpx clients in this process",
        "packs": "service/packs.lock (circle, red, striped: esd-x; square: esd-u)", "steps": args.steps,
        "size": 64, "torch_threads": args.torch_threads, "max_batch_size": args.max_batch_size,
        "max_latency_ms": args.max_latency_ms, "unbatched_threads": args.threads,
        "cpus": os.cpu_count(), "machine": platform.machine(),
        "throughput": throughput,
        "unbatched_at_top_concurrency": {"concurrency": top, "one_set_rps": round(mean_rps(today), 3),
                                         "vs_ceiling": round(mean_rps(today) / ((before[top] + after[top]) / 2), 3)},
        "latency_c1": {k: {"p50_ms": round(1000 * pct(v, 0.5), 1), "p95_ms": round(1000 * pct(v, 0.95), 1),
                           "n": len(v)} for k, v in lat.items()},
        "latency_c1_p50_ratio": round(pct(lat["batched"], 0.5) / pct(lat["unbatched"], 0.5), 3),
        "mean_images_per_unet_step": round(sums.get("erasure_batch_images_sum", 0) /
                                           max(1, sums.get("erasure_batch_images_count", 0)), 2),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
