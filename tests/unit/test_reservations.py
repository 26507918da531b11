"""The host-wide GPU reservation table: what vLLM's arguments claim (gpu/claim.py), the
admission rule (gpu/admission.py), the table's folder rules, entries and stale-entry rules
(gpu/reservations.py) with real processes holding real locks, and many processes admitting
themselves at once. Every file lives under tmp_path; every process a test starts is reaped
by the `children` fixture (by its own PID, nothing else)."""

from __future__ import annotations

import contextlib
import fcntl
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm_supervisor.clock import SystemClock
from vllm_supervisor.errors import ExitCode, SupervisorError, UsageError
from vllm_supervisor.gpu import reservations
from vllm_supervisor.gpu.admission import EPSILON, Wanted, blockers
from vllm_supervisor.gpu.claim import GpuClaim, claim_of, device_count
from vllm_supervisor.gpu.entries import Entry, Share
from vllm_supervisor.gpu.probe import GpuReading
from vllm_supervisor.gpu.reservations import Table, open_table
from vllm_supervisor.host import identity
from vllm_supervisor.host.procinfo import ProcId
from vllm_supervisor.host.proctree import read_proc
from vllm_supervisor.lifecycle.booking import Booking

TOTAL = 81920.0  # MiB
TOLERANCE = 256.0
GA, GB, GC = "GPU-aaaa-0001", "GPU-bbbb-0002", "GPU-cccc-0003"
INDEX = {GA: 0, GB: 1, GC: 2}
FORK = multiprocessing.get_context("fork")


def _reading(uuid: str = GA, used: float | None = 1000.0, procs=(),
             total: float | None = TOTAL) -> GpuReading:
    return GpuReading(INDEX.get(uuid, 0), uuid, used, total, tuple(procs))


def _me() -> ProcId:
    return read_proc(os.getpid(), cmdline=False).ident


def _data(name: str, uuids=(GA,), *, fraction: float = 0.3, state: str = "ready",
          supervisor: ProcId | None = None, tree=(), holders=(),
          unlisted: float | None = None) -> dict:
    """An entry's content as Booking writes it."""
    sup = supervisor or _me()
    return {"name": name, "model": "m", "state": state, "supervisor": [sup.pid, sup.start_ticks],
            "gpus": {u: {"index": INDEX[u], "fraction": fraction, "total_mib": TOTAL,
                         "unlisted_mib": unlisted} for u in uuids},
            "tree": [[p.pid, p.start_ticks] for p in tree], "holders": list(holders),
            "since_wall": 0.0, "replaces": None}


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if p.name.startswith("r-"))


@pytest.fixture
def table(tmp_path) -> Table:
    return open_table(tmp_path / "table")


@pytest.fixture
def children():
    """Processes a test starts (Popen or multiprocessing): killed by their PID and reaped
    at the end, whatever the test did."""
    started: list = []
    yield started
    for p in started:
        if isinstance(p, subprocess.Popen):
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
            p.wait(10)
        else:
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
            assert p.exitcode is not None, f"process {p.pid} not reaped"


# -- 1. claim.py: the GPUs and fraction vLLM's arguments claim ----------------------------

@pytest.mark.parametrize("args, count", [
    ((), 1),
    (("-tp", "2"), 2),
    (("--tensor-parallel-size=4",), 4),
    (("-tp", "2", "-pp", "2"), 4),
    (("--pipeline-parallel-size", "3"), 3),
    (("-tp=2", "-dp", "2"), 4),
    (("--data-parallel-size", "4", "--data-parallel-size-local", "2"), 2),  # multi-node
    (("-dp", "4", "-dpl=1", "-tp", "2"), 2),
    (("-dpl", "2"), 2),
    (("-tp", "2", "--tensor-parallel-size", "8"), 8),  # the last one wins, either spelling
    (("--tensor-parallel-size=8", "-tp=2"), 2),
    (("-tp", "8", "-tp", "1"), 1),
    (("serve-arg", "-pp=2", "--max-model-len", "4096", "-tp", "4"), 8),
])
def test_device_count_is_tp_x_pp_x_local_dp(args, count):
    assert device_count(args) == count


