"""Fail closed means the process exits.

`bentoml serve` runs the service in worker processes under a process manager (circus) that respawns a worker that
dies, so a worker refusing to start (a tampered pack, a pack above ``max_attack_success``) would leave a server that
is up and never ready. Here a refusal ends the server instead:

* ``arm()`` runs when ``service.service`` is imported. In the `bentoml serve` process (it imports the service before
  it starts any worker) it leaves a marker naming its PID and registers an exit hook.
* ``refuse(reason)`` runs in a worker that cannot start: it writes the reason beside the marker of its parent (the
  serve process) and asks that process to stop (SIGTERM), which stops every worker.
* The serve process's exit hook finds the reason, prints it as the last line and exits with status 3
  (``EXIT_REFUSED``); in a container the pod fails.

Served in-process (tests, ``TestClient``) nothing is signalled: ``refuse`` returns False and the caller keeps the
reason (the service answers 503 with it).

Example:
    >>> arm()                      # at import, in every process
    >>> refuse("pack 'red': ...")  # in a worker: the server exits with status 3, the reason last
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path

EXIT_REFUSED = 3
PREFIX = "erasure service refusing to start: "


def _marker(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"erasure-serve-{pid}.armed"


def _reason_file(pid: int) -> Path:
    return Path(tempfile.gettempdir()) / f"erasure-serve-{pid}.refused"


def in_worker() -> bool:
    """Whether this process is a `bentoml serve` worker (BentoML sets the worker index before importing us)."""
    import bentoml

    return bentoml.server_context.worker_index is not None


def arm() -> None:
    """In a process that is not a worker: leave the marker and register the exit hook (once)."""
    if in_worker():
        return
    pid = os.getpid()
    marker = _marker(pid)
    if marker.exists():
        return
    marker.write_text(str(pid))
    atexit.register(_exit_if_refused, pid)


def _exit_if_refused(pid: int) -> None:
    with contextlib.suppress(FileNotFoundError):
        _marker(pid).unlink()
    try:
        reason = _reason_file(pid).read_text().strip()
    except FileNotFoundError:
        return
    with contextlib.suppress(FileNotFoundError):
        _reason_file(pid).unlink()
    sys.stdout.flush()
    print(PREFIX + reason, file=sys.stderr, flush=True)
    os._exit(EXIT_REFUSED)


def refuse(reason: str) -> bool:
    """Stop the `bentoml serve` that started this worker, ``reason`` its last line; False when there is none (served
    in-process, or the parent is not an armed serve process)."""
    if not in_worker():
        return False
    parent = os.getppid()
    if not _marker(parent).exists():
        return False
    with contextlib.suppress(FileExistsError), open(_reason_file(parent), "x") as f:  # the first reason wins
        f.write(reason)
    os.kill(parent, signal.SIGTERM)
    return True
