"""The host-wide GPU reservation table, shared by every supervisor on the host.

One folder, shared on purpose (docs/architecture.md, "GPU reservations"):

    gpu-<UUID>.lock   taken (flock, exclusive, never blocking) in sorted UUID order while a
                      start is admitted, so a claim over several GPUs is atomic
    r-<ID>.lock       held (flock, exclusive) by the entry's supervisor for its whole life,
                      and by its death guard until the guard has finished the stop: the
                      kernel drops it when they die, in any PID namespace
    r-<ID>.json       the entry: who claims what on which GPUs, its state, its tree's
                      identities; replaced atomically

An entry whose lock is free belongs to a dead supervisor. It keeps counting as long as the
kernel shows any of its tree's processes alive or NVML lists them, or memory no process
lists stays above what it was at admission; then whoever reads the table drops it (the
reader removes the files when they are its own user's, and otherwise ignores them). An
entry only ever makes others wait: nothing in it is signalled or deleted but itself.
What is in an entry is untrusted; who wrote it is the file's owner, as the kernel says.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from vllm_supervisor.errors import ExitCode, SupervisorError
from vllm_supervisor.gpu.probe import GpuReading, unlisted_mib
from vllm_supervisor.host import identity
from vllm_supervisor.host.procinfo import ProcId

VERSION = 1
SHARED_DIR = Path("/run/vllm-supervise-gpu")
DIR_ENV = "VLLM_SUPERVISE_RESERVATIONS_DIR"
MAX_ENTRY_BYTES = 256 * 1024
MAX_TREE = 512
LOADING = "loading"  # admitted, not ready yet: no other load may start on its GPUs
STATES = ("replacing", LOADING, "ready", "stopping", "restarting", "held")
_ID = re.compile(r"r-[0-9a-f]{16}")
_UUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HINT = ("give another folder with --reservations-dir, or --no-reservations; "
         "docs/architecture.md, \"GPU reservations\"")


@dataclass(frozen=True)
class Share:
    """One GPU of an entry: FRACTION of TOTAL_MIB, and the memory no process listed on it
    at admission (driver, stale handles), against which a dead entry's GPU is judged."""

    uuid: str
    index: int
    fraction: float
    total_mib: float
    unlisted_mib: float | None = None


@dataclass(frozen=True)
class Entry:
    """One supervisor's claim, as read (untrusted content, kernel-given UID and liveness)."""

    id: str
    uid: int
    live: bool  # its supervisor (or death guard) holds its lock
    name: str
    model: str
    state: str
    supervisor: ProcId
    boot_id: str
    pidns: int
    shares: dict[str, Share]
    tree: tuple[ProcId, ...] = ()
    holders: tuple[int, ...] = ()
    since_wall: float = 0.0
    replaces: str | None = None
    why_kept: str = ""  # for a dead entry that still counts: why

    def describe(self, uuid: str) -> str:
        """'NAME (0.45, ready, pid 123, uid 0)' for one of its GPUs."""
        share = self.shares.get(uuid)
        frac = f"{share.fraction:.2f}" if share else "?"
        who = f"pid {self.supervisor.pid}" if self.live else f"supervisor gone: {self.why_kept}"
        return f"{self.name} ({frac}, {self.state}, {who}, uid {self.uid})"