def test_fraction_comes_from_gpu_memory_utilization_else_vllms_default():
    assert claim_of((), None) == GpuClaim(1, 0.9, "vLLM's default --gpu-memory-utilization")
    c = claim_of(("-tp", "2", "--gpu-memory-utilization", "0.45"), None)
    assert (c.count, c.fraction, c.how) == (2, 0.45, "vLLM's --gpu-memory-utilization")
    assert claim_of(("--gpu-memory-utilization=0.3", "--gpu-memory-utilization", "0.6"),
                    None).fraction == 0.6


@pytest.mark.parametrize("kv", [("--kv-cache-memory-bytes", "8G"), ("--kv-cache-memory=8G",)])
def test_a_kv_cache_in_bytes_claims_0_9_and_says_so(kv):
    c = claim_of(("--gpu-memory-utilization", "0.3", *kv), None)
    assert c.fraction == 0.9
    assert "bytes" in c.how and "0.9" in c.how and "--gpu-claim" in c.how


def test_an_explicit_gpu_claim_wins():
    c = claim_of(("-tp", "2", "--gpu-memory-utilization", "0.3", "--kv-cache-memory-bytes",
                  "1G"), 0.55)
    assert c == GpuClaim(2, 0.55, "--gpu-claim")


@pytest.mark.parametrize("args", [
    ("-tp", "0"), ("-tp", "x"), ("--pipeline-parallel-size=-1",), ("-dp", "1.5"),
    ("-dpl", "0"), ("--gpu-memory-utilization", "1.5"), ("--gpu-memory-utilization", "0"),
    ("--gpu-memory-utilization", "nan"), ("--gpu-memory-utilization=inf",),
    ("--gpu-memory-utilization", "half"),
])
def test_bad_values_are_usage_errors(args):
    with pytest.raises(UsageError) as e:
        claim_of(args, None)
    assert e.value.exit_code == ExitCode.USAGE


# -- 2. admission.blockers, decided on Entry/Share/GpuReading objects ------------------------

def _entry(name: str, fraction: float, uuids=(GA,), *, state: str = "ready", eid: str = "",
           pid: int = 100) -> Entry:
    return Entry(eid or "r-" + name.encode().hex()[:16].rjust(16, "0"), 0, True, name, "m", state,
                 ProcId(pid, 1), identity.BOOT_ID, 0,
                 {u: Share(u, INDEX[u], fraction, TOTAL) for u in uuids})


def test_two_entries_at_0_45_admit_nothing_at_0_5_but_a_disjoint_gpu_is_admitted():
    entries = [_entry("alpha", 0.45, (GA, GB), pid=101), _entry("beta", 0.45, (GA,), pid=102)]
    [why] = blockers(Wanted((_reading(GA),), 0.5), entries, {})
    assert why.startswith("GPU 0:") and "reserved" in why and "0.90 reserved" in why
    assert "alpha (0.45, ready, pid 101" in why and "beta (0.45, ready, pid 102" in why
    both = blockers(Wanted((_reading(GA), _reading(GB)), 0.5), entries, {})
    assert [w[:6] for w in both] == ["GPU 0:"]  # GPU 1 holds 0.45 + 0.5: it fits
    assert blockers(Wanted((_reading(GC),), 0.5), entries, {}) == []


