"""A fake libnvidia-ml.so.1 (fake_nvml.c) that the real nvidia-ml-py loads, for GPU-free NVML tests.

Two ways to put it under pynvml, both without touching Python code:

* In this process: `preload_fake_nvml(path)` dlopens the library before pynvml's first nvmlInit.
  pynvml then calls `CDLL("libnvidia-ml.so.1")`, and glibc hands back the already loaded object
  because its DT_SONAME is "libnvidia-ml.so.1". Once loaded it stays for the process lifetime
  (pynvml caches the handle), so "no library" cases must run in a clean subprocess.
* In a child process (a service under test): put the directory on LD_LIBRARY_PATH;
  `FakeNvml.env()` builds such an environment.

Knobs are environment variables read by the library at nvmlInit (see fake_nvml.c):
FAKE_NVML_ENABLE (must be 1, else nvmlInit answers DRIVER_NOT_LOADED), FAKE_NVML_DEVICE_COUNT,
FAKE_NVML_NO_PERMISSION, FAKE_NVML_UTIL, FAKE_NVML_STATE_FILE, FAKE_NVML_LOG_FILE (every set/reset
with the calling pid) and FAKE_NVML_PERSIST (locks survive the process, as on hardware). In-process
they take effect at the next init, i.e. when no NvmlBackend is open. The `fake_nvml` fixture sets
them with monkeypatch and shuts NVML down after each test, so the library, which stays loaded, is
inert (no driver) for every later test: make_gpu("auto") there still picks the simulated GPU.

Use from a test module:
    from tests.fakenvml import fake_nvml, fake_nvml_dir  # noqa: F401  (pytest fixtures)
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

__all__ = [
    "FAKE_NVML_SOURCE",
    "LIB_NAME",
    "FakeNvml",
    "build_fake_nvml",
    "clean_env",
    "default_build_dir",
    "fake_nvml",
    "fake_nvml_dir",
    "preload_fake_nvml",
    "read_fake_nvml_log",
    "read_fake_nvml_state",
]

FAKE_NVML_SOURCE = Path(__file__).with_name("fake_nvml.c")
LIB_NAME = "libnvidia-ml.so.1"
KNOBS = (
    "FAKE_NVML_ENABLE",
    "FAKE_NVML_DEVICE_COUNT",
    "FAKE_NVML_NO_PERMISSION",
    "FAKE_NVML_UTIL",
    "FAKE_NVML_STATE_FILE",
    "FAKE_NVML_LOG_FILE",
    "FAKE_NVML_PERSIST",
)
_GCC_ARGS = ("-O2", "-Wall", "-Wextra", "-shared", "-fPIC", f"-Wl,-soname,{LIB_NAME}")


def _source_digest() -> str:
    """Hash of what determines the binary: the C source and the compiler flags."""
    return hashlib.sha256(FAKE_NVML_SOURCE.read_bytes() + " ".join(_GCC_ARGS).encode()).hexdigest()


def default_build_dir() -> Path:
    """Per-user, per-source cache directory: compiled once per source version, and checkouts with
    different sources never overwrite each other's library."""
    return Path(tempfile.gettempdir()) / f"muserve-fake-nvml-{os.getuid()}" / _source_digest()[:16]


def build_fake_nvml(out_dir: Path) -> Path:
    """Compile fake_nvml.c to out_dir/libnvidia-ml.so.1 with gcc unless a build of this source exists."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        raise RuntimeError("gcc is needed to build the fake libnvidia-ml.so.1")
    out_dir.mkdir(parents=True, exist_ok=True)
    lib = out_dir / LIB_NAME
    stamp = out_dir / f"{LIB_NAME}.sha256"
    digest = _source_digest()
    if lib.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return lib
    # Build beside the target and rename: concurrent runs and already-mapped copies stay intact.
    tmp = out_dir / f".{LIB_NAME}.{os.getpid()}.tmp"
    subprocess.run([gcc, *_GCC_ARGS, "-o", str(tmp), str(FAKE_NVML_SOURCE)], check=True, capture_output=True)
    os.replace(tmp, lib)
    stamp.write_text(digest + "\n")
    return lib


def preload_fake_nvml(lib: Path) -> None:
    """Load the fake into this process so pynvml's CDLL("libnvidia-ml.so.1") resolves to it."""
    import pynvml

    ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
    # If a real NVML got into this process first, the soname resolves to it and tests would drive
    # real hardware: refuse instead.
    for candidate in (pynvml.nvmlLib, ctypes.CDLL(LIB_NAME)):
        if candidate is not None and not hasattr(candidate, "fakeNvmlIsFake"):
            raise RuntimeError("a real libnvidia-ml.so.1 is loaded in this process; run NVML tests alone")


