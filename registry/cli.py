"""``erasure push | pull | list | lock``: the registry commands, added to the ``erasure`` CLI through the
``erasure.cli`` entry point (pyproject.toml), so erasure/ never imports registry/.

Every command runs against ``--endpoint URL`` (a Hub), ``--registry DIR`` (a local registry), else ``HF_ENDPOINT``
if set, else the shipped local registry. User errors are ``ErasureError``s, printed by ``erasure`` as one line.
"""

from __future__ import annotations

from pathlib import Path


def _registry(args):
    from . import open_registry

    return open_registry(endpoint=args.endpoint, registry_dir=args.registry)


def _base(base: str | None):
    if not base:
        return None
    from erasure.pack import BaseWeights
    from erasure.pipeline import load_pipeline

    return BaseWeights(load_pipeline(base).unet)


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
    pulled = reg.pull(repo, revision, to=Path(args.to) if args.to else None, base=_base(args.base))
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
    base = _base(args.base)
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
    p.add_argument("--base", default=None,
                   help="refuse the pack unless it fits this base ('toy', a pipeline directory or a Hub id)")
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
    p.add_argument("--base", default=None, help="refuse packs that do not fit this base")
    add_where(p)
    p.set_defaults(func=cmd_lock)