def test_fractions_that_add_up_to_exactly_one_are_admitted():
    assert blockers(Wanted((_reading(GA),), 0.55), [_entry("a", 0.45)], {}) == []
    assert 0.33 + 0.56 + 0.11 > 1.0  # in floats: the reason for EPSILON
    pair = [_entry("a", 0.33), _entry("b", 0.56)]
    assert blockers(Wanted((_reading(GA),), 0.11), pair, {}) == []
    thirds = [_entry(f"t{i}", 0.3) for i in range(3)]
    assert blockers(Wanted((_reading(GA),), 0.1), thirds, {}) == []
    assert blockers(Wanted((_reading(GA),), 0.1 + 10 * EPSILON), thirds, {}) != []
    assert blockers(Wanted((_reading(GA),), 0.56), [_entry("a", 0.45)], {}) != []


def test_a_loading_entry_blocks_a_claim_that_would_fit():
    [why] = blockers(Wanted((_reading(GA),), 0.2), [_entry("loader", 0.3, state="loading")], {})
    assert "loading" in why and "loader (0.30, loading" in why
    assert blockers(Wanted((_reading(GB),), 0.2),
                    [_entry("loader", 0.3, state="loading")], {}) == []


def test_ignored_entries_do_not_count():
    old = _entry("old", 0.9, eid="r-00000000000000aa")
    assert blockers(Wanted((_reading(GA),), 0.9), [old], {}) != []
    assert blockers(Wanted((_reading(GA),), 0.9), [old], {},
                    ignore=frozenset({old.id})) == []


def test_the_physical_check_names_nvml_free_memory_and_the_pids():
    busy = _reading(GA, used=TOTAL - 30000.0, procs=((4242, 20000.0), (4343, 9000.0)))
    want = Wanted((_reading(GA),), 0.5)  # 40960 MiB needed, 30000 free
    [why] = blockers(want, [], {GA: busy})
    assert "NVML shows 29.3 GiB free, 40.0 GiB needed" in why and "pids 4242 4343" in why
    assert "no reservation" in why
    assert blockers(want, [], {GA: busy}, physical=False) == []
    assert blockers(Wanted((_reading(GA),), 0.35), [], {GA: busy}) == []  # 28672 fits
    na = _reading(GA, used=None, procs=((4242, None),))
    assert blockers(want, [], {GA: na}) == []  # N/A (MIG): the reservations alone decide
    assert blockers(want, [], {GB: busy}) == []  # no reading of this GPU now


# -- 3. the table's folder, entries, their locks --------------------------------------------

def _refused(d: Path, words: str) -> None:
    with pytest.raises(SupervisorError) as e:
        open_table(d)
    assert e.value.exit_code == ExitCode.START_FAILED and words in e.value.message


def test_the_folder_must_be_a_real_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    _refused(tmp_path / "link", "symbolic link")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    _refused(tmp_path / "dangling", "symbolic link")
    assert not (tmp_path / "nowhere").exists()  # not made through the link
    (tmp_path / "file").write_text("")
    _refused(tmp_path / "file", "not a folder")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a folder to another uid")
def test_a_folder_of_another_uid_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 12345, 12345)
    _refused(d, "belongs to uid 12345")
    d.chmod(0o1777)
    _refused(d, "belongs to uid 12345")


def test_writable_by_others_needs_the_sticky_bit(tmp_path):
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    _refused(d, "without the sticky bit (mode 0777)")
    d.chmod(0o1777)
    assert open_table(d).dir == d
    own = tmp_path / "own"
    own.mkdir()
    own.chmod(0o700)
    assert open_table(own).dir == own


def test_a_missing_folder_is_made_private(tmp_path):
    d = tmp_path / "a" / "b"
    t = open_table(d)
    assert t.dir == d and stat.S_IMODE(os.lstat(d).st_mode) & 0o077 == 0


