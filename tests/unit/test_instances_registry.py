"""The supervisor's side of the record: launched, update, stop_request, finish."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from vllm_supervisor.host import identity
from vllm_supervisor.host.procinfo import LaunchRecord, ProcId
from vllm_supervisor.instances import commands
from vllm_supervisor.instances.records import Budget, GpuEntry, ProcRef, read_record
from vllm_supervisor.instances.registry import Registry, read_report, write_stop_request
from vllm_supervisor.instances.statedir import instance_lock_path, try_lock


class _Wall:
    """A wall clock that moves only when told."""

    def __init__(self):
        self.t = 1_700_000_000.0

    def __call__(self) -> float:
        return self.t


def _launched(d: Path, wall=None, lock: int | None = None) -> Registry:
    reg = Registry(d, "alpha", wall or _Wall(), lock=lock)
    reg.launched(
        supervisor=ProcId(4242, 1000),
        vllm=LaunchRecord(("vllm", "serve", "m"), 4300, 4300, 4300, 1010, 1.7e9, 1.7e9),
        model="m", port=8000, url="http://127.0.0.1:8000",
        gpus={"GPU-b": (1, 2000.0), "GPU-a": (0, None)}, grace_s=20, kill_wait_s=10.0,
        vram_timeout_s=30.0, vram_tolerance_mib=512.0, tmpdir="/tmp/vllm-supervise-4242-x")
    return reg


def test_launched_writes_a_starting_record_with_the_instances_budget(tmp_path):
    reg = _launched(tmp_path)
    rec = read_record(tmp_path / "alpha.json")
    assert rec == reg.record
    assert rec.state == "starting" and rec.boot_id == identity.BOOT_ID
    assert rec.supervisor.ident == ProcId(4242, 1000) and rec.vllm.ident == ProcId(4300, 1010)
    assert rec.budget == Budget(20.0, 10.0, 30.0, 512.0)
    assert rec.gpus == (GpuEntry("GPU-a", 0, None, False), GpuEntry("GPU-b", 1, 2000.0, False))
    assert rec.tree == () and rec.shm == () and rec.ready_wall is None


def test_update_replaces_only_the_fields_given_and_rewrites_the_record(tmp_path):
    wall = _Wall()
    reg = _launched(tmp_path, wall)
    before = reg.record
    wall.t += 7
    reg.update(tree=[(ProcId(4300, 1010), "vllm serve"), (ProcId(4301, 1020), "VLLM::Eng")],
               shm=["/dev/shm/psm_b", "/dev/shm/psm_a", "/dev/shm/psm_a"])
    rec = read_record(tmp_path / "alpha.json")
    assert rec == reg.record and rec.state == "starting" and rec.budget == before.budget
    assert rec.tree == (ProcRef(4300, 1010, "vllm serve"), ProcRef(4301, 1020, "VLLM::Eng"))
    assert rec.shm == ("/dev/shm/psm_a", "/dev/shm/psm_b")
    assert rec.updated_wall == before.updated_wall + 7
    reg.update(state="ready", ready_wall=wall.t)
    rec = read_record(tmp_path / "alpha.json")
    assert (rec.state, rec.ready_wall, rec.tree) == ("ready", wall.t, reg.record.tree)


def test_gpus_used_marks_entries_adds_unknown_uuids_and_never_unmarks(tmp_path):
    reg = _launched(tmp_path)
    reg.update(gpus_used={"GPU-b", "GPU-new"})
    reg.update(gpus_used={"GPU-a"})
    assert read_record(tmp_path / "alpha.json").gpus == (
        GpuEntry("GPU-a", 0, None, True), GpuEntry("GPU-b", 1, 2000.0, True),
        GpuEntry("GPU-new", None, None, True))


def test_update_before_launched_is_a_bug_and_a_failed_write_propagates(tmp_path):
    with pytest.raises(RuntimeError):
        Registry(tmp_path, "alpha").update(state="ready")
    reg = _launched(tmp_path)
    reg.dir = tmp_path / "missing"  # the state dir vanished under the run
    with pytest.raises(OSError):
        reg.update(state="stopping")
    assert reg.record.state == "stopping"  # held: the next write that works carries it


@pytest.mark.parametrize("written, grace", [
    ('{"grace": 5}', 5.0), ('{"grace": 0}', 0.0), ('{"grace": 2.5, "by": 1}', 2.5),
    ('{"grace": -1}', None), ('{"grace": "5"}', None), ('{"grace": true}', None),
    ('{"grace": NaN}', None), ('{"grace": Infinity}', None), ('{"grace": 1e999}', None),
    ('{"grace": null}', None), ("{}", None), ("[5]", None), ("5", None), ("{", None),
    ("", None)])
def test_stop_request_is_read_once_and_only_a_finite_grace_counts(tmp_path, written, grace):
    reg = Registry(tmp_path, "alpha")
    (tmp_path / "alpha.stop.json").write_text(written)
    assert reg.stop_request() == grace
    assert not (tmp_path / "alpha.stop.json").exists()
    assert reg.stop_request() is None


def test_stop_request_round_trips_from_the_stop_command(tmp_path):
    write_stop_request(tmp_path, "alpha", 7.0)
    assert Registry(tmp_path, "alpha").stop_request() == 7.0


@dataclass(frozen=True)
class _Verdict:
    timed_out: bool


@dataclass(frozen=True)
class _Report:
    """The duck type release() takes (the lifecycle's StopReport)."""

    survivors: tuple
    vram: _Verdict
    exit_code: int
    exit_meaning: str

    def to_dict(self) -> dict:
        return {"survivors": list(self.survivors), "exit_code": self.exit_code,
                "exit_meaning": self.exit_meaning}


def test_release_after_a_complete_stop_leaves_the_report_and_drops_record_and_lock(tmp_path):
    lock = try_lock(instance_lock_path(tmp_path, "alpha"))
    reg = _launched(tmp_path, lock=lock)
    commands.release(reg, _Report((), _Verdict(False), 0, "stopped cleanly"), "TEXT")
    assert not (tmp_path / "alpha.json").exists() and not (tmp_path / "alpha.lock").exists()
    with pytest.raises(OSError):
        os.fstat(lock)  # closed: the name is free
    report = read_report(tmp_path, "alpha")
    assert report["text"] == "TEXT" and report["exit_code"] == 0


def test_release_after_an_incomplete_stop_marks_the_record(tmp_path):
    reg = _launched(tmp_path)
    commands.release(reg, _Report(("4301",), _Verdict(False), 5, "survived SIGKILL"), "T")
    rec = read_record(tmp_path / "alpha.json")
    assert (rec.state, rec.exit_code, rec.exit_meaning) == ("incomplete-stop", 5,
                                                            "survived SIGKILL")
    assert json.loads((tmp_path / "alpha.report.json").read_text())["text"] == "T"
