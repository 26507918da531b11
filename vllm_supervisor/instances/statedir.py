"""The state directory: one JSON record per supervised instance in a private folder, so
that `status`, `stop` and `cleanup` can find a tree even after its supervisor died (the
records themselves: records.py), instance names, and the per-name lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from pathlib import Path

from vllm_supervisor.errors import SupervisorError, UsageError

ENV_VAR = "VLLM_SUPERVISE_STATE_DIR"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # a file name, never a path


def default_state_dir() -> Path:
    """$XDG_RUNTIME_DIR/vllm-supervise, /run/vllm-supervise for root, else a per-user /tmp."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    if os.environ.get("XDG_RUNTIME_DIR"):
        return Path(os.environ["XDG_RUNTIME_DIR"]) / "vllm-supervise"
    if os.geteuid() == 0:
        return Path("/run/vllm-supervise")
    return Path(f"/tmp/vllm-supervise-{os.getuid()}")


def open_state_dir(path: Path | None) -> Path:
    """Create (0700) or check the state directory: ours, and closed to others."""
    d = Path(path) if path else default_state_dir()
    try:
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.stat()
    except OSError as e:
        raise SupervisorError(f"cannot use state directory {d}: {e.strerror}",
                              f"pass --state-dir or set {ENV_VAR}") from None
    if st.st_uid != os.geteuid():
        raise SupervisorError(f"state directory {d} belongs to uid {st.st_uid}, not to us",
                              f"pass --state-dir or set {ENV_VAR}")
    if st.st_mode & 0o077:
        os.chmod(d, 0o700)
    return d


def default_name(model: str, port: int) -> str:
    """A name from the model and port: 'Qwen3-0.6B-8000'."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "-", model.rstrip("/").rsplit("/", 1)[-1]) or "vllm"
    return f"{base}-{port}"


def check_name(name: str) -> str:
    """A name usable as a file name, or a usage error."""
    if not NAME_RE.fullmatch(name):
        raise UsageError(f"bad --name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


@contextlib.contextmanager
def locked(d: Path, name: str):
    """An exclusive lock for acting on NAME (two `stop` calls take turns)."""
    with open(d / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
