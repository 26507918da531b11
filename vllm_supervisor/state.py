"""Instance records: one JSON file per supervised instance in a private state directory,
so that `status`, `stop` and `cleanup` can find a tree even after its supervisor died."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from pathlib import Path

from vllm_supervisor.errors import SupervisorError, UsageError

ENV_VAR = "VLLM_SUPERVISE_STATE_DIR"


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
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise UsageError(f"bad --name {name!r}: use letters, digits, '.', '_' and '-'")
    return name


def write_json_atomic(path: Path, data: dict) -> None:
    """Write, fsync-free but atomic: readers see the old file or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def read_record(path: Path) -> dict:
    """A record, or SupervisorError saying why it cannot be read (never a traceback)."""
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise SupervisorError(f"record {path.name} cannot be read: {e.strerror}") from None
    except ValueError as e:
        raise SupervisorError(f"record {path.name} is corrupted or truncated ({e})",
                              f"inspect it, then delete {path}") from None
    need = {"name", "supervisor", "vllm", "tree"}
    if not isinstance(data, dict) or not need <= set(data):
        raise SupervisorError(f"record {path.name} is incomplete (missing "
                              f"{', '.join(sorted(need - set(data or {})))})",
                              f"inspect it, then delete {path}")
    return data


def records(d: Path) -> list[tuple[Path, dict | SupervisorError]]:
    """Every record in D: (path, record or the error that makes it unreadable)."""
    out: list[tuple[Path, dict | SupervisorError]] = []
    for p in sorted(d.glob("*.json")):
        if p.name.endswith((".report.json", ".stop.json")):
            continue
        try:
            out.append((p, read_record(p)))
        except SupervisorError as e:
            out.append((p, e))
    return out


@contextlib.contextmanager
def locked(d: Path, name: str):
    """An exclusive lock for acting on NAME (two `stop` calls take turns)."""
    with open(d / f".{name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class Registry:
    """The supervisor's side: publishes its record as the run goes."""

    def __init__(self, d: Path, name: str):
        self.dir, self.name = d, name
        self.path = d / f"{name}.json"
        self.data: dict = {}

    def publish(self, **fields) -> None:
        """Update fields and rewrite the record."""
        self.data.update(fields, updated_wall=round(time.time(), 3))
        write_json_atomic(self.path, self.data)

    def stop_request(self) -> dict | None:
        """Options a `vllm-supervise stop` left for this run (its --grace), once."""
        p = self.dir / f"{self.name}.stop.json"
        try:
            data = json.loads(p.read_text())
            p.unlink()
            return data if isinstance(data, dict) else None
        except (OSError, ValueError):
            return None

    def finish(self, report: dict, complete: bool) -> None:
        """Leave the report for `stop`; drop the record after a complete stop, else mark it."""
        write_json_atomic(self.dir / f"{self.name}.report.json", report)
        if complete:
            self.path.unlink(missing_ok=True)
            # The lock too: names like "<model>-<port>" would otherwise pile up. A `stop`
            # holding it keeps its open file; the next one makes a fresh one.
            (self.dir / f".{self.name}.lock").unlink(missing_ok=True)
        else:
            self.publish(state="incomplete-stop", exit_code=report.get("exit_code"),
                         exit_meaning=report.get("exit_meaning"))
