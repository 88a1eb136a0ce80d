"""powerd's on-disk note of the real GPUs it locked, so whoever comes after a crash can undo them.

Only hardware is recorded: a simulated GPU's lock lives in powerd's memory and dies with it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("muserve.powerd")

LOCK_STATE_VERSION = 1


@dataclass(frozen=True)
class LockState:
    """What one powerd process had locked when it last wrote the file."""

    pid: int
    node: str
    locked_mhz: dict[int, int] = field(default_factory=dict)  # GPU index -> locked clock (real GPUs)
    ts_s: float = 0.0


class LockFile:
    """A small JSON file, replaced atomically on every change and removed once every lock is undone."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last: tuple[tuple[int, int], ...] | None = None

    def read(self) -> LockState | None:
        """The state on disk, or None when there is none (or it is unreadable: logged)."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable clock-lock state %s: %s", self.path, exc)
            return None
        try:
            return LockState(
                pid=int(raw["pid"]),
                node=str(raw.get("node", "")),
                locked_mhz={int(k): int(v) for k, v in raw.get("locked_mhz", {}).items()},
                ts_s=float(raw.get("ts_s", 0.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            log.warning("ignoring malformed clock-lock state %s: %s", self.path, exc)
            return None

    def write(self, node: str, locked_mhz: Mapping[int, int | None]) -> None:
        """Record this process's locks (GPUs at None are not locked); a no-op when nothing changed."""
        locks = tuple(sorted((i, int(f)) for i, f in locked_mhz.items() if f is not None))
        if locks == self._last:
            return
        if not locks:
            self.clear()
            return
        body = {
            "v": LOCK_STATE_VERSION,
            "pid": os.getpid(),
            "node": node,
            "locked_mhz": {str(i): f for i, f in locks},
            "ts_s": time.time(),
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(body))
            os.replace(tmp, self.path)  # readers in other processes never see half a file
            self._last = locks
        except OSError as exc:
            log.error("cannot record clock locks in %s: %s", self.path, exc)

    def clear(self) -> None:
        """Nothing is locked any more."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._last = ()
