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
import errno
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
from vllm_supervisor.gpu.entries import (
    LOADING,
    VERSION,
    Entry,
    parse,
    pidns,
    still_holds,
    with_,
)
from vllm_supervisor.gpu.probe import GpuReading, unlisted_mib
from vllm_supervisor.host import identity
from vllm_supervisor.host.procinfo import ProcId

SHARED_DIR = Path("/run/vllm-supervise-gpu")
DIR_ENV = "VLLM_SUPERVISE_RESERVATIONS_DIR"
MAX_ENTRY_BYTES = 256 * 1024
STATES = ("replacing", LOADING, "ready", "stopping", "restarting", "held")
_ID = re.compile(r"r-[0-9a-f]{16}")
_UUID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_HINT = ("give another folder with --reservations-dir, or --no-reservations; "
         "docs/architecture.md, \"GPU reservations\"")


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


def _open_plain(path: Path, create: bool = False) -> int:
    """An fd on PATH, only if it is a plain file: O_NONBLOCK so that a FIFO planted under
    the name cannot hang the open, O_NOFOLLOW so a link is refused (OSError otherwise)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK \
        | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise IsADirectoryError(errno.EINVAL, "not a plain file", str(path))
    return fd


def _open_lock(path: Path, create: bool) -> int:
    return _open_plain(path, create)


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
                path = self.dir / f"gpu-{_safe(uuid)}.lock"
                try:
                    fd = _open_lock(path, create=True)
                except OSError as e:
                    owner = _owner(path)
                    raise SupervisorError(f"GPU lock file {path} is unusable ({e.strerror}; "
                                          f"made by uid {owner})", _HINT,
                                          ExitCode.START_FAILED) from None
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
                                       "boot_id": identity.BOOT_ID, "pidns": pidns()})
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
            kept = still_holds(entry, readings, tolerance_mib)
            if kept:
                counted.append(with_(entry, why_kept=kept))
            elif drop_stale:
                notes.append(self._drop_dead(path, entry))
        return counted, notes

    def gpu_rows(self, readings: list[GpuReading], tolerance_mib: float) -> list[dict]:
        """Per GPU, for `status` (gpu_rows below); reads only: nothing is dropped."""
        return gpu_rows(readings, self.entries(readings, tolerance_mib, drop_stale=False)[0])

    def _read(self, path: Path) -> Entry | None:
        eid = path.name[:-5]
        if not _ID.fullmatch(eid):
            return None
        try:
            fd = _open_plain(path)
        except OSError:
            return None  # gone in between, a link, a folder or a FIFO: not an entry
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read(MAX_ENTRY_BYTES + 1)
        live = self._held(eid)
        try:
            if len(raw) > MAX_ENTRY_BYTES:
                raise ValueError("too large")
            return parse(eid, st.st_uid, live, json.loads(raw))
        except Exception:  # noqa: BLE001 - untrusted content: any failure is "unreadable"
            # Unreadable: it counts only while somebody holds its lock, as a whole GPU.
            if not live:
                return None
            return Entry(eid, st.st_uid, True, "(unreadable entry)", "", "unknown",
                         ProcId(0, 0), "", 0, {})

    def _held(self, eid: str) -> bool:
        try:
            fd = _open_lock(self.dir / f"{eid}.lock", create=False)
        except OSError:
            return False  # no lock file (or not a plain one): nobody holds the entry
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


def gpu_rows(readings: list[GpuReading], entries: list[Entry]) -> list[dict]:
    """Per GPU: total, baseline (memory no process lists: the driver's own), used now, and
    who reserves what (ENTRIES: the table's, [] where there is no table)."""
    rows = []
    for r in readings:
        held = [{"id": e.id, "name": e.name, "fraction": e.shares[r.uuid].fraction, "state": e.state,
                 "supervisor_pid": e.supervisor.pid, "uid": e.uid, "live": e.live,
                 "kept_because": e.why_kept or None}
                for e in entries if r.uuid in e.shares]
        rows.append({"gpu": r.index, "uuid": r.uuid, "total_mib": r.total_mib,
                     "baseline_mib": unlisted_mib(r), "used_mib": r.used_mib,
                     "reserved": round(sum(h["fraction"] for h in held), 4),
                     "reserved_by": held})
    return rows


def _owner(path: Path) -> str:
    try:
        return str(os.lstat(path).st_uid)
    except OSError:
        return "?"


def _safe(uuid: str) -> str:
    if _UUID.fullmatch(uuid):
        return uuid
    return "x" + uuid.encode().hex()[:120]


