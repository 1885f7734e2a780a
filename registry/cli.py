"""``erasure push | pull | list | lock | train-many``: the registry commands, added to the ``erasure`` CLI through the
``erasure.cli`` entry point (pyproject.toml), so erasure/ never imports registry/.

Every command runs against ``--endpoint URL`` (a Hub), ``--registry DIR`` (a local registry), else ``HF_ENDPOINT``
if set, else the shipped local registry. User errors are ``ErasureError``s, printed by ``erasure`` as one line.
"""

from __future__ import annotations

from pathlib import Path


def _registry(args):
    from . import open_registry

    return open_registry(endpoint=args.endpoint, registry_dir=args.registry)


def _base(args):
    if not args.base:
        return None
    import torch

    from erasure.base.loading import load_base
    from erasure.pack.concept_pack import BaseWeights

    return BaseWeights(load_base(args.base, dtype=getattr(torch, args.base_dtype)).denoiser)


def add_base_check(p) -> None:
    p.add_argument("--base", default=None,
                   help="refuse the pack unless it fits this base ('toy', a pipeline directory or a Hub id)")
    p.add_argument("--base-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype to load --base in: the one the packs were trained on (default float32)")


def cmd_push(args) -> None:
    reg = _registry(args)
    result = reg.push(Path(args.pack_dir), args.repo, tag=args.tag, private=args.private)
    print(f"pushed {result.repo}" + (f" (tag {result.tag})" if result.tag else "") + f": commit {result.commit_sha}")
    print(result.url)


def cmd_pull(args) -> None:
    from .refs import parse_spec

    repo, revision = parse_spec(args.spec)
    lock = None
    if args.lock:
        from .lock import LockFile

        lock = LockFile.load(args.lock, missing_ok=True)  # a malformed lock fails before any download
    reg = _registry(args)
    pulled = reg.pull(repo, revision, to=Path(args.to) if args.to else None, base=_base(args))
    print(f"{pulled.repo}@{pulled.commit_sha}")
    print(f"verified {len(pulled.files)} files (sha256 against the manifest and the registry)"
          + (f"; wrote {pulled.path}" if args.to else f"; at {pulled.path}"))
    if lock is not None:
        name = args.name or pulled.pack.name
        lock.add(name, pulled, reg.source)
        print(f"locked {name} -> {pulled.repo}@{pulled.commit_sha[:12]} in {lock.save()}")


