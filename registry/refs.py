"""Repository ids, namespaces, tags and ``NS/NAME[@REV]`` specs, checked before anything reaches a registry."""

from __future__ import annotations

import re

from erasure.errors import InvalidArgumentError

SHA_RE = re.compile(r"^[0-9a-f]{40}$")
_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
REPO_RE = re.compile(rf"^{_PART}/{_PART}$")
NAMESPACE_RE = re.compile(rf"^{_PART}$")
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_repo_id(repo: str) -> str:
    if not REPO_RE.match(repo or "") or ".." in repo or repo.endswith((".git", ".")):
        raise InvalidArgumentError(f"repository {repo!r} is not of the form NAMESPACE/NAME (letters, digits, '.', "
                                   "'_', '-'), e.g. toy/circle")
    return repo


def check_namespace(namespace: str) -> str:
    if not NAMESPACE_RE.match(namespace or "") or ".." in namespace:
        raise InvalidArgumentError(f"namespace {namespace!r} is not a valid name (letters, digits, '.', '_', '-'); "
                                   "give only the part before the '/', e.g. toy")
    return namespace


def check_tag(tag: str) -> str:
    if not TAG_RE.match(tag or "") or SHA_RE.match(tag):
        raise InvalidArgumentError(f"tag {tag!r} must be letters, digits, '.', '_', '-' (and not a 40-hex sha), "
                                   "e.g. v1")
    return tag


def parse_spec(spec: str) -> tuple[str, str]:
    """``NS/NAME[@REV]`` -> (repo, revision); the revision defaults to ``main``."""
    repo, _, rev = spec.partition("@")
    check_repo_id(repo)
    if "@" in spec and not rev:
        raise InvalidArgumentError(f"{spec!r}: nothing after '@'; give a branch, a tag or a 40-hex commit sha")
    return repo, rev or "main"
