"""Wall time of a catalogue trained one pack after another vs ``train-many`` on a local Ray, then the rerun.

    flock /work/helpers/heavy.lock python bench/train_many_bench.py [--catalogue registry/catalogues/toy.yaml]

1. sequential: ``train_pack`` for each entry in turn, in this process, torch on every core (what the old
   `make packs` did with four `erasure train` runs, less their start-ups), each pushed to a fresh registry;
2. train-many: ``train_many`` on a local Ray with ``--num-cpus`` CPUs, one pack per task on ``--cpus-per-pack``
   CPUs (torch threads = that), pushed to another fresh registry;
3. the rerun of 2: everything is published with the same config, nothing trains.
Prints one JSON object: seconds of each phase, per-pack seconds, statuses, and the quick-check figures.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--catalogue", default="registry/catalogues/toy.yaml")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count())
    p.add_argument("--cpus-per-pack", type=float, default=1)
    p.add_argument("--sequential-threads", type=int, default=None,
                   help="torch threads of the sequential phase (default: torch's, every core: as `erasure train`)")
    p.add_argument("--skip-sequential", action="store_true")
    args = p.parse_args()

    import torch

    from registry import open_registry
    from registry.catalogue import Catalogue
    from registry.train_many import RegistryAddress, train_many

    if args.sequential_threads:
        torch.set_num_threads(args.sequential_threads)
    cat = Catalogue.load(args.catalogue)
    work = Path(tempfile.mkdtemp(prefix="train-many-bench-", dir="build" if Path("build").is_dir() else None))
    report: dict = {"catalogue": args.catalogue, "packs": [j.name for j in cat.jobs], "cpus": os.cpu_count(),
                    "torch_threads_sequential": torch.get_num_threads(), "num_cpus_ray": args.num_cpus,
                    "cpus_per_pack": args.cpus_per_pack, "loadavg_start": os.getloadavg()}

    if not args.skip_sequential:
        from erasure.training.train import train_pack

        reg = open_registry(registry_dir=work / "registry-sequential")
        per_pack, start = {}, time.perf_counter()
        for job in cat.jobs:
            t = time.perf_counter()
            train_pack(job.base, job.config, work / "sequential" / job.name, name=job.name,
                       revision=job.base_revision, eval_samples=job.eval_samples, progress=False)
            reg.push(work / "sequential" / job.name, job.repo, tag=job.tag)
            per_pack[job.name] = round(time.perf_counter() - t, 1)
        report["sequential_seconds"] = round(time.perf_counter() - start, 1)
        report["sequential_per_pack_seconds"] = per_pack

    where = RegistryAddress.resolve(registry_dir=work / "registry-ray")
    result = train_many(cat, where, work_dir=work / "ray", num_cpus=args.num_cpus, cpus_per_pack=args.cpus_per_pack)
    report["train_many_seconds"] = result.seconds
    report["train_many_per_pack_seconds"] = {o.name: o.seconds for o in result.outcomes}
    report["train_many_status"] = {o.name: o.status for o in result.outcomes}
    report["train_many_figures"] = {o.name: o.figures or o.error for o in result.outcomes}
    rerun = train_many(cat, where, work_dir=work / "ray", num_cpus=args.num_cpus, cpus_per_pack=args.cpus_per_pack)
    report["rerun_seconds"] = rerun.seconds
    report["rerun_status"] = {o.name: o.status for o in rerun.outcomes}
    if "sequential_seconds" in report:
        report["speedup"] = round(report["sequential_seconds"] / report["train_many_seconds"], 2)
    report["loadavg_end"] = os.getloadavg()
    report["work"] = str(work)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