def cmd_list(args) -> None:
    from .refs import check_namespace

    check_namespace(args.namespace)
    reg = _registry(args)
    packs = reg.list(args.namespace)
    if not packs:
        print(f"no packs in {args.namespace} at {reg.source}")
        return
    rows = [("REPO", "CONCEPTS", "METHOD", "BASE", "LATEST")]
    for p in packs:
        rows.append((p.repo, ",".join(p.concepts) or "?", p.method, p.base,
                     p.latest_sha[:12] + (f" ({p.latest_tag})" if p.latest_tag else "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def cmd_lock(args) -> None:
    from erasure.errors import InvalidArgumentError

    from .lock import LockFile
    from .refs import parse_spec

    specs = [parse_spec(s) for s in args.specs]
    lock = LockFile.load(args.lock, missing_ok=True)
    reg = _registry(args)
    base = _base(args)
    seen: dict[str, str] = {}
    for repo, revision in specs:
        pulled = reg.pull(repo, revision, base=base)  # into the cache, verified
        name = pulled.pack.name
        if name in seen and seen[name] != repo:
            raise InvalidArgumentError(f"{seen[name]} and {repo} are both packs named {name!r}; lock them "
                                       "separately with `erasure pull ... --lock --name OTHER`")
        seen[name] = repo
        lock.add(name, pulled, reg.source)
        print(f"{name}: {repo}@{pulled.commit_sha}")
    print(f"wrote {lock.save()}")


def cmd_train_many(args) -> None:
    from .catalogue import Catalogue
    from .errors import TrainManyError
    from .train_many import RegistryAddress, require_ray, train_many

    require_ray(local=args.ray is None)  # before any work: say what to install
    catalogue = Catalogue.load(args.catalogue)
    where = RegistryAddress.resolve(args.endpoint, args.registry)
    lock = None
    if args.lock:
        from .lock import LockFile

        lock = LockFile.load(args.lock, missing_ok=True)  # a malformed lock fails before any training
    result = train_many(catalogue, where, work_dir=args.work, ray_address=args.ray, num_cpus=args.num_cpus,
                        cpus_per_pack=args.cpus_per_pack, gpus_per_pack=args.gpus_per_pack)
    counts = {s: len(result.by_status(s)) for s in ("published", "skipped", "failed")}
    print(f"train-many {args.catalogue}: {counts['published']} published, {counts['skipped']} already published "
          f"with the same config, {counts['failed']} failed, in {result.seconds:.0f} s")
    for o in result.outcomes:
        line = f"  {o.name}: {o.status}"
        if o.status == "failed":
            line += f": {o.error}"
        else:
            line += f" {o.target} {o.commit_sha}" + (f" ({o.figures})" if o.figures else "")
        print(line)
    if result.failed:
        raise TrainManyError(f"{len(result.failed)} of {len(result.outcomes)} packs failed: "
                             f"{', '.join(o.name for o in result.failed)} (each with its error above)"
                             + (f"; {args.lock} not written" if lock is not None else ""))
    if lock is not None:
        reg = where.open()
        unlocked = {job.name for job in catalogue.jobs if not job.lock}
        for o in result.outcomes:
            if o.name in unlocked:  # `lock: false`: published for its figures, not served
                lock.entries.pop(o.name, None)
                continue
            repo = o.target.rpartition("@")[0]
            lock.add(o.name, reg.pull(repo, o.commit_sha), reg.source)  # verified again on the way in
        print(f"wrote {lock.save()}")


def add_commands(sub, parser_class) -> None:
    def add_where(p):
        g = p.add_mutually_exclusive_group()
        g.add_argument("--endpoint", default=None, metavar="URL",
                       help="a Hub endpoint (overrides HF_ENDPOINT), e.g. https://huggingface.co")
        g.add_argument("--registry", default=None, metavar="DIR",
                       help="a local registry directory (default: HF_ENDPOINT if set, else the shipped toy registry)")

    p = sub.add_parser("push", help="publish a pack as one atomic commit (Hub or local registry)")
    p.add_argument("pack_dir", metavar="PACK_DIR")
    p.add_argument("--repo", required=True, metavar="NS/NAME", help="repository, e.g. toy/circle")
    p.add_argument("--tag", default=None, help="tag the commit (tags are immutable), e.g. v1")
    p.add_argument("--private", action="store_true", help="create the Hub repository private")
    add_where(p)
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("pull", help="download a pack pinned to a commit sha and verify every file")
    p.add_argument("spec", metavar="NS/NAME[@REV]", help="REV: a branch, tag or 40-hex sha (default main)")
    p.add_argument("--to", default=None, metavar="DIR",
                   help="write the verified pack here (else: print its cache path)")
    add_base_check(p)
    p.add_argument("--lock", default=None, metavar="FILE", help="record the pinned pack in this lock file (packs.lock)")
    p.add_argument("--name", default=None, help="name of the pack in the lock (default: the manifest's name)")
    add_where(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("list", help="the packs in a namespace: concepts, method, base, latest version")
    p.add_argument("namespace", metavar="NS")
    add_where(p)
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("lock", help="resolve packs to commit shas, verify them, and write packs.lock")
    p.add_argument("specs", nargs="+", metavar="NS/NAME[@REV]")
    p.add_argument("--lock", default="packs.lock", metavar="FILE", help="lock file to write (default packs.lock)")
    add_base_check(p)
    add_where(p)
    p.set_defaults(func=cmd_lock)

    p = sub.add_parser("train-many", help="train a catalogue of packs as Ray tasks; publish each that passes its check",
                       description="Train every pack of a catalogue (registry/catalogue.py describes the YAML) as "
                                   "one Ray task each, and publish each pack that passes its quick erasure check. "
                                   "Packs already published with the same config are skipped; one failed pack "
                                   "does not stop the others. Needs Ray: pip install 'erasure[ray]'.")
    p.add_argument("catalogue", metavar="CATALOGUE.yaml", help="e.g. registry/catalogues/toy.yaml")
    p.add_argument("--ray", default=None, metavar="ADDRESS",
                   help="a running Ray cluster (e.g. auto, ray://head:10001); default: start a local one")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all of them)")
    p.add_argument("--cpus-per-pack", type=float, default=1, help="CPUs each pack's task takes (default 1)")
    p.add_argument("--gpus-per-pack", type=float, default=None,
                   help="GPUs each pack's task takes; default: 1 when the cluster has GPUs (trains on cuda), else 0")
    p.add_argument("--work", default="build/train-many", metavar="DIR",
                   help="where each pack trains and checkpoints, in DIR/NAME; a rerun resumes there "
                        "(default build/train-many)")
    p.add_argument("--lock", default=None, metavar="FILE",
                   help="when every pack is published, lock them all in this file (e.g. service/packs.lock)")
    add_where(p)
    p.set_defaults(func=cmd_train_many)
