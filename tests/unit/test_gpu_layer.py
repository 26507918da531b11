"""The NVML layer against a fake NVML module: scope, attribution, verdicts."""

from __future__ import annotations

import os

from tests.fake_nvml import FakeGpu, FakeNvml, h200s
from vllm_supervisor.gpu.ledger import VramLedger
from vllm_supervisor.gpu.nvml import NvmlProbe, open_nvml_probe, scope

ME = os.getpid()


def _uuids(targets):
    return [t.uuid for t in targets]


def test_scope_without_cuda_visible_devices_is_every_gpu():
    nv = FakeNvml(h200s(4))
    targets, note = scope(nv, {})
    assert _uuids(targets) == [g.uuid for g in nv.gpus] and note is None


def test_scope_by_uuid_in_any_order_and_by_unique_prefix():
    nv = FakeNvml(h200s(4))
    g = nv.gpus
    env = {"CUDA_VISIBLE_DEVICES": f"{g[3].uuid},{g[1].uuid[:12]}"}
    assert _uuids(scope(nv, env)[0]) == [g[3].uuid, g[1].uuid]


def test_reordered_ordinals_map_through_pci_bus_ids_not_nvml_position():
    # NVML index order differs from PCI order here: ordinals must follow the bus ids.
    gpus = h200s(3, buses=["00000000:3B:00.0", "00000000:18:00.0", "00000000:86:00.0"])
    nv = FakeNvml(gpus)
    env = {"CUDA_VISIBLE_DEVICES": "2,0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert _uuids(scope(nv, env)[0]) == [gpus[2].uuid, gpus[1].uuid]
    # FASTEST_FIRST on identical GPUs is PCI order too.
    assert _uuids(scope(nv, {"CUDA_VISIBLE_DEVICES": "1"})[0]) == [gpus[0].uuid]


def test_ordinals_on_mixed_gpus_with_fastest_first_watch_every_gpu_and_say_so():
    gpus = h200s(2)
    gpus[1].name, gpus[1].cc = "NVIDIA A100", (8, 0)
    targets, note = scope(FakeNvml(gpus), {"CUDA_VISIBLE_DEVICES": "0"})
    assert len(targets) == 2 and "watching every GPU" in note


def test_mig_uuid_maps_to_its_instance_with_the_parent_index():
    gpus = h200s(2)
    mig = FakeGpu("MIG-aaaa-bbbb", "", used_mib=None, procs=[(ME, None)])
    gpus[1].migs[mig.uuid] = mig
    targets, _ = scope(FakeNvml(gpus), {"CUDA_VISIBLE_DEVICES": "MIG-aaaa-bbbb"})
    assert [(t.index, t.uuid) for t in targets] == [(1, "MIG-aaaa-bbbb")]


def test_invalid_entry_ends_the_list_and_empty_means_no_gpu():
    nv = FakeNvml(h200s(3))
    assert len(scope(nv, {"CUDA_VISIBLE_DEVICES": "1,bogus,2"})[0]) == 1
    targets, note = scope(nv, {"CUDA_VISIBLE_DEVICES": ""})
    assert targets == [] and "empty" in note
    assert open_nvml_probe({"CUDA_VISIBLE_DEVICES": ""}, nv).name == "none"


def test_nvml_init_failure_is_unavailable_with_a_hint():
    probe = open_nvml_probe({}, FakeNvml([], init_error="NVML Shared Library Not Found"))
    assert "no NVIDIA driver" in probe.available()


def test_an_error_on_one_gpu_does_not_sink_the_others():
    gpus = h200s(2)
    gpus[0].error = "Insufficient Permissions"
    gpus[1].procs = [(ME, 1000.0)]
    nv = FakeNvml(gpus)
    readings = NvmlProbe(nv, scope(nv, {})[0]).read()
    assert readings[0].used_mib is None and "check its groups" in readings[0].error
    assert readings[1].used_mib == 615.0 and readings[1].procs == ((ME, 1000.0),)


def _ledger(gpus, tolerance=256.0):
    nv = FakeNvml(gpus)
    ledger = VramLedger(NvmlProbe(nv, scope(nv, {})[0]), tolerance)
    ledger.take_baseline()
    return ledger


def test_release_that_comes_late():
    g = h200s(2)
    ledger = _ledger(g)
    tree = {ME: "VLLM::Worker_TP0"}
    g[1].used_mib, g[1].procs = 40615.0, [(ME, 40000.0)]
    ledger.sample(tree)
    g[1].procs = []  # the process is gone, the driver has not freed the memory yet
    done, v = ledger.check(tree)
    assert not done and v.status == "held" and "40000 MiB over baseline" in v.detail
    g[1].used_mib = 700.0  # within tolerance
    done, v = ledger.check(tree)
    assert done and v.status == "released" and "GPU 1" in v.detail
    assert ledger.peaks()[0]["peak_mib"] == 40000.0


def test_release_that_never_comes_names_foreign_holders():
    g = h200s(1)
    ledger = _ledger(g)
    tree = {ME: "VLLM::Worker_TP0"}
    g[0].used_mib, g[0].procs = 20615.0, [(ME, 10000.0), (1, 10000.0)]
    ledger.sample(tree)
    done, v = ledger.check(tree)
    assert not done and v.status == "held" and [h.pid for h in v.holders] == [ME]
    g[0].procs = [(1, 10000.0)]  # ours is gone; PID 1 keeps an IPC reference
    done, v = ledger.check(tree)
    assert not done and v.status == "held"
    assert [(h.pid, h.ours) for h in v.holders] == [(1, False)] and v.holders[0].user


def test_pids_that_match_nothing_here_are_unattributable():
    g = h200s(1)
    ledger = _ledger(g)
    g[0].used_mib, g[0].procs = 5615.0, [(4_000_000, 5000.0)]  # beyond pid_max: a host PID
    ledger.sample({})
    done, v = ledger.check({})
    assert not done and v.status == "unattributable"


def test_memory_reading_na_is_unattributable_never_released():
    g = h200s(1)
    ledger = _ledger(g)
    g[0].procs = [(ME, None)]
    ledger.sample({ME: "VLLM::Worker_TP0"})
    g[0].used_mib, g[0].procs = None, []
    done, v = ledger.check({ME: "VLLM::Worker_TP0"})
    assert done and v.status == "unattributable" and "N/A" in v.detail


def test_gpus_the_tree_never_touched_are_not_judged():
    g = h200s(2)
    ledger = _ledger(g)
    tree = {ME: "w"}
    g[0].procs = [(ME, 100.0)]
    ledger.sample(tree)
    g[0].procs = []
    g[1].used_mib = 30000.0  # someone else's job on GPU 1 grows after we stopped
    done, v = ledger.check(tree)
    assert done and v.status == "released"
