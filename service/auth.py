"""Access control for the service: API keys, ``Authorization: Bearer``, a per-key rate limit.

Keys are random tokens; the service only ever holds their sha256 (a keys file line or ``$ERASURE_API_KEYS``), so a
leaked config reveals no key, and no log line ever contains one (denials log the route and the client address,
accepted requests the key's *name*). With ``auth.enabled`` every route needs a key except the probes (``/livez``,
``/readyz``, ``/healthz``), ``/metrics`` unless ``auth.protect_metrics``, and the page's static shell (``/``,
``/page/*``, ``/docs``, ``/static_content/*``: they hold no data; what the page shows comes through the APIs with
the key the operator types in). No key: 401; a key that is not listed: 403; over the key's rate: 429 + Retry-After.

    python -m service.auth new-key alice        # prints a new key (once) and the line for the keys file

A keys file (``auth.keys_file``), one key per line, ``#`` starts a comment::

    alice   sha256:5f7c...e1
    batch   sha256:09ab...77  rate_limit=600     # generate requests per minute for this key (0: unlimited)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import hmac
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from erasure.errors import InvalidArgumentError

from .config import Auth
from .contract import error_response

logger = logging.getLogger("erasure.service.auth")

KEYS_ENV = "ERASURE_API_KEYS"  # more key lines (newline- or comma-separated), same format as the keys file
KEY_PREFIX = "erk_"
OPEN_PATHS = frozenset({"/", "/docs", "/livez", "/readyz", "/healthz"})
OPEN_PREFIXES = ("/page/", "/static_content/")
RATE_LIMITED = frozenset({"/generate", "/generate_json"})  # the routes that cost compute
_LINE = re.compile(r"^(?P<name>[A-Za-z0-9_.@-]+)\s+sha256:(?P<digest>[0-9a-f]{64})(?:\s+rate_limit=(?P<rate>\d+))?$")


class KeysError(InvalidArgumentError):
    """The API keys cannot be loaded (bad line, duplicate name, nothing configured); the service will not start."""


def new_key() -> str:
    """A fresh API key, e.g. ``erk_3q2...`` (256 random bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """What the service stores for ``key``: ``sha256:<hex>``. Keys are random, so a plain sha256 cannot be inverted."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class ApiKey:
    name: str  # shown in logs instead of the key
    digest: str  # sha256 hex of the key
    rate_limit: int | None = None  # generate requests per minute; None: auth.rate_limit


class ApiKeys:
    """The accepted keys, by sha256. ``ApiKeys.load(config.auth, home)`` reads the keys file and ``$ERASURE_API_KEYS``.

    >>> keys = ApiKeys.parse("alice " + hash_key("erk_x"), "example")
    >>> keys.match("erk_x").name, keys.match("erk_y")
    ('alice', None)
    """

    def __init__(self, keys: list[ApiKey]):
        names = [k.name for k in keys]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise KeysError(f"API key name(s) {dup} listed more than once; give each key its own name")
        self.keys = keys

    @staticmethod
    def parse(text: str, origin: str) -> "ApiKeys":
        keys = []
        for number, raw in enumerate(re.split(r"[\n,]", text), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            m = _LINE.match(line)
            if m is None:
                # never echo the line: it may be a plain key pasted by mistake
                raise KeysError(f"{origin}: entry {number} is not `NAME sha256:<64 hex> [rate_limit=N]` (make one "
                                "with `python -m service.auth new-key NAME`; the service stores no plain keys)")
            rate = m["rate"]
            keys.append(ApiKey(m["name"], m["digest"], int(rate) if rate is not None else None))
        return ApiKeys(keys)

    @classmethod
    def load(cls, auth: Auth, home: Path, env: Mapping[str, str] | None = None) -> "ApiKeys":
        env = os.environ if env is None else env
        keys: list[ApiKey] = []
        if auth.keys_file:
            path = Path(auth.keys_file).expanduser()
            path = path if path.is_absolute() else home / path
            try:
                keys += cls.parse(path.read_text(), str(path)).keys
            except OSError as exc:
                raise KeysError(f"auth.keys_file {path}: {exc.strerror or exc}") from None
        if env.get(KEYS_ENV):
            keys += cls.parse(env[KEYS_ENV], f"${KEYS_ENV}").keys
        if not keys:
            raise KeysError(f"auth is enabled but no API key is configured: set auth.keys_file or ${KEYS_ENV}")
        return cls(keys)

    def match(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode()).hexdigest()
        found = None
        for key in self.keys:  # compare with every key, in constant time each
            if hmac.compare_digest(key.digest, digest):
                found = key
        return found


class RateLimiter:
    """A token bucket per key name: ``per_minute`` tokens, refilled continuously. Per worker process.

    >>> t = [0.0]; limiter = RateLimiter(clock=lambda: t[0])
    >>> [limiter.acquire("alice", 2) for _ in range(3)]
    [0.0, 0.0, 30.0]
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # name -> (tokens, at)
        self._lock = threading.Lock()

    def acquire(self, name: str, per_minute: int) -> float:
        """0.0 when the request may go, else the seconds until one token is back."""
        if per_minute <= 0:
            return 0.0
        rate = per_minute / 60.0
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(name, (float(per_minute), now))
            tokens = min(float(per_minute), tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._buckets[name] = (tokens - 1.0, now)
                return 0.0
            self._buckets[name] = (tokens, now)
            return (1.0 - tokens) / rate


def is_open(path: str, auth: Auth) -> bool:
    """Routes that need no key: probes, the page's static shell, and /metrics unless protected."""
    if path in OPEN_PATHS or (path == "/metrics" and not auth.protect_metrics):
        return True
    return path.startswith(OPEN_PREFIXES) and ".." not in path


class AccessControl:
    """ASGI middleware: Bearer keys on every route but the open ones, and the per-key rate limit."""

    def __init__(self, app, auth: Auth, home: Path):
        self.app, self.auth = app, auth
        try:
            self.keys = ApiKeys.load(auth, home)
        except KeysError as exc:
            logger.error("erasure service refusing to start: %s", exc)  # fail closed, like a refused pack
            raise
        self.limiter = RateLimiter()
        rated = {k.name: k.rate_limit for k in self.keys.keys if k.rate_limit is not None}
        rate = f"{auth.rate_limit} generate requests per minute per key" if auth.rate_limit else "no rate limit"
        logger.info("access control on: %d API key(s) %s; %s%s; /metrics %s", len(self.keys.keys),
                    [k.name for k in self.keys.keys], rate, f" (per-key limits {rated})" if rated else "",
                    "protected" if auth.protect_metrics else "open")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or is_open(scope["path"], self.auth):
            return await self.app(scope, receive, send)
        where = f"{scope['method']} {scope['path']} from {(scope.get('client') or ('?',))[0]}"
        header = ""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                header = value.decode("latin-1")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            logger.info("401 %s: no bearer key", where)
            return await error_response(send, 401, "this service needs an API key: send `Authorization: Bearer <key>`",
                               {"www-authenticate": 'Bearer realm="erasure"'})
        key = self.keys.match(token)
        if key is None:
            logger.warning("403 %s: the key presented is not one of the configured keys", where)
            return await error_response(send, 403, "this API key is not accepted here (unknown or revoked key)")
        if scope["path"] in RATE_LIMITED:
            limit = self.auth.rate_limit if key.rate_limit is None else key.rate_limit
            wait = self.limiter.acquire(key.name, limit)
            if wait > 0:
                seconds = max(1, math.ceil(wait))
                logger.info("429 %s: key %r is over %d requests per minute", where, key.name, limit)
                return await error_response(send, 429, f"rate limit of {limit} generate requests per minute for this key "
                                              f"reached; retry in {seconds} s", {"retry-after": str(seconds)})
        scope.setdefault("state", {})["api_key"] = key.name
        return await self.app(scope, receive, send)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.auth", description="API keys for the erasure service")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("new-key", help="print a new key (shown once) and the line to add to the keys file")
    make.add_argument("name", help="a name for the key (it appears in logs instead of the key)")
    make.add_argument("--rate-limit", type=int, help="generate requests per minute for this key")
    sub.add_parser("hash", help="read a key on stdin, print its keys-file digest")
    args = parser.parse_args(argv)
    if args.command == "hash":
        print(hash_key(input().strip()))
        return 0
    if not re.fullmatch(r"[A-Za-z0-9_.@-]+", args.name):
        parser.error("the name may hold letters, digits and _ . @ - only")
    key = new_key()
    line = f"{args.name} {hash_key(key)}" + (f" rate_limit={args.rate_limit}" if args.rate_limit is not None else "")
    print(f"key (give it to the client; it is not stored anywhere): {key}")
    print(f"line for auth.keys_file or ${KEYS_ENV}:  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
