"""Test-only fault injection: off unless ``SEGPC_FAULT`` is set.

``SEGPC_FAULT="nucleus@2,cytoplasm@3,write@2"`` makes the named stage's worker process kill
itself (SIGKILL, as the kernel's OOM killer or a lost node would) at that call, once per
job: a marker file in ``SEGPC_FAULT_DIR`` records that the fault fired, so the actor Ray
restarts carries on. The reliability tests use it to show that Ray restarts the actor,
retries its batch, and the outputs still hold every image exactly once.

``SEGPC_FAULT="epoch@1"`` makes a training run (ray_jobs/train.py) fail after its first
epoch's checkpoint, to show that ``--resume`` continues from it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

_calls: dict[str, int] = {}


def fault_at(stage: str) -> int | None:
    """The call number at which ``stage`` is to die, or None."""
    for item in os.environ.get("SEGPC_FAULT", "").split(","):
        name, _, nth = item.strip().partition("@")
        if name == stage and nth.isdigit():
            return int(nth)
    return None


def maybe_die(stage: str) -> None:
    """Count this call of ``stage``; kill this process if the fault is due and not yet fired."""
    nth, folder = fault_at(stage), os.environ.get("SEGPC_FAULT_DIR")
    if nth is None or not folder:
        return
    _calls[stage] = _calls.get(stage, 0) + 1
    if _calls[stage] < nth:
        return
    try:
        fd = os.open(Path(folder) / f"{stage}.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return  # fired already: this is the restarted actor
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