def read_fake_nvml_state(path: Path) -> dict[int, tuple[int, int] | None]:
    """Parse FAKE_NVML_STATE_FILE: device index -> locked (min, max) MHz, or None after a reset."""
    state: dict[int, tuple[int, int] | None] = {}
    if not path.exists():
        return state
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1] == "reset":
            state[int(parts[0])] = None
        elif len(parts) == 3:
            state[int(parts[0])] = (int(parts[1]), int(parts[2]))
    return state


def read_fake_nvml_log(path: Path) -> list[tuple[int, str, int, tuple[int, int] | None]]:
    """Parse FAKE_NVML_LOG_FILE: (pid, "set" | "reset", device index, (min, max) MHz or None) per call."""
    events: list[tuple[int, str, int, tuple[int, int] | None]] = []
    if not path.exists():
        return events
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[1] == "set":
            events.append((int(parts[0]), "set", int(parts[2]), (int(parts[3]), int(parts[4]))))
        elif len(parts) == 3 and parts[1] == "reset":
            events.append((int(parts[0]), "reset", int(parts[2]), None))
    return events


@dataclass
class FakeNvml:
    """Handle on the fake library for one test: knobs, state file, subprocess environment."""

    lib: Path
    state_file: Path
    _monkeypatch: pytest.MonkeyPatch

    @property
    def lib_dir(self) -> Path:
        """Directory to put on LD_LIBRARY_PATH."""
        return self.lib.parent

    def configure(
        self,
        *,
        enabled: bool | None = None,
        device_count: int | None = None,
        no_permission: bool | None = None,
        util_percent: int | None = None,
    ) -> None:
        """Set knobs for this process; they apply from the next nvmlInit (no backend open)."""
        if enabled is not None:
            self._monkeypatch.setenv("FAKE_NVML_ENABLE", "1" if enabled else "0")
        for name, value in (
            ("FAKE_NVML_DEVICE_COUNT", device_count),
            ("FAKE_NVML_NO_PERMISSION", None if no_permission is None else int(no_permission)),
            ("FAKE_NVML_UTIL", util_percent),
        ):
            if value is not None:
                self._monkeypatch.setenv(name, str(value))

    def state(self) -> dict[int, tuple[int, int] | None]:
        """What the last set/reset left on each device (empty before any)."""
        return read_fake_nvml_state(self.state_file)

    def env(self, **knobs: str | int) -> dict[str, str]:
        """Environment for a child process that should see the fake (plus knobs, e.g. FAKE_NVML_UTIL=50)."""
        env = dict(os.environ)
        search_path = [str(self.lib_dir), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in search_path if p)
        env["FAKE_NVML_ENABLE"] = "1"
        env.update({k: str(v) for k, v in knobs.items()})
        return env


def clean_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of the environment with no fake NVML knobs and no LD_LIBRARY_PATH (no fake reachable)."""
    env = dict(os.environ if base is None else base)
    for name in (*KNOBS, "LD_LIBRARY_PATH", "LD_PRELOAD"):
        env.pop(name, None)
    return env


@pytest.fixture(scope="session")
def fake_nvml_dir() -> Path:
    """Directory holding the built fake libnvidia-ml.so.1 (for LD_LIBRARY_PATH in subprocesses)."""
    if shutil.which("gcc") is None and shutil.which("cc") is None:
        pytest.skip("no C compiler to build the fake libnvidia-ml.so.1")
    return build_fake_nvml(default_build_dir()).parent


@pytest.fixture
def fake_nvml(fake_nvml_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNvml]:
    """Fake NVML loaded in this process with default knobs and a per-test state file."""
    from services.powerd import nvml_backend

    lib = fake_nvml_dir / LIB_NAME
    preload_fake_nvml(lib)
    # Knobs are read at init: start from a shut-down NVML so this test's environment applies.
    nvml_backend._nvml_force_shutdown()
    for name in KNOBS:
        monkeypatch.delenv(name, raising=False)
    state_file = tmp_path / "fake-nvml-state"
    monkeypatch.setenv("FAKE_NVML_STATE_FILE", str(state_file))
    monkeypatch.setenv("FAKE_NVML_ENABLE", "1")
    yield FakeNvml(lib=lib, state_file=state_file, _monkeypatch=monkeypatch)
    nvml_backend._nvml_force_shutdown()
