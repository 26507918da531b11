"""Instance records: the one writer, and the one reader that turns anything wrong on disk
into a one-line RecordError (never a traceback, never another exception type)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vllm_supervisor.errors import SupervisorError
from vllm_supervisor.host import identity
from vllm_supervisor.instances.records import (
    SCHEMA_VERSION,
    Budget,
    GpuEntry,
    InstanceRecord,
    ProcRef,
    RecordError,
    VllmRef,
    read_record,
    record_dict,
    scan,
    write_record,
)


def make_record(**changes) -> InstanceRecord:
    """A valid record of instance "alpha", with CHANGES."""
    rec = InstanceRecord(
        name="alpha", boot_id=identity.BOOT_ID, supervisor=ProcRef(4242, 1000, ""),
        vllm=VllmRef(4300, 4300, 4300, 1010), model="Qwen/Qwen3-0.6B", port=8000,
        url="http://127.0.0.1:8000", argv=("vllm", "serve", "Qwen/Qwen3-0.6B"),
        state="ready", started_wall=1.7e9, updated_wall=1.7e9 + 5,
        budget=Budget(20.0, 10.0, 30.0, 256.0), ready_wall=1.7e9 + 4,
        tmpdir="/tmp/vllm-supervise-4242-abc", shm=("/dev/shm/psm_1",),
        tree=(ProcRef(4300, 1010, "vllm serve"), ProcRef(4301, 1020, "VLLM::EngineCore")),
        gpus=(GpuEntry("GPU-a", 0, 1000.0, True), GpuEntry("GPU-b", None, None, False)))
    return dataclasses.replace(rec, **changes)


def _raw(tmp_path: Path, data, name: str = "alpha.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def _assert_one_line_error(path: Path) -> RecordError:
    with pytest.raises(SupervisorError) as info:
        read_record(path)
    err = info.value
    assert type(err) is RecordError
    assert "\n" not in err.one_line() and "\r" not in err.one_line()
    assert err.hint and "delete" in err.hint
    return err


def test_record_round_trips_through_the_writer_and_the_reader(tmp_path):
    rec = make_record()
    path = write_record(tmp_path, rec)
    assert path == tmp_path / "alpha.json"
    assert read_record(path) == rec
    assert json.loads(path.read_text())["schema_version"] == SCHEMA_VERSION
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alpha.json"]  # no temp file left


def test_an_unlimited_budget_round_trips(tmp_path):
    inf = float("inf")
    rec = make_record(budget=Budget(inf, 10.0, inf, inf))  # `serve --grace inf` and the like
    assert read_record(write_record(tmp_path, rec)) == rec


def test_writer_replaces_the_old_record_whole(tmp_path):
    write_record(tmp_path, make_record(state="starting", tree=()))
    write_record(tmp_path, make_record(state="stopping"))
    assert read_record(tmp_path / "alpha.json").state == "stopping"
    assert oct((tmp_path / "alpha.json").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("changes", [
    {"name": "../escape"}, {"ready_wall": float("nan")}, {"tmpdir": "/home"},
    {"supervisor": ProcRef(0, 1, "")}, {"schema_version": 2}])
def test_writer_refuses_what_the_reader_would_refuse(tmp_path, changes):
    with pytest.raises(ValueError, match="refusing to write an invalid record"):
        write_record(tmp_path, make_record(**changes))
    assert not list(tmp_path.iterdir())


def _valid() -> dict:
    return json.loads(json.dumps(record_dict(make_record())))


def _with(path: str, value) -> dict:
    """A valid record dict with the dotted PATH ("vllm.pid", "tree.0.pid") set to VALUE."""
    data = _valid()
    *parents, last = path.split(".")
    node = data
    for p in parents:
        node = node[int(p)] if isinstance(node, list) else node[p]
    if value is _DROP:
        del node[last]
    elif isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return data


_DROP = object()

BAD = [  # (what is written, a phrase the message must contain)
    ('{"name": "alpha", "supervi', "is corrupted or truncated"),
    ("", "is corrupted or truncated"),
    ("[" * 100_000, "is corrupted or truncated"),
    ('{"name": NaN', "is corrupted or truncated"),
    ('{"port": 1' + "0" * 5000 + "}", "is corrupted or truncated"),
    ([1, 2], "is not a JSON object"),
    ("null", "is not a JSON object"),
    (_with("schema_version", _DROP), "has no schema_version"),
    (_with("schema_version", 2), "has schema version 2"),
    (_with("schema_version", True), "has schema version true"),
    (_with("budget", _DROP), "missing field 'budget'"),
    (_with("vllm.sid", _DROP), "missing field 'vllm.sid'"),
    (_with("surprise", 1), "unknown field 'surprise'"),
    (_with("port", "8000"), "field 'port' must be an integer, not '8000'"),
    (_with("port", 70000), "field 'port' must be a port number"),
    (_with("vllm.pid", True), "field 'vllm.pid' must be an integer, not true"),
    (_with("vllm.pid", -3), "field 'vllm.pid' must be a number >= 1, not -3"),
    (_with("tree.1.start_ticks", -1), "field 'tree[1].start_ticks' must be a number >= 0"),
    (_with("tree", {"pid": 1}), "field 'tree' must be a list, not an object"),
    (_with("tree.0", 5), "field 'tree[0]' must be an object"),
    (_with("name", "../etc/passwd"), "field 'name' must be a plain name"),
    (_with("name", "beta"), "names another instance, 'beta'"),
    (_with("budget.grace_s", -1e400), "must be a finite number"),
    (_with("budget.grace_s", "inf"), "must be a finite number"),
    (_with("budget.grace_s", float("nan")), "must be a finite number"),
    (_with("ready_wall", 1e400), "must be a finite number"),
    (_with("budget.grace_s", 10 ** 400), "must be a finite number"),
    (_with("budget.vram_tolerance_mib", -1), "must be a number >= 0 or Infinity"),
    (_with("state", "Ready\n"), "field 'state' must be a state"),
    (_with("tmpdir", "/"), "field 'tmpdir' must be an absolute vllm-supervise-* folder"),
    (_with("shm", ["/dev/shm/../etc"]), "field 'shm' must be a list of /dev/shm/NAME"),
    (_with("gpus.1.uuid", "GPU-a"), "distinct UUIDs"),
    (_with("gpus.0.used", 1), "field 'gpus[0].used' must be true or false"),
    (_with("argv", "vllm serve"), "field 'argv' must be a list"),
    (_with("exit_code", 300), "an exit status 0-255"),
]


@pytest.mark.parametrize("data, phrase", BAD, ids=[p for _, p in BAD])
def test_every_bad_record_is_a_one_line_error_with_a_hint(tmp_path, data, phrase):
    err = _assert_one_line_error(_raw(tmp_path, data))
    assert phrase in err.message
    assert err.message.startswith("record alpha.json")


def test_bad_files_are_refused_before_they_are_parsed(tmp_path):
    write_record(tmp_path, make_record())
    (tmp_path / "beta.json").symlink_to(tmp_path / "alpha.json")
    assert "symbolic link" in _assert_one_line_error(tmp_path / "beta.json").message
    (tmp_path / "gamma.json").mkdir()
    assert "not a regular file" in _assert_one_line_error(tmp_path / "gamma.json").message
    odd = _raw(tmp_path, _valid(), "al\npha.json")
    assert "is not named <name>.json" in _assert_one_line_error(odd).message
    (tmp_path / "delta.json").write_bytes(b'{"name": "\xff\xfe"}')
    assert "corrupted" in _assert_one_line_error(tmp_path / "delta.json").message
    assert "cannot be read" in _assert_one_line_error(tmp_path / "nothing.json").message


def test_scan_lists_records_and_errors_but_not_reports_or_stop_requests(tmp_path):
    write_record(tmp_path, make_record())
    _raw(tmp_path, "{", "broken.json")
    _raw(tmp_path, {"text": "x"}, "alpha.report.json")
    _raw(tmp_path, {"grace": 1}, "alpha.stop.json")
    found = scan(tmp_path)
    assert [p.name for p, _ in found] == ["alpha.json", "broken.json"]
    assert isinstance(found[0][1], InstanceRecord) and isinstance(found[1][1], RecordError)


# -- fuzz: nothing but a record or a RecordError ever comes out of the reader ------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
_KEYS = list(_valid())
_FUZZ = settings(max_examples=40, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


def _read_or_one_line_error(path: Path) -> None:
    try:
        assert isinstance(read_record(path), InstanceRecord)
    except RecordError as e:  # anything else escaping fails the test
        assert "\n" not in e.one_line()


@_FUZZ
@given(value=_json)
def test_fuzz_any_json_value(tmp_path, value):
    _read_or_one_line_error(_raw(tmp_path, json.dumps(value)))


@_FUZZ
@given(drop=st.sets(st.sampled_from(_KEYS), max_size=3),
       replace=st.dictionaries(st.sampled_from(_KEYS), _json, max_size=4))
def test_fuzz_dicts_with_the_records_keys(tmp_path, drop, replace):
    data = {k: v for k, v in _valid().items() if k not in drop} | replace
    _read_or_one_line_error(_raw(tmp_path, data))


@_FUZZ
@given(key=st.sampled_from(_KEYS), sub=st.text(max_size=12), value=_json)
def test_fuzz_one_field_of_a_valid_record_replaced(tmp_path, key, sub, value):
    data = _valid()
    if isinstance(data[key], dict) and sub:  # sometimes one level down
        data[key][sub if sub in data[key] else next(iter(data[key]))] = value
    else:
        data[key] = value
    _read_or_one_line_error(_raw(tmp_path, data))


@_FUZZ
@given(raw=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(tmp_path, raw):
    (tmp_path / "alpha.json").write_bytes(raw)
    _read_or_one_line_error(tmp_path / "alpha.json")

