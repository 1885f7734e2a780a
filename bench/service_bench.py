"""Benchmark of the BentoML service, printed as JSON. In-process: the ASGI app (``ErasureService.to_asgi()``)
driven by starlette's TestClient, so the figures include BentoML's request handling but no network or process hop.

    python bench/service_bench.py [--n 20] [--steps 20] [--torch-threads 1]      (make bench-service)

Packs: the lock of service/config.yaml if it exists, else four random esd-x packs built against the toy base
(tests/service_helpers.py; random deltas cost exactly what trained ones do). Figures:
- latency p50/p95 of POST /generate with 0, 1 and 3 packs, and of the bare pipeline called in-process; the "model
  part" ratio compares the service's generation path (fresh pipeline + pack-set UNet, no HTTP) with the bare call
  (goal <= 1.02); conditions are interleaved round-robin so load from other processes hits them alike;
- throughput (requests/s, `--concurrency` client threads) cycling through 4 pack sets vs all on one (goal >= 0.95x);
- pack-switch cost: the first request on an uncached pack set minus a cached one, and the compose time alone;
- memory: bytes of each pack-set UNet's own tensors (the rest is shared with the base).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import importlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def summary(xs: list[float]) -> dict:
    return {"p50_ms": round(1000 * pct(xs, 0.5), 1), "p95_ms": round(1000 * pct(xs, 0.95), 1), "n": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20, help="timed requests per latency condition")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=4, help="client threads in the throughput runs")
    ap.add_argument("--requests", type=int, default=32, help="requests per throughput run")
    ap.add_argument("--config", help="service config (default: service/config.yaml if its lock exists)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.torch_threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from service.config import ServiceConfig

    config_path = args.config
    if config_path is None:
        default = ServiceConfig.load(env={})
        lock = default.resolve_path(default.lock)
        if lock and lock.is_file():
            config_path, packs_from = str(default.source_path), str(lock)
        else:
            from erasure.base.loading import load_pipeline

            from service_helpers import make_world, write_config

            tmp = Path(tempfile.mkdtemp(prefix="service-bench-"))
            lock = make_world(tmp, load_pipeline("toy").unet)
            config_path, packs_from = str(write_config(tmp / "config.yaml", lock)), "random esd-x test packs"
    else:
        packs_from = args.config
    os.environ["ERASURE_SERVICE_CONFIG"] = config_path
    os.environ["ERASURE_SERVICE_TORCH_THREADS"] = str(args.torch_threads)
    os.environ["ERASURE_SERVICE_PRECOMPOSE"] = "true"
    svc_mod = importlib.import_module("service.service")
    from starlette.testclient import TestClient

    t0 = time.perf_counter()
    with TestClient(app=svc_mod.ErasureService.to_asgi()) as client:
        svc = svc_mod._current["svc"]
        if not svc.wait_ready():
            raise SystemExit(f"the service refused to start: {svc.refusal}")
        startup = time.perf_counter() - t0
        rt = svc.runtime
        names = sorted(n for n in rt.packs if n not in rt.mandatory)
        if len(names) < 3:
            raise SystemExit(f"the bench needs 3 optional packs, the config loads {names}")
        conds = {"0_packs": [], "1_pack": names[:1], "3_packs": names[:3]}
        prompt, guidance = "a red circle", 3.0
        base = rt.pipe

        def bare(seed):
            base(prompt=[prompt], num_inference_steps=args.steps, guidance_scale=guidance, output_type="pil",
                 height=rt.native_size, width=rt.native_size, generator=torch.Generator("cpu").manual_seed(seed))

        def model(packs, seed):
            rt.generate(rt.pack_set(packs), prompt, None, args.steps, guidance, rt.native_size, rt.native_size,
                        [seed])

        def http(packs, seed):
            r = client.post("/generate", json={"prompt": prompt, "packs": packs, "seed": seed, "steps": args.steps})
            assert r.status_code == 200, r.text

        for packs in conds.values():  # warm-up; builds the 3-pack set
            http(packs, 0)
        bare(0)
        times: dict[str, list[float]] = {"bare": []}
        times.update({f"model_{k}": [] for k in conds})
        times.update({f"http_{k}": [] for k in conds})
        for i in range(args.n):  # round-robin: every condition sees the same background load
            for key, fn in [("bare", lambda: bare(i))] + \
                           [(f"model_{k}", lambda p=p: model(p, i)) for k, p in conds.items()] + \
                           [(f"http_{k}", lambda p=p: http(p, i)) for k, p in conds.items()]:
                t = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - t)
        bare_p50 = pct(times["bare"], 0.5)
        latency = {k: summary(v) for k, v in times.items()}
        ratios = {k: round(pct(times[f"model_{k}"], 0.5) / bare_p50, 3) for k in conds}

        sets = [[], names[:1], names[1:2], names[:3]]

        def run(plan):
            t = time.perf_counter()
            with cf.ThreadPoolExecutor(args.concurrency) as pool:
                list(pool.map(lambda a: http(*a), plan))
            return len(plan) / (time.perf_counter() - t)

        one = [(names[:1], i) for i in range(args.requests)]
        cyc = [(sets[i % 4], i) for i in range(args.requests)]
        tp_one, tp_cyc = [], []
        for _ in range(2):  # alternate to even out background load
            tp_one.append(run(one))
            tp_cyc.append(run(cyc))
        thr = {"one_set_rps": round(statistics.mean(tp_one), 3), "four_sets_rps": round(statistics.mean(tp_cyc), 3)}
        thr["ratio"] = round(thr["four_sets_rps"] / thr["one_set_rps"], 3)

        # pack-switch cost: first request on a set nobody asked for yet (built on demand, then cached)
        fresh = [list(c) for c in ([names[0], names[1]], [names[0], names[2]], [names[1], names[2]])]
        first, again = [], []
        for packs in fresh:
            t = time.perf_counter()
            http(packs, 0)
            first.append(time.perf_counter() - t)
            t = time.perf_counter()
            http(packs, 0)
            again.append(time.perf_counter() - t)
        stats = rt.cache.stats()
        compose = [s["build_seconds"] for s in stats if s["packs"] and len(s["packs"]) == 2]
        out = {
            "mode": "in-process ASGI (ErasureService.to_asgi() + starlette TestClient)",
            "packs_from": packs_from, "steps": args.steps, "size": rt.native_size, "device": rt.device,
            "torch_threads": torch.get_num_threads(), "service_threads": svc.config.threads,
            "startup_seconds": round(startup, 2), "precompose_seconds": round(rt.precompose_seconds, 3),
            "latency": latency,
            "model_part_ratio_vs_bare": ratios, "model_part_goal": "<= 1.02",
            "throughput": thr, "throughput_goal": ">= 0.95",
            "pack_switch": {"first_request_ms": [round(1000 * x, 1) for x in first],
                            "cached_request_ms": [round(1000 * x, 1) for x in again],
                            "extra_ms_p50": round(1000 * statistics.median(f - a for f, a in zip(first, again)), 1),
                            "compose_ms": [round(1000 * x, 1) for x in compose]},
            "memory": {"base_denoiser_bytes": sum(p.numel() * p.element_size() for p in rt.pipe.unet.parameters()),
                       "pack_sets": [{"packs": s["packs"], "extra_bytes": s["extra_bytes"]} for s in stats]},
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
