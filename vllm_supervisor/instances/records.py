"""Instance records: the typed, versioned record each supervised instance keeps in the state
directory, its one reader (which trusts nothing on disk) and its one writer."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import stat
import tempfile
import threading
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from vllm_supervisor.errors import SupervisorError
from vllm_supervisor.host.procinfo import ProcId
from vllm_supervisor.instances.statedir import NAME_RE, valid_name

SCHEMA_VERSION = 1
# lifecycle.config.DEFAULT_VRAM_TOLERANCE_MIB, repeated here because instances sits below
# lifecycle; it applies only to trees that have no record of their own.
DEFAULT_VRAM_TOLERANCE_MIB = 256.0
MAX_BYTES = 4 << 20  # a record of thousands of processes stays far below this
SHM_DIR = "/dev/shm/"


def _rule(test, want: str, **kw):
    """A field whose decoded value (when not None) must pass TEST, described as WANT."""
    return field(metadata={"test": test, "want": want}, **kw)


def _at_least(n: int, **kw):
    return _rule(lambda v: v >= n, f"a number >= {n}", **kw)


def _limit():
    # A wait or tolerance the user may set to infinity (`--grace inf`: wait as long as it
    # takes); Python's json writes and reads it as Infinity.
    return field(metadata={"test": lambda v: v >= 0, "want": "a number >= 0 or Infinity",
                           "unbounded": True})


def _plain(limit: int, **kw):
    return _rule(lambda v: len(v) <= limit and v.isprintable(),
                 f"a printable string of at most {limit} characters", **kw)


def _tmpdir_ok(p: str) -> bool:
    # Removed with rmtree after a stop: only ever a folder Leftovers made.
    return os.path.isabs(p) and os.path.normpath(p) == p \
        and os.path.basename(p).startswith("vllm-supervise-")


def _shm_ok(p: str) -> bool:
    # Unlinked after a stop: only ever a plain name directly in /dev/shm.
    name = p[len(SHM_DIR):]
    return p.startswith(SHM_DIR) and name not in ("", ".", "..") and "/" not in name


@dataclass(frozen=True)
class ProcRef:
    """A process of the tree as recorded: its identity and its title then."""

    pid: int = _at_least(1)
    start_ticks: int = _at_least(0)
    title: str = ""

    @property
    def ident(self) -> ProcId:
        """The (pid, start_ticks) identity."""
        return ProcId(self.pid, self.start_ticks)


@dataclass(frozen=True)
class VllmRef:
    """The launched `vllm serve`: its identity and the group and session it leads."""

    pid: int = _at_least(1)
    pgid: int = _at_least(1)
    sid: int = _at_least(1)
    start_ticks: int = _at_least(0)
    ident = ProcRef.ident  # the (pid, start_ticks) identity, as for any recorded process


@dataclass(frozen=True)
class GpuEntry:
    """One GPU in scope: its baseline before launch, and whether the tree was seen on it."""

    uuid: str = _rule(lambda v: 0 < len(v) <= 128 and v.isprintable(), "a GPU UUID")
    index: int | None = _at_least(0)
    baseline_mib: float | None = _at_least(0)
    used: bool = False


@dataclass(frozen=True)
class Budget:
    """The instance's stop settings: grace, kill wait, VRAM wait and VRAM tolerance."""

    grace_s: float = _limit()
    kill_wait_s: float = _limit()
    vram_timeout_s: float = _limit()
    vram_tolerance_mib: float = _limit()


# For a tree found without a record (an orphaned `vllm serve`): what cleanup always used.
UNRECORDED_BUDGET = Budget(10.0, 10.0, 30.0, DEFAULT_VRAM_TOLERANCE_MIB)


@dataclass(frozen=True)
class InstanceRecord:
    """Everything `status`, `stop` and `cleanup` know about one supervised instance."""

    name: str = _rule(valid_name, "a plain name (letters, digits, '.', '_', '-')")
    boot_id: str = _plain(64)
    supervisor: ProcRef
    vllm: VllmRef
    model: str
    port: int = _rule(lambda v: 0 <= v <= 65535, "a port number")
    url: str
    argv: tuple[str, ...]
    state: str = _rule(re.compile(r"[a-z][a-z-]{0,39}").fullmatch, "a state such as 'ready'")
    started_wall: float = _at_least(0)
    updated_wall: float = _at_least(0)
    budget: Budget
    ready_wall: float | None = _at_least(0, default=None)
    stop_reason: str | None = None
    tmpdir: str | None = _rule(_tmpdir_ok, "an absolute vllm-supervise-* folder",
                               default=None)
    shm: tuple[str, ...] = _rule(lambda t: all(map(_shm_ok, t)),
                                 f"a list of {SHM_DIR}NAME paths", default=())
    tree: tuple[ProcRef, ...] = ()
    gpus: tuple[GpuEntry, ...] = _rule(lambda t: len({g.uuid for g in t}) == len(t),
                                       "a list of GPUs with distinct UUIDs", default=())
    exit_code: int | None = _rule(lambda v: 0 <= v <= 255, "an exit status 0-255",
                                  default=None)
    exit_meaning: str | None = None
    probe: str | None = _plain(300, default=None)  # the progress probe's last result
    probe_wall: float | None = _at_least(0, default=None)
    schema_version: int = SCHEMA_VERSION

    @property
    def file_name(self) -> str:
        """`<name>.json`."""
        return f"{self.name}.json"


