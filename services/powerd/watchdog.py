"""Clock watchdog: a tiny child of powerd that resets NVML clocks if powerd dies without doing so.

powerd starts it with a pipe on its stdin and never writes to it. The kernel closes that pipe however
powerd ends (exit, exception, SIGKILL, OOM kill), so end-of-file here means "powerd is gone". A clean
powerd has already reset its clocks and removed its lock file by then; otherwise the file still names
powerd's pid and the GPUs it locked, and the watchdog resets those. A powerd started again meanwhile
rewrites the file with its own pid, and the watchdog then leaves its GPUs alone.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from services.powerd.lockfile import LockFile

log = logging.getLogger("muserve.powerd.watchdog")


def spawn_watchdog(state_path: Path) -> subprocess.Popen[bytes]:
    """Start the watchdog for this process; keep the returned handle (its stdin) open until exit."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "services.powerd.watchdog",
            "--parent",
            str(os.getpid()),
            "--state",
            str(state_path),
        ],
        stdin=subprocess.PIPE,
        close_fds=True,
    )


def stop_watchdog(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    """Let the watchdog go after a clean shutdown (the lock file is gone, so it resets nothing)."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def reset_after(parent_pid: int, lock_file: LockFile) -> list[int]:
    """Reset the real GPUs the (now gone) parent left locked; returns the indexes reset."""
    state = lock_file.read()
    if state is None or state.pid != parent_pid or not state.locked_mhz:
        return []
    from services.powerd.gpu import GpuError
    from services.powerd.nvml_backend import NvmlBackend

    done: list[int] = []
    for index in sorted(state.locked_mhz):
        try:
            with NvmlBackend(index) as gpu:
                gpu.reset_clocks()
            done.append(index)
        except GpuError as exc:
            log.error("cannot reset clocks of GPU %d: %s", index, exc)
    latest = lock_file.read()
    if latest is not None and latest.pid == parent_pid and len(done) == len(state.locked_mhz):
        lock_file.clear()
    return done


def main(argv: list[str] | None = None) -> int:
    """Wait for end-of-file on stdin (the parent is gone), then undo what it left locked."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--parent", type=int, required=True, help="pid of the powerd to watch")
    parser.add_argument("--state", type=Path, required=True, help="powerd's lock-state file")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname).1s [powerd-watchdog] %(message)s",
        stream=sys.stderr,
    )
    # A Ctrl-C or SIGTERM meant for powerd's process group must not take the watchdog first.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        while sys.stdin.buffer.read(4096):
            pass
    reset = reset_after(args.parent, LockFile(args.state))
    if reset:
        log.warning("powerd (pid %d) died with clocks locked: reset GPU(s) %s", args.parent, reset)
    return 0


if __name__ == "__main__":
    sys.exit(main())
