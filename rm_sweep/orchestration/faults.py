"""The one fault-injection hook in code users run: how the recovery tests kill a process on cue.

Recovery (a Train worker restarted from its last checkpoint, a target actor restarted with its
calls retried) is only tested if a process dies at a known point. With ``RM_SWEEP_FAULT`` unset,
as it is for every user, ``inject`` returns at once. A test sets it, in the environment of the
Ray processes (``ray_session(env=...)``), to ``POINT:PATTERN:MARKER`` entries joined by ``;``:

- ``epoch:<model_id>/<epoch>``: a Train worker exits after training that epoch and before
  reporting it (its checkpoint is lost; the previous one is not);
- ``call:count``: a target actor exits on receiving a call.

``PATTERN`` is matched with ``fnmatch`` (``epoch:*/2`` is epoch 2 of any model). A fault is armed
while its marker file does not exist: it strikes once, creating the marker first, so the
restarted process carries on. Exiting is ``os._exit``: no cleanup runs, as when a node is lost.
"""
from __future__ import annotations

import fnmatch
import os
from pathlib import Path

ENV = "RM_SWEEP_FAULT"


def inject(point: str, key: str) -> None:
    """Exit this process now if an entry of ``RM_SWEEP_FAULT`` names ``point``, its pattern
    matches ``key`` and its marker file does not exist."""
    for entry in filter(None, os.environ.get(ENV, "").split(";")):
        armed_point, pattern, marker = entry.split(":", 2)
        if armed_point == point and fnmatch.fnmatchcase(key, pattern) and not Path(marker).exists():
            Path(marker).touch()
            os._exit(1)


__all__ = ["ENV", "inject"]