class RecordError(SupervisorError):
    """An instance record that cannot be used: unreadable, corrupted, or not our schema."""


def stop_budget(rec: InstanceRecord | None, grace: float | None = None) -> Budget:
    """The budget a stop from outside the supervisor uses: the instance's recorded one (the
    cleanup defaults for a tree without a record), an explicit --grace replacing its grace."""
    b = rec.budget if rec is not None else UNRECORDED_BUDGET
    return b if grace is None else dataclasses.replace(b, grace_s=float(grace))


_TMP_SUFFIX = re.compile(r"[A-Za-z0-9_]+")  # what tempfile.mkdtemp appends


def removable_tmpdir(rec: InstanceRecord) -> Path | None:
    """REC's private TMPDIR when it is provably one its supervisor made (host/leftovers.py):
    a real folder of ours, directly in our temp dir, named vllm-supervise-<the record's
    supervisor pid>-<suffix>; else None: the record's word alone removes nothing."""
    p, prefix = Path(rec.tmpdir or "."), f"vllm-supervise-{rec.supervisor.pid}-"
    if not (rec.tmpdir and os.path.normpath(rec.tmpdir) == rec.tmpdir
            and str(p.parent) == os.path.normpath(tempfile.gettempdir())
            and p.name.startswith(prefix) and _TMP_SUFFIX.fullmatch(p.name[len(prefix):])):
        return None
    try:
        st = os.lstat(p)
    except OSError:
        return None
    return p if stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() else None


# -- the reader ---------------------------------------------------------------------
def read_record(path: Path) -> InstanceRecord:
    """The record at PATH, or RecordError saying in one line why it cannot be used."""
    path = Path(path)
    label = _label(path)
    hint = f"inspect it, then delete {_shown(str(path))}"
    stem = path.name.removesuffix(".json")
    if not (path.name.endswith(".json") and valid_name(stem)):
        raise RecordError(f"record file {label} is not named <name>.json", hint)
    data = _load(path, label, hint)
    if not isinstance(data, dict):
        raise RecordError(f"record {label} is not a JSON object", hint)
    if "schema_version" not in data:
        raise RecordError(f"record {label} has no schema_version (an older vllm-supervise "
                          "wrote it?)", hint)
    version = data["schema_version"]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise RecordError(f"record {label} has schema version {_show(version)}; this "
                          f"vllm-supervise reads version {SCHEMA_VERSION}",
                          "use the vllm-supervise that wrote it, or " + hint)
    try:
        rec = _decode(InstanceRecord, data, "")
    except _Bad as e:
        raise RecordError(f"record {label}: {e}", hint) from None
    if rec.file_name != path.name:
        raise RecordError(f"record {label} names another instance, {rec.name!r}", hint)
    return rec