@dataclass
class OwnEntry:
    """The entry this supervisor wrote, with the fd of its held lock."""

    table: Table
    id: str
    lock_fd: int
    data: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """Its JSON file."""
        return self.table.dir / f"{self.id}.json"

    def update(self, **fields) -> None:
        """Change fields and rewrite the file atomically (a failure is the caller's to
        report: the old content stays)."""
        self.data.update(fields)
        self.data["updated_wall"] = round(time.time(), 3)
        _write_atomic(self.path, self.data)

    def drop(self) -> None:
        """Remove the entry (the JSON first: a reader then never sees it without its lock),
        then let the lock go."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.table.dir / f"{self.id}.lock")
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)


def default_dir(env: dict[str, str]) -> tuple[Path, str | None]:
    """The table's folder, and a note when it is shared with this user's supervisors only.
    Root: SHARED_DIR (made mode 1777, sticky, for everyone). Another user: SHARED_DIR when
    root made it; else $XDG_RUNTIME_DIR/vllm-supervise-gpu (private)."""
    if env.get(DIR_ENV):
        return Path(env[DIR_ENV]), None
    if os.geteuid() == 0 or _trusted_shared(SHARED_DIR):
        return SHARED_DIR, None
    runtime = env.get("XDG_RUNTIME_DIR") or f"/tmp/vllm-supervise-{os.geteuid()}"
    return (Path(runtime) / "vllm-supervise-gpu",
            (f"{SHARED_DIR} does not exist: GPU reservations are shared only with uid "
            f"{os.geteuid()}'s supervisors (root can create it: docs/architecture.md)"))


def _trusted_shared(d: Path) -> bool:
    try:
        st = os.lstat(d)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and bool(st.st_mode & stat.S_ISVTX)


def open_table(d: Path) -> Table:
    """The table in D, made if missing (1777 + sticky when it is SHARED_DIR, else 0700).
    Refused unless D is a real folder owned by root or by us, and writable by others only
    with the sticky bit (no one may remove or replace another's files)."""
    d = Path(d)
    try:
        if not d.exists() and not d.is_symlink():
            shared = d == SHARED_DIR
            with contextlib.suppress(FileExistsError):
                os.makedirs(d.parent, exist_ok=True)
                os.mkdir(d, 0o700)
                if shared:
                    os.chmod(d, 0o1777)
        st = os.lstat(d)
    except OSError as e:
        raise SupervisorError(f"cannot use the GPU reservation folder {d}: {e.strerror}",
                              _HINT, ExitCode.START_FAILED) from None
    why = None
    if not stat.S_ISDIR(st.st_mode):
        why = "is not a folder (a symbolic link?)"
    elif st.st_uid not in (0, os.geteuid()):
        why = f"belongs to uid {st.st_uid}, neither root nor us"
    elif st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        why = f"is writable by others without the sticky bit (mode {stat.S_IMODE(st.st_mode):04o})"
    if why:
        raise SupervisorError(f"GPU reservation folder {d} {why}", _HINT, ExitCode.START_FAILED)
    return Table(d)


def _write_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _open_lock(path: Path, create: bool) -> int:
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    return os.open(path, flags, 0o644)


def _pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


class Table:
    """The reservation folder."""

    def __init__(self, d: Path):
        self.dir = Path(d)

    # -- the GPU locks ----------------------------------------------------------------
    @contextlib.contextmanager
    def try_locked(self, uuids):
        """Yield True with every GPU's lock held (taken in sorted order), or False at once
        when one is busy (another start is being admitted): never blocks, so a lock held
        forever can only make us wait, within --gpu-wait."""
        fds: list[int] = []
        try:
            for uuid in sorted(set(uuids)):
                fd = _open_lock(self.dir / f"gpu-{_safe(uuid)}.lock", create=True)
                fds.append(fd)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
            yield True
        finally:
            for fd in fds:
                os.close(fd)

    # -- entries -----------------------------------------------------------------------
    def create(self, data: dict) -> OwnEntry:
        """A new entry holding its lock (call with the GPU locks held)."""
        while True:
            eid = "r-" + secrets.token_hex(8)
            lock = self.dir / f"{eid}.lock"
            try:
                fd = os.open(lock, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o644)
            except FileExistsError:
                continue
            break
        fcntl.flock(fd, fcntl.LOCK_EX)  # ours alone: it did not exist a moment ago
        own = OwnEntry(self, eid, fd, {"version": VERSION, "id": eid, **data,
                                       "boot_id": identity.BOOT_ID, "pidns": _pidns()})
        try:
            own.update()
        except BaseException:
            own.drop()
            raise
        return own

    def entries(self, readings: list[GpuReading], tolerance_mib: float,
                drop_stale: bool = True) -> tuple[list[Entry], list[str]]:
        """The entries that count (live, or dead but still holding), and one line per
        entry dropped or ignored. READINGS: every GPU the caller's probe sees now."""
        counted, notes = [], []
        for path in sorted(self.dir.glob("r-*.json")):
            entry = self._read(path)
            if entry is None:
                continue
            if entry.live:
                counted.append(entry)
                continue
            kept = _still_holds(entry, readings, tolerance_mib)
            if kept:
                counted.append(_with(entry, why_kept=kept))
            elif drop_stale:
                notes.append(self._drop_dead(path, entry))
        return counted, notes

    def _read(self, path: Path) -> Entry | None:
        eid = path.name[:-5]
        if not _ID.fullmatch(eid):
            return None
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None  # gone in between, or a symbolic link
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(MAX_ENTRY_BYTES + 1)
        live = self._held(eid)
        try:
            if len(raw) > MAX_ENTRY_BYTES or not stat.S_ISREG(st.st_mode):
                raise ValueError("not a plain entry")
            return _parse(eid, st.st_uid, live, json.loads(raw))
        except (ValueError, TypeError, KeyError, AttributeError):
            # Unreadable: it counts only while somebody holds its lock, as a whole GPU.
            if not live:
                return None
            return Entry(eid, st.st_uid, True, "(unreadable entry)", "", "unknown",
                         ProcId(0, 0), "", 0, {})

    def _held(self, eid: str) -> bool:
        try:
            fd = _open_lock(self.dir / f"{eid}.lock", create=False)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            return True
        finally:
            os.close(fd)

    def _drop_dead(self, path: Path, entry: Entry) -> str:
        what = f"dropped the reservation of {entry.name} (supervisor pid " \
               f"{entry.supervisor.pid} gone, its tree gone, its memory back)"
        if entry.uid != os.geteuid():
            return what.replace("dropped", "ignored") + f": left for uid {entry.uid}"
        for p in (path, self.dir / f"{entry.id}.lock"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        return what


def _safe(uuid: str) -> str:
    if _UUID.fullmatch(uuid):
        return uuid
    return "x" + uuid.encode().hex()[:120]


def _with(entry: Entry, **changes) -> Entry:
    from dataclasses import replace

    return replace(entry, **changes)


def _parse(eid: str, uid: int, live: bool, d: dict) -> Entry:
    if d.get("version") != VERSION or d.get("id") != eid:
        raise ValueError("another version")
    shares = {}
    for uuid, s in dict(d["gpus"]).items():
        frac = float(s["fraction"])
        if not 0 < frac <= 1:
            raise ValueError("bad fraction")
        unlisted = s.get("unlisted_mib")
        shares[str(uuid)] = Share(str(uuid), int(s["index"]), frac, float(s["total_mib"]),
                                  None if unlisted is None else float(unlisted))
    sup = d["supervisor"]
    tree = tuple(ProcId(int(p), int(t)) for p, t in list(d.get("tree", ()))[:MAX_TREE])
    return Entry(eid, uid, live, str(d.get("name", "?"))[:120], str(d.get("model", ""))[:200],
                 str(d.get("state", "unknown"))[:20], ProcId(int(sup[0]), int(sup[1])),
                 str(d.get("boot_id", "")), int(d.get("pidns", 0)), shares, tree,
                 tuple(int(p) for p in list(d.get("holders", ()))[:MAX_TREE]),
                 float(d.get("since_wall", 0)), d.get("replaces"))


def _still_holds(entry: Entry, readings: list[GpuReading], tolerance_mib: float) -> str:
    """Why a dead supervisor's entry still counts ('' when it can be dropped): a process
    of its tree alive (by identity, in our PID namespace) or listed by NVML on its GPUs, or
    memory no process lists above what it was at admission."""
    if entry.boot_id and entry.boot_id != identity.BOOT_ID:
        return ""  # from an earlier boot: nothing of it can be alive
    same_ns = entry.pidns == _pidns()
    if same_ns:
        alive = [p.pid for p in (entry.supervisor, *entry.tree) if identity.alive(p)]
        if alive:
            return f"pids {' '.join(map(str, alive[:8]))} of its tree alive"
    elif not _pidns_gone(entry.pidns):
        return "its PID namespace (a container?) still has processes, which we cannot see"
    pids = {p.pid for p in entry.tree} | set(entry.holders)
    for r in readings:
        share = entry.shares.get(r.uuid)
        if share is None:
            continue
        listed = [pid for pid, _ in r.procs if pid in pids] if same_ns else []
        if listed:
            return f"pids {' '.join(map(str, listed))} still hold memory on GPU {r.index}"
        unlisted = unlisted_mib(r)
        if share.unlisted_mib is not None and unlisted is not None \
                and unlisted - share.unlisted_mib > tolerance_mib:
            return (f"GPU {r.index} has {unlisted - share.unlisted_mib:.0f} MiB more that no "
                    "process lists than at its admission")
    return ""


def _pidns_gone(ino: int) -> bool:
    """No process we can see lives in PID namespace INO (False when we cannot tell)."""
    if not ino:
        return False
    unknown = False
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}/ns/pid").st_ino == ino:
                return False
        except PermissionError:
            unknown = True
        except OSError:
            continue
    return not unknown
