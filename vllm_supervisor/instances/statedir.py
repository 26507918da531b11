"""The state directory: one JSON record per supervised instance in a private folder, so
that `status`, `stop` and `cleanup` can find a tree even after its supervisor died (the
records themselves: records.py), instance names, and the per-name locks.

The supervisor often runs as root and is trusted with SIGKILL, so the folder is untrusted
until checked: a symbolic link, another user's folder or one that others may write to is
refused, never "repaired". Only `serve` creates it; the other commands change nothing."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import stat
import unicodedata
from pathlib import Path

from vllm_supervisor.errors import SupervisorError, UsageError

ENV_VAR = "VLLM_SUPERVISE_STATE_DIR"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a file name, never a path
# A name with one of these endings would share a file name with another instance's
# stop report, stop request or lock.
RESERVED_SUFFIXES = (".report", ".stop", ".lock")
_HINT = f"use a folder of yours of mode 0700: pass --state-dir or set {ENV_VAR}"


def default_state_dir() -> Path:
    """$XDG_RUNTIME_DIR/vllm-supervise, /run/vllm-supervise for root, else a per-user /tmp."""
    return _where(None)[0]


def _where(path: Path | str | None) -> tuple[Path, bool]:
    """The state directory to use, and whether it is a default location (whose missing
    parents `serve` may create)."""
    if path is not None:
        if str(path) == "":
            raise UsageError("--state-dir must not be empty (that would be the current "
                             "folder)")
        return Path(path), False
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]), False
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "vllm-supervise", True
    if os.geteuid() == 0:
        return Path("/run/vllm-supervise"), True
    return Path(f"/tmp/vllm-supervise-{os.getuid()}"), True


def open_state_dir(path: Path | str | None) -> Path:
    """The state directory for `serve`: created 0700 when missing, else checked (ours, a
    real folder, closed to writers other than us)."""
    d, default = _where(path)
    try:
        if default:
            _make_parents(d.parent)
        os.mkdir(d, 0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise SupervisorError(f"cannot create state directory {d}: {e.strerror}",
                              _HINT) from None
    _check(d)
    return d


def existing_state_dir(path: Path | str | None) -> Path | None:
    """The state directory for the commands that only read it: None when it does not
    exist (nothing is created), else the checked folder."""
    d, _default = _where(path)
    try:
        os.lstat(d)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        raise SupervisorError(f"cannot use state directory {d}: {e.strerror}", _HINT) from None
    _check(d)
    return d


def _make_parents(parent: Path) -> None:
    """Create the missing folders above a default state directory, each 0700."""
    missing = []
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)
        parent = parent.parent
    for p in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(p, 0o700)


def _check(d: Path) -> None:
    """Refuse D unless it is a real folder, ours, and writable by nobody else."""
    try:
        st = os.lstat(d)
    except OSError as e:
        raise SupervisorError(f"cannot use state directory {d}: {e.strerror}", _HINT) from None
    if stat.S_ISLNK(st.st_mode):
        raise SupervisorError(f"state directory {d} is a symbolic link", _HINT)
    if not stat.S_ISDIR(st.st_mode):
        raise SupervisorError(f"state directory {d} is not a folder", _HINT)
    if st.st_uid != os.geteuid():
        raise SupervisorError(f"state directory {d} belongs to uid {st.st_uid}, not to uid "
                              f"{os.geteuid()}", _HINT)
    if st.st_mode & 0o022:
        raise SupervisorError(f"state directory {d} is writable by group or others (mode "
                              f"{stat.S_IMODE(st.st_mode):04o})", _HINT)


def default_name(model: str, port: int) -> str:
    """A name from the model and port, ASCII only: 'Qwen3-0.6B-8000', 'Modèle' -> 'Modele'."""
    last = model.rstrip("/").rsplit("/", 1)[-1]
    ascii_ = unicodedata.normalize("NFKD", last).encode("ascii", "ignore").decode()
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", ascii_).strip("-._")[:80] or "vllm"
    return f"{base}-{port}"


def valid_name(name: str) -> bool:
    """Whether NAME is an instance name: a plain file name, never a path, and none of the
    other files' endings."""
    return bool(NAME_RE.fullmatch(name)) and not name.endswith(RESERVED_SUFFIXES)


def check_name(name: str) -> str:
    """A name usable as a file name, or a usage error."""
    if not valid_name(name):
        raise UsageError(f"bad --name {name!r}: use letters, digits, '.', '_' and '-' (not "
                         f"ending in {', '.join(RESERVED_SUFFIXES)})")
    return name


# -- locks --------------------------------------------------------------------------
def instance_lock_path(d: Path, name: str) -> Path:
    """The file whose flock NAME's supervisor holds for its whole life (/proc/locks shows
    the holder: proof of life no edit of a record can fake)."""
    return Path(d) / f"{name}.lock"


def op_lock_path(d: Path, name: str) -> Path:
    """The file on which `stop`, `cleanup` and a reclaim of NAME take turns."""
    return Path(d) / f".{name}.op.lock"


def try_lock(path: Path) -> int | None:
    """An fd (close-on-exec) holding PATH's exclusive flock, or None when another holds it."""
    return _lock(path, fcntl.LOCK_EX | fcntl.LOCK_NB)


def unlock_and_remove(fd: int, path: Path) -> None:
    """Remove PATH while its lock is still held (so no one can be waiting on the removed
    file: _lock checks it took the file that is there), then let the lock go."""
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    finally:
        os.close(fd)


@contextlib.contextmanager
def op_locked(d: Path, name: str):
    """Take turns on NAME with other operations (blocking; never the instance lock, which
    a live supervisor holds). The lock file goes once NAME has no record left."""
    path = op_lock_path(d, name)
    fd = _lock(path, fcntl.LOCK_EX)
    try:
        yield
    except BaseException:
        os.close(fd)
        raise
    if (Path(d) / f"{name}.json").exists():
        os.close(fd)
    else:
        unlock_and_remove(fd, path)


def _lock(path: Path, how: int) -> int | None:
    """Open PATH (never through a link) and flock it; retry when the file we locked was
    removed or replaced meanwhile, since a lock on an unlinked file guards nothing."""
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                         | os.O_NONBLOCK, 0o600)
        except OSError as e:
            why = "is a symbolic link" if e.errno == errno.ELOOP else e.strerror
            raise SupervisorError(f"lock file {path} {why}", _HINT) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                raise SupervisorError(f"lock file {path} is not a regular file of ours",
                                      f"inspect it, then delete {path}")
            try:
                fcntl.flock(fd, how)
            except BlockingIOError:
                os.close(fd)
                return None
            try:
                now = os.lstat(path)
            except FileNotFoundError:
                now = None
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        if now is not None and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino):
            return fd
        os.close(fd)