def _load(path: Path, label: str, hint: str):
    """The JSON in PATH: a regular file of ours, not too large, not a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        why = "is a symbolic link" if os.path.islink(path) else f"cannot be read: {e.strerror}"
        raise RecordError(f"record {label} {why}", hint) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RecordError(f"record {label} is not a regular file", hint)
        if st.st_uid != os.geteuid():
            raise RecordError(f"record {label} belongs to uid {st.st_uid}, not to us", hint)
        raw = b""
        while len(raw) <= MAX_BYTES and (chunk := os.read(fd, MAX_BYTES + 1 - len(raw))):
            raw += chunk
    except OSError as e:
        raise RecordError(f"record {label} cannot be read: {e.strerror}", hint) from None
    finally:
        os.close(fd)
    if len(raw) > MAX_BYTES:
        raise RecordError(f"record {label} is larger than {MAX_BYTES >> 20} MiB", hint)
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." thousands deep
        why = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise RecordError(f"record {label} is corrupted or truncated ({_shown(why)})",
                          hint) from None


class _Bad(Exception):
    """A field that does not decode: its dotted path, what it should be and what it is."""

    def __init__(self, where: str, want: str, got=None, text: str | None = None):
        super().__init__(text or f"field {where or 'record'!r} must be {want}, "
                                 f"not {_show(got)}")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _decode(cls, data, where: str):
    """An instance of the frozen dataclass CLS from DATA, every field checked."""
    if not isinstance(data, dict):
        raise _Bad(where, "an object", data)
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    missing = [n for n in names if n not in data]
    if missing:
        raise _Bad(where, "", text=f"missing field {_join(where, missing)}")
    extra = sorted(str(k) for k in data if k not in names)
    if extra:
        raise _Bad(where, "", text=f"unknown field {_join(where, extra)}")
    out = {}
    for f in fields:
        at = f"{where}.{f.name}" if where else f.name
        raw = data[f.name]
        if f.metadata.get("unbounded") and isinstance(raw, float) and raw == math.inf:
            value = raw
        else:
            value = _value(_hints(cls)[f.name], raw, at)
        test = f.metadata.get("test")
        if test is not None and value is not None and not test(value):
            raise _Bad(at, f.metadata["want"], raw)
        out[f.name] = value
    return cls(**out)


def _value(tp, v, at: str):
    """V decoded as type TP: int, float, str, bool, X | None, tuple[X, ...], a dataclass."""
    if typing.get_origin(tp) in (types.UnionType, typing.Union):
        if v is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _value(inner, v, at)
    if typing.get_origin(tp) is tuple:
        if not isinstance(v, list):
            raise _Bad(at, "a list", v)
        inner = typing.get_args(tp)[0]
        return tuple(_value(inner, x, f"{at}[{i}]") for i, x in enumerate(v))
    if dataclasses.is_dataclass(tp):
        return _decode(tp, v, at)
    ok = {bool: isinstance(v, bool), str: isinstance(v, str),
          int: isinstance(v, int) and not isinstance(v, bool),
          float: is_finite_number(v)}
    if not ok[tp]:
        raise _Bad(at, _WANT[tp], v)
    return float(v) if tp is float else v


_WANT = {bool: "true or false", str: "a string", int: "an integer", float: "a finite number"}


def is_finite_number(v) -> bool:
    """A JSON number (not a bool) that is a finite float."""
    if not isinstance(v, int | float) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(float(v))
    except OverflowError:  # an integer too large for a float
        return False


def _join(where: str, keys: list[str]) -> str:
    shown = ", ".join(_show(f"{where}.{k}" if where else k) for k in keys[:5])
    return shown + (f" (and {len(keys) - 5} more)" if len(keys) > 5 else "")


def _show(v) -> str:
    """A short, one-line picture of a JSON value for an error message."""
    if isinstance(v, dict):
        return "an object"
    if isinstance(v, list):
        return "a list"
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    try:
        text = repr(v)
    except ValueError:  # an int past Python's int-to-str digit limit
        return "a very large number"
    return text if len(text) <= 40 else text[:37] + "..."


def _shown(s: str) -> str:
    return s if s.isprintable() else ascii(s)


def _label(path: Path) -> str:
    return path.name if NAME_RE.fullmatch(path.name) else _shown(path.name)[:120]


# -- the writer ---------------------------------------------------------------------
def record_dict(rec: InstanceRecord) -> dict:
    """REC as the JSON object the reader reads."""
    return {"schema_version": rec.schema_version, **dataclasses.asdict(rec)}


def write_record(d: Path, rec: InstanceRecord) -> Path:
    """Write REC as D/<name>.json, atomically. Raises ValueError for a record the reader
    would refuse (a caller's bug: nothing unreadable ever reaches the disk)."""
    data = record_dict(rec)
    try:
        if rec.schema_version != SCHEMA_VERSION:
            raise _Bad("schema_version", f"{SCHEMA_VERSION}", rec.schema_version)
        _decode(InstanceRecord, json.loads(json.dumps(data)), "")
    except (_Bad, TypeError, ValueError) as e:
        raise ValueError(f"refusing to write an invalid record: {e}") from None
    path = Path(d) / rec.file_name
    write_json_atomic(path, data)
    return path


def drop_record(d: Path, name: str) -> None:
    """Remove NAME's record (after a complete stop)."""
    (Path(d) / f"{name}.json").unlink(missing_ok=True)


def scan(d: Path) -> list[tuple[Path, InstanceRecord | RecordError]]:
    """Every record in D: (path, record or the error that makes it unusable)."""
    out: list[tuple[Path, InstanceRecord | RecordError]] = []
    for p in sorted(Path(d).glob("*.json")):
        if p.name.endswith((".report.json", ".stop.json")):
            continue
        try:
            out.append((p, read_record(p)))
        except RecordError as e:
            out.append((p, e))
    return out


def write_json_atomic(path: Path, data: dict) -> None:
    """Write DATA as JSON, atomically: readers see the old file or the new one, never half
    (a temp file in the same folder, then os.replace)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    text = json.dumps(data, indent=1, default=str)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
