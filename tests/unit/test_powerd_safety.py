"""powerd's clock safety: lock-state file, reset after a crash, refused clocks, dry-run (fake NVML)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from services.common.settings import Settings
from services.powerd.gpu import GpuInvalidArgumentError
from services.powerd.lockfile import LockFile
from services.powerd.nvml_backend import NvmlBackend
from services.powerd.policy import ClockPolicy, QueueSnapshot
from services.powerd.service import PowerDaemon, lock_state_path
from services.powerd.watchdog import reset_after
from tests.fakenvml import FakeNvml, fake_nvml, fake_nvml_dir

__all__ = ["fake_nvml", "fake_nvml_dir"]


def nvml_daemon(tmp_path: Path, **powerd: object) -> PowerDaemon:
    settings = Settings(
        node="n1",
        data_dir=tmp_path,
        powerd={"backend": "nvml", "gpus": 1, "policy": "queue-threshold", **powerd},
    )
    return PowerDaemon(settings, nc=None)  # type: ignore[arg-type]  # recover/control/close do no I/O


def test_lock_file_round_trip_and_atomic_clear(tmp_path: Path) -> None:
    lf = LockFile(tmp_path / "sub" / "n1.json")
    assert lf.read() is None
    lf.write("n1", {0: 900, 1: None, 2: 1200})
    state = lf.read()
    assert state is not None and state.pid == os.getpid() and state.node == "n1"
    assert state.locked_mhz == {0: 900, 2: 1200}
    assert [p.name for p in lf.path.parent.iterdir()] == ["n1.json"]  # no temp file left behind
    lf.write("n1", {0: None, 2: None})  # nothing locked any more: the file goes
    assert not lf.path.exists() and lf.read() is None


def test_unreadable_lock_file_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "n1.json"
    path.write_text("{not json")
    assert LockFile(path).read() is None
    path.write_text(json.dumps({"locked_mhz": {}}))  # no pid
    assert LockFile(path).read() is None
    assert "ignoring" in caplog.text


def test_locks_are_recorded_and_removed_on_clean_close(fake_nvml: FakeNvml, tmp_path: Path) -> None:
    d = nvml_daemon(tmp_path)
    d.recover()
    tel = d.control(1.0)[0]  # idle queue: the threshold policy locks a low clock
    assert tel.simulated is False and tel.locked_clock_mhz == tel.clock_mhz < 1530
    state = d.lock_file.read()
    assert state is not None and state.locked_mhz == {0: tel.clock_mhz} and state.pid == os.getpid()
    assert d.lock_file.path == lock_state_path(d.settings) == tmp_path / "powerd" / "n1.json"
    d.close()
    assert fake_nvml.state() == {0: None} and not d.lock_file.path.exists()


def test_start_after_a_crash_resets_and_says_so(
    fake_nvml: FakeNvml, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NVML_PERSIST", "1")  # locks outlive NVML sessions, as on hardware
    # What a SIGKILLed powerd leaves: the GPU locked and its note on disk.
    with NvmlBackend(0) as gpu:
        gpu.set_locked_clocks_mhz(502, 502)
    path = tmp_path / "powerd" / "n1.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"pid": 424242, "node": "n1", "locked_mhz": {"0": 502}}))
    d = nvml_daemon(tmp_path, policy="max-clock")
    assert d.gpus[0].current_clock_mhz() == 502  # still locked when the new powerd comes up
    with caplog.at_level(logging.WARNING, logger="muserve.powerd"):
        d.recover()
    assert fake_nvml.state() == {0: None} and d.gpus[0].current_clock_mhz() == 1530
    assert "powerd pid 424242 exited with GPU 0 at 502 MHz locked" in caplog.text
    assert not path.exists()
    d.close()


def test_dry_run_never_touches_gpu_or_file(
    fake_nvml: FakeNvml, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "powerd" / "n1.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"pid": 7, "node": "n1", "locked_mhz": {"0": 502}}))
    d = nvml_daemon(tmp_path, dry_run=True)
    with caplog.at_level(logging.INFO, logger="muserve.powerd"):
        d.recover()
        tel = d.control(1.0)[0]
        d.close()
    assert "dry-run does not touch GPUs" in caplog.text and "[dry-run] GPU 0: would lock" in caplog.text
    assert tel.dry_run and tel.locked_clock_mhz is not None and tel.locked_clock_mhz < 1530
    assert tel.clock_mhz == 1530  # the GPU itself was left alone
    assert fake_nvml.state() == {}  # no set, no reset ever reached the driver
    assert path.exists()  # the crashed powerd's note stays for a real powerd to act on


class BadPolicy(ClockPolicy):
    """A policy bug: asks for a clock the GPU does not support."""

    name = "bad"

    def choose_clock_mhz(self, snapshot: QueueSnapshot, supported_clocks_mhz: list[int], now_s: float) -> int:
        return 1000  # the V100 has 997 and 1005, not 1000


@pytest.mark.parametrize("dry_run", [False, True])
def test_unsupported_clock_is_refused_with_a_typed_error(
    fake_nvml: FakeNvml, tmp_path: Path, caplog: pytest.LogCaptureFixture, dry_run: bool
) -> None:
    d = nvml_daemon(tmp_path, dry_run=dry_run)
    d.policies = [BadPolicy()]
    gpu = d.gpus[0]
    with pytest.raises(GpuInvalidArgumentError, match="not a supported clock"):
        gpu.validate_locked_clocks_mhz(1000, 1000)
    tel = d.control(1.0)[0]
    d.control(2.0)  # asked again, refused again
    assert d.stats.refused_clocks == 2 and d.locked[0] is None and tel.locked_clock_mhz is None
    assert tel.clock_mhz == 1530 and fake_nvml.state() == {}
    assert "refused clock 1000" in caplog.text
    assert "muserve_powerd_refused_clocks_total" in d.metrics_text()
    d.close()


def test_watchdog_resets_what_its_dead_parent_left(fake_nvml: FakeNvml, tmp_path: Path) -> None:
    with NvmlBackend(0) as gpu:
        gpu.set_locked_clocks_mhz(502, 502)
    lf = LockFile(tmp_path / "n1.json")
    lf.path.write_text(json.dumps({"pid": 999, "node": "n1", "locked_mhz": {"0": 502}}))
    assert reset_after(123, lf) == []  # the file belongs to another powerd (restarted): hands off
    assert fake_nvml.state() == {0: (502, 502)}
    assert reset_after(999, lf) == [0]
    assert fake_nvml.state() == {0: None} and not lf.path.exists()
    assert reset_after(999, lf) == []  # nothing left to do
