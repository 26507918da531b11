"""A stop run from a record (dead supervisor, --reclaim, cleanup) uses that instance's own
budget and VRAM tolerance, not literals; and a record from another boot names nothing."""

from __future__ import annotations

import dataclasses
import os
import tempfile

import pytest
from test_records import make_record

from vllm_supervisor.gpu.probe import GpuReading, NoGpuProbe
from vllm_supervisor.host.proctree import read_proc
from vllm_supervisor.host.takeover import Target
from vllm_supervisor.instances import commands, ops, orphans
from vllm_supervisor.instances.records import (
    DEFAULT_VRAM_TOLERANCE_MIB,
    UNRECORDED_BUDGET,
    Budget,
    GpuEntry,
    ProcRef,
    stop_budget,
    write_record,
)

OWN = Budget(grace_s=42.0, kill_wait_s=7.0, vram_timeout_s=99.0, vram_tolerance_mib=512.0)


def test_stop_budget_is_the_records_own_with_an_explicit_grace_replacing_only_grace():
    rec = make_record(budget=OWN)
    assert stop_budget(rec) == OWN
    assert stop_budget(rec, 3) == dataclasses.replace(OWN, grace_s=3.0)
    assert stop_budget(rec, 0.0).grace_s == 0.0
    assert stop_budget(None) == UNRECORDED_BUDGET
    assert stop_budget(None, 2.0) == dataclasses.replace(UNRECORDED_BUDGET, grace_s=2.0)


def test_the_default_tolerance_matches_the_supervisors():
    from vllm_supervisor.lifecycle.config import DEFAULT_VRAM_TOLERANCE_MIB as supervisors

    assert DEFAULT_VRAM_TOLERANCE_MIB == UNRECORDED_BUDGET.vram_tolerance_mib == supervisors


class _Spy:
    """Stands in for ops.stop_tree: records the budget, signals nothing."""

    def __init__(self):
        self.budgets: list[Budget] = []

    def __call__(self, tree, budget, probe):
        self.budgets.append(budget)
        return {"name": tree.label, "complete": True, "survivors": [], "stopped_pids": [1]}


def _tree(rec, procs) -> ops.Tree:
    return ops.Tree(rec.name, procs, Target(None), record=rec)


@pytest.fixture
def dead_supervisor_with_a_tree(monkeypatch):
    """Records' supervisors read as dead and their trees as alive, without processes."""
    spy = _Spy()
    me = read_proc(os.getpid(), cmdline=True)
    monkeypatch.setattr(ops, "supervisor_alive", lambda rec, state_dir=None: False)
    monkeypatch.setattr(ops, "tree_of_record", lambda rec, all_users=False: _tree(rec, [me]))
    monkeypatch.setattr(ops, "stop_tree", spy)
    monkeypatch.setattr(orphans, "find_orphans", lambda all_users, claimed=None, supervisors=None: [])
    return spy


@pytest.mark.parametrize("grace, expected", [(None, OWN),
                                             (5.0, dataclasses.replace(OWN, grace_s=5.0))])
def test_stop_of_a_dead_supervisor_uses_the_instances_budget(tmp_path, grace, expected,
                                                            dead_supervisor_with_a_tree):
    write_record(tmp_path, make_record(budget=OWN))
    (result,) = commands.stop(tmp_path, ["alpha"], False, grace, NoGpuProbe("test"))
    assert result["complete"] and dead_supervisor_with_a_tree.budgets == [expected]
    assert not (tmp_path / "alpha.json").exists()


def test_reclaim_uses_the_dead_predecessors_budget(tmp_path, dead_supervisor_with_a_tree):
    write_record(tmp_path, make_record(budget=OWN))
    cfg = type("Cfg", (), {"model": "m", "health_port": 8000})()
    ui = type("Ui", (), {"event": lambda self, msg, style="": None})()
    reg = commands.claim(tmp_path, "alpha", cfg, True, NoGpuProbe("test"), ui)
    assert reg.name == "alpha" and dead_supervisor_with_a_tree.budgets == [OWN]


def test_cleanup_uses_each_records_budget_with_the_cleanup_grace(tmp_path,
                                                                 dead_supervisor_with_a_tree):
    write_record(tmp_path, make_record(budget=OWN))
    trees = commands.cleanup_candidates(tmp_path, all_users=False)
    commands.cleanup(tmp_path, trees, 10.0, NoGpuProbe("test"))
    assert dead_supervisor_with_a_tree.budgets == [dataclasses.replace(OWN, grace_s=10.0)]


class _Probe:
    """One GPU, 300 MiB over its recorded baseline, with no process listed."""

    name = "fake"

    def available(self):
        return None

    def read(self):
        return [GpuReading(0, "GPU-a", 1300.0, 80_000.0, ())]


@pytest.mark.parametrize("tolerance, verdict", [(512.0, "released"), (256.0, "held"),
                                                (128.0, "held")])
def test_vram_check_uses_the_instances_own_tolerance(tolerance, verdict):
    rec = make_record(gpus=(GpuEntry("GPU-a", 0, 1000.0, True),))
    budget = dataclasses.replace(OWN, vram_timeout_s=0.0, vram_tolerance_mib=tolerance)
    tree = ops.Tree("alpha", [], Target(None), record=rec)
    assert ops.vram_after(tree, _Probe(), budget).startswith(verdict + ":")


def test_the_stop_path_judges_vram_with_the_records_tolerance(tmp_path, monkeypatch):
    """commands.stop -> ops.stop_tree -> ops.vram_after, with nothing left to signal."""
    rec = make_record(budget=dataclasses.replace(OWN, grace_s=0.0, kill_wait_s=0.0,
                                                 vram_timeout_s=0.0),
                      gpus=(GpuEntry("GPU-a", 0, 1000.0, True),), tmpdir=None, shm=())
    write_record(tmp_path, rec)
    monkeypatch.setattr(ops, "supervisor_alive", lambda rec, state_dir=None: False)
    monkeypatch.setattr(ops, "tree_of_record", lambda rec, all_users=False: _tree(rec, []))
    (result,) = commands.stop(tmp_path, ["alpha"], False, None, _Probe())
    assert result["complete"] and result["vram"].startswith("released:")


def test_a_record_from_another_boot_names_no_process(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    me = read_proc(os.getpid(), cmdline=False)
    private = tmp_path / f"vllm-supervise-{me.pid}-abc"
    private.mkdir()
    mine = make_record(supervisor=ProcRef(me.pid, me.start_ticks, ""),
                       tree=(ProcRef(me.pid, me.start_ticks, "me"),), boot_id="another-boot",
                       tmpdir=str(private))
    assert not ops.supervisor_alive(mine)
    tree = ops.tree_of_record(mine)
    assert tree.procs == [] and tree.target.leader is None and not tree.target.tracked
    assert tree.files == [str(private)]  # /dev/shm was emptied by the reboot
    assert ops.supervisor_alive(dataclasses.replace(mine, boot_id=make_record().boot_id))


def test_status_reads_typed_records_and_warns_about_bad_ones(tmp_path):
    write_record(tmp_path, make_record(boot_id="another-boot"))
    (tmp_path / "broken.json").write_text("{")
    rows, problems = commands.status_rows(tmp_path, None, NoGpuProbe("test"))
    assert [(r["name"], r["state"], r["processes"]) for r in rows] == [
        ("alpha", "stale (nothing left)", [])]
    assert len(problems) == 1 and problems[0].startswith("record broken.json is corrupted")