def test_a_created_entry_is_live_while_its_lock_is_held_and_drop_removes_it(table):
    own = table.create(_data("alpha", (GA, GB), fraction=0.45, state="loading"))
    assert _files(table.dir) == [f"{own.id}.json", f"{own.id}.lock"]
    assert fcntl.fcntl(own.lock_fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC  # vLLM never has it
    entries, notes = table.entries([_reading(GA)], TOLERANCE)
    [e] = entries
    assert notes == [] and e.live and e.id == own.id and e.uid == os.geteuid()
    assert (e.name, e.state, e.supervisor, e.boot_id) == ("alpha", "loading", _me(),
                                                          identity.BOOT_ID)
    assert e.shares[GB] == Share(GB, 1, 0.45, TOTAL, None)
    own.update(state="ready")
    assert table.entries([], TOLERANCE)[0][0].state == "ready"
    assert [p.name for p in table.dir.iterdir() if p.name.endswith(".tmp")] == []
    own.drop()
    assert _files(table.dir) == [] and table.entries([], TOLERANCE) == ([], [])


def test_gpu_locks_are_taken_in_sorted_order_and_a_busy_one_lets_all_go(table, monkeypatch):
    taken = []
    real = fcntl.flock

    def spy(fd, op):
        taken.append(os.path.basename(os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd, op)

    monkeypatch.setattr(reservations.fcntl, "flock", spy)
    with table.try_locked([GC, GA, GB, GA]) as locked:
        assert locked
    assert taken == [f"gpu-{GA}.lock", f"gpu-{GB}.lock", f"gpu-{GC}.lock"]
    monkeypatch.setattr(reservations.fcntl, "flock", real)
    fd = os.open(table.dir / f"gpu-{GB}.lock", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another start being admitted on GPU 1
        with table.try_locked([GB, GA]) as locked:
            assert locked is False
        with table.try_locked([GA, GC]) as locked:  # GPU 0's lock was let go
            assert locked
    finally:
        os.close(fd)
    with table.try_locked([GB]) as locked:
        assert locked


# -- 4. stale entries, with real processes ------------------------------------------------

def _hold_entry(d: str, extra_tree, unlisted, conn) -> None:
    """A child "supervisor": creates its entry (itself as supervisor and tree, plus
    EXTRA_TREE), says its id, and holds the lock until killed (or the test goes away)."""
    me = read_proc(os.getpid(), cmdline=False).ident
    own = Table(Path(d)).create(_data("child", (GA,), fraction=0.4, supervisor=me,
                                      tree=(me, *extra_tree), unlisted=unlisted))
    conn.send((own.id, me))
    conn.poll(60)


def _holder(table: Table, children, extra_tree=(), unlisted=None) -> tuple[str, ProcId, object]:
    here, there = FORK.Pipe()
    p = FORK.Process(target=_hold_entry, args=(str(table.dir), extra_tree, unlisted, there))
    p.start()
    children.append(p)
    assert here.poll(10), "the child did not create its entry"
    eid, ident = here.recv()
    return eid, ident, p


def _kill(p) -> None:
    os.kill(p.pid, signal.SIGKILL)
    if isinstance(p, subprocess.Popen):
        p.wait(10)
    else:
        p.join(10)


def _dead_holder(table: Table, children, **kw) -> tuple[str, ProcId]:
    eid, ident, p = _holder(table, children, **kw)
    _kill(p)
    return eid, ident


def _sleeper(children) -> tuple[subprocess.Popen, ProcId]:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    children.append(p)
    info = read_proc(p.pid, cmdline=False)
    assert info is not None
    return p, info.ident


def test_an_entry_lives_with_its_supervisor_and_goes_with_it(table, children):
    eid, ident, p = _holder(table, children)
    [e] = table.entries([_reading(GA)], TOLERANCE)[0]
    assert e.id == eid and e.live and e.supervisor == ident and e.tree == (ident,)
    _kill(p)
    assert _files(table.dir) == [f"{eid}.json", f"{eid}.lock"]  # the kernel let the lock go
    entries, notes = table.entries([_reading(GA)], TOLERANCE)
    assert entries == [] and len(notes) == 1
    assert notes[0].startswith("dropped the reservation of child") and str(ident.pid) in notes[0]
    assert _files(table.dir) == []


def test_a_dead_entry_counts_while_a_process_of_its_tree_lives(table, children):
    sleeper, sid = _sleeper(children)
    eid, _ = _dead_holder(table, children, extra_tree=(sid,))
    [e] = table.entries([_reading(GA)], TOLERANCE)[0]
    assert not e.live and e.id == eid
    assert "alive" in e.why_kept and str(sid.pid) in e.why_kept
    assert "supervisor gone" in e.describe(GA)
    # and it still makes others wait
    assert blockers(Wanted((_reading(GA),), 0.7), [e], {}) != []
    _kill(sleeper)
    entries, notes = table.entries([_reading(GA)], TOLERANCE)
    assert entries == [] and "dropped" in notes[0] and _files(table.dir) == []


def test_a_dead_entry_counts_while_nvml_lists_its_pid(table, children):
    eid, ident = _dead_holder(table, children)
    listed = _reading(GA, used=30000.0, procs=((ident.pid, 29000.0),))
    [e] = table.entries([listed], TOLERANCE)[0]
    assert e.id == eid and "still hold memory" in e.why_kept and str(ident.pid) in e.why_kept
    # NVML listing it on a GPU of no share of its does not count
    assert table.entries([_reading(GB, procs=((ident.pid, 1.0),))], TOLERANCE)[0] == []
    assert _files(table.dir) == []


def test_a_dead_entry_counts_while_unlisted_memory_stays_above_its_admission(table, children):
    eid, _ = _dead_holder(table, children, unlisted=500.0)
    other = ((4_000_000, 1000.0),)  # not of its tree
    [e] = table.entries([_reading(GA, used=4000.0, procs=other)], TOLERANCE)[0]
    assert e.id == eid and "no process lists" in e.why_kept and "2500 MiB" in e.why_kept
    entries, notes = table.entries([_reading(GA, used=1600.0, procs=other)], TOLERANCE)
    assert entries == [] and "dropped" in notes[0] and _files(table.dir) == []


def test_a_dead_entry_of_another_boot_is_dropped_even_when_its_pids_look_alive(table):
    own = table.create(_data("old-boot", tree=(_me(),)))
    own.update(boot_id="another-boot")
    os.close(own.lock_fd)  # its supervisor is gone (as far as the lock says)
    entries, notes = table.entries([_reading(GA, procs=((os.getpid(), 1.0),))], TOLERANCE)
    assert entries == [] and "dropped" in notes[0] and _files(table.dir) == []


def test_drop_stale_false_leaves_a_dead_entry_in_place(table, children):
    eid, _ = _dead_holder(table, children)
    assert table.entries([], TOLERANCE, drop_stale=False) == ([], [])
    assert _files(table.dir) == [f"{eid}.json", f"{eid}.lock"]


def _garbage(table: Table, eid: str = "r-00000000000000ff") -> Path:
    (table.dir / f"{eid}.json").write_text("{not json")
    return table.dir / f"{eid}.lock"


def test_an_unreadable_entry_counts_only_while_its_lock_is_held(table):
    lock = _garbage(table)
    assert table.entries([], TOLERANCE) == ([], [])  # no lock file at all
    lock.touch()
    assert table.entries([], TOLERANCE) == ([], [])  # a free lock
    assert _files(table.dir) == [lock.stem + ".json", lock.name]  # ignored, not removed
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        [e] = table.entries([], TOLERANCE)[0]
        assert e.name == "(unreadable entry)" and e.live and e.id == lock.stem
    finally:
        os.close(fd)


def test_an_unreadable_held_entry_blocks_admission(table):
    fd = os.open(_garbage(table), os.O_RDONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        entries, _ = table.entries([], TOLERANCE)
        assert len(entries) == 1
        assert blockers(Wanted((_reading(GA),), 0.1), entries, {}) != []
    finally:
        os.close(fd)


# Untrusted content: another local user may put anything into the shared 1777 folder.
_BAD_INDEX = ('{"version": 1, "id": "r-0000000000000001", "name": "x", "state": "ready", '
              '"supervisor": [1, 0], "gpus": {"G": {"index": 1e999, "fraction": 0.5, '
              '"total_mib": 1}}}')


@pytest.mark.parametrize("content", [_BAD_INDEX, "[" * 100_000])
def test_hostile_json_is_ignored_not_raised(table, content):
    (table.dir / "r-0000000000000001.json").write_text(content)
    assert table.entries([], TOLERANCE) == ([], [])


def test_a_folder_named_like_an_entry_is_ignored(table):
    (table.dir / "r-0000000000000002.json").mkdir()
    assert table.entries([], TOLERANCE) == ([], [])


def _returns_within(fn, fifo: Path, timeout: float = 1.0) -> bool:
    """Whether FN returns within TIMEOUT; when it hangs in open() on FIFO, a writer's open
    releases it, so that the thread always ends."""
    done, failed = threading.Event(), []

    def run():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported through the return value
            failed.append(e)
        finally:
            done.set()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    ok = done.wait(timeout)
    if not ok:
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    t.join(5)
    assert not t.is_alive()
    return ok and not failed


@pytest.mark.parametrize("which", ["entry", "gpu-lock"])
def test_a_fifo_in_the_folder_does_not_hang_admission(table, which):
    if which == "entry":
        fifo = table.dir / "r-0000000000000003.json"
        os.mkfifo(fifo)
        ok = _returns_within(lambda: table.entries([], TOLERANCE), fifo)
    else:
        fifo = table.dir / f"gpu-{GA}.lock"
        os.mkfifo(fifo)

        def admit():
            # A planted FIFO is not a lock: one line (SupervisorError), at once, no hang.
            with pytest.raises(SupervisorError, match="unusable"), table.try_locked([GA]):
                pass
        ok = _returns_within(admit, fifo)
    assert ok


# -- the wait loop (lifecycle/booking.py) against the table ---------------------------------

class _Probe:
    name = "fake"

    def available(self):
        return None

    def read(self):
        return [_reading(GA)]


class _Quiet:
    """UI and host: nothing shown, no signal comes."""

    def event(self, *a, **k):
        pass

    def status(self, *a, **k):
        pass

    def clear_status(self):
        pass

    def wait_signals(self, timeout):
        return []

    def self_ident(self):
        from vllm_supervisor.host.linux import LinuxHost

        return LinuxHost().self_ident()


def _booking(table: Table, name: str) -> Booking:
    cfg = SimpleNamespace(gpu_wait_s=0.0, vram_tolerance_mib=TOLERANCE, vram_poll_s=0.01,
                          model="m", url="http://127.0.0.1:1")
    return Booking(table, GpuClaim(1, 0.6, "test"), cfg, _Probe(), _Quiet(), _Quiet(),
                   SystemClock(), name=name)


def test_a_second_booking_that_does_not_fit_is_not_admitted(table):
    first = _booking(table, "first")
    first.admit()
    try:
        assert first.own is not None and first.own.data["state"] == "loading"
        with pytest.raises(SupervisorError) as e:
            _booking(table, "second").admit()
        assert e.value.exit_code == ExitCode.START_FAILED and "GPUs not free" in e.value.message
    finally:
        first.release()
    assert _files(table.dir) == []


class _ThenTable(Table):
    """The table, where THEN runs once right after the first entries() read: another
    supervisor's whole admission in between (a scheduling that can happen any time)."""

    def __init__(self, d: Path, then):
        super().__init__(d)
        self.then = then

    def entries(self, *a, **k):
        out = super().entries(*a, **k)
        if self.then is not None:
            then, self.then = self.then, None
            then()
        return out


def test_an_admission_in_between_read_and_lock_is_seen(table):
    other = _booking(table, "other")
    racy = _booking(_ThenTable(table.dir, other.admit), "racy")
    try:
        with pytest.raises(SupervisorError):
            racy.admit()
    finally:
        racy.release()
        other.release()


# -- 5. many processes admitting themselves at once ------------------------------------------

def _contend(d: str, uuids: tuple[str, ...], start: str, stop: str, deadline_s: float,
             results) -> None:
    """One start: after START appears, retry admission of 0.3 of UUIDS (in this order) until
    admitted or DEADLINE_S; report, and hold what it got until STOP appears. Whenever it
    holds the GPU locks it also records the largest sum of fractions it sees per GPU."""
    table = Table(Path(d))
    readings = [_reading(u) for u in (GA, GB)]
    want = Wanted(tuple(_reading(u) for u in uuids), 0.3)
    while not os.path.exists(start):
        time.sleep(0.0005)
    end = time.monotonic() + deadline_s
    own, rounds, peak = None, 0, {}
    while own is None and time.monotonic() < end:
        with table.try_locked(list(uuids)) as locked:
            if locked:
                rounds += 1
                entries, _ = table.entries(readings, TOLERANCE)
                if not blockers(want, entries, {}, physical=False):
                    own = table.create(_data(f"p{os.getpid()}", uuids, fraction=0.3))
                    entries, _ = table.entries(readings, TOLERANCE)
                for u in uuids:
                    s = sum(e.shares[u].fraction for e in entries if u in e.shares)
                    peak[u] = max(peak.get(u, 0.0), s)
        if own is None:
            time.sleep(0.001)  # back off between tries
    results.put((os.getpid(), own.id if own else None, rounds, peak))
    if own is not None:
        while not os.path.exists(stop):
            time.sleep(0.002)
        own.drop()


def _race(tmp_path, children, orders) -> tuple[list, list[Entry], Table]:
    table = open_table(tmp_path / "table")
    start, stop = tmp_path / "start", tmp_path / "stop"
    results = FORK.Queue()
    procs = [FORK.Process(target=_contend, args=(str(table.dir), order, str(start),
                                                 str(stop), 1.0, results))
             for order in orders]
    for p in procs:
        p.start()
        children.append(p)
    start.touch()
    try:
        got = [results.get(timeout=20) for _ in procs]
        live = table.entries([], TOLERANCE)[0]  # the winners still hold their entries
    finally:
        stop.touch()
        for p in procs:
            p.join(20)
    assert all(p.exitcode == 0 for p in procs)
    return got, live, table


def test_ten_processes_at_once_admit_exactly_three_of_0_3(tmp_path, children):
    got, live, table = _race(tmp_path, children, [(GA,)] * 10)
    winners = [g for g in got if g[1]]
    assert len(winners) == 3 and len(live) == 3  # 3 x 0.3 <= 1.0 < 4 x 0.3
    assert {e.id for e in live} == {g[1] for g in winners}
    assert sum(e.shares[GA].fraction for e in live) == pytest.approx(0.9)
    assert max(g[3][GA] for g in got if g[3]) <= 1.0 + EPSILON
    assert all(g[2] >= 1 for g in got)  # every process was heard at least once
    assert _files(table.dir) == []  # the winners dropped their entries


def test_a_two_gpu_claim_in_either_listed_order_is_atomic(tmp_path, children):
    orders = [(GA, GB) if i % 2 else (GB, GA) for i in range(10)]
    got, live, table = _race(tmp_path, children, orders)
    assert len([g for g in got if g[1]]) == 3 and len(live) == 3
    for u in (GA, GB):
        assert all(u in e.shares for e in live)  # never one GPU without the other
        assert sum(e.shares[u].fraction for e in live) <= 1.0 + EPSILON
        assert max(g[3][u] for g in got if g[3]) <= 1.0 + EPSILON
    assert _files(table.dir) == []
