"""Attacks on the state dir and its records: a folder that is not ours, read-only commands
that would create things, names that are paths, records that name what is not theirs.
Each attack leaves a bystander that must survive untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_records import make_record

from tests.helpers import REPO
from vllm_supervisor.errors import SupervisorError, UsageError
from vllm_supervisor.gpu.probe import NoGpuProbe
from vllm_supervisor.instances import commands, orphans
from vllm_supervisor.instances.records import ProcRef, record_dict, removable_tmpdir
from vllm_supervisor.instances.statedir import (
    check_name,
    existing_state_dir,
    open_state_dir,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")


def _snapshot(d: Path) -> dict:
    """Every path under D (D included) with its mode, owner and contents."""
    out = {}
    for p in [d, *sorted(d.rglob("*"))]:
        st = os.lstat(p)
        body = p.read_bytes() if p.is_file() and not p.is_symlink() else None
        out[str(p)] = (st.st_mode, st.st_uid, body)
    return out


def _state_with_bystander(tmp_path: Path, mode: int = 0o700) -> Path:
    d = tmp_path / "state"
    d.mkdir()
    (d / "bystander.txt").write_text("not yours")
    os.chmod(d, mode)
    return d


def _refused(path: Path, why: str) -> None:
    for use in (open_state_dir, existing_state_dir):
        with pytest.raises(SupervisorError) as e:
            use(path)
        assert why in e.value.message and "\n" not in e.value.one_line()


def test_symlinked_state_dir_is_refused_and_its_target_left_alone(tmp_path):
    real = _state_with_bystander(tmp_path)
    link = tmp_path / "link"
    link.symlink_to(real)
    before = _snapshot(real)
    _refused(link, "is a symbolic link")
    assert _snapshot(real) == before


@needs_root
def test_another_users_state_dir_is_refused_and_not_repaired(tmp_path):
    d = _state_with_bystander(tmp_path)
    os.chown(d, 65534, 65534)
    before = _snapshot(d)
    _refused(d, "belongs to uid 65534")
    assert _snapshot(d) == before


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o1777])
def test_group_or_world_writable_state_dir_is_refused_not_chmodded(tmp_path, mode):
    d = _state_with_bystander(tmp_path, mode)
    before = _snapshot(d)
    _refused(d, "writable by group or others")
    assert _snapshot(d) == before


def test_serve_creates_a_missing_state_dir_0700_but_not_its_parents(tmp_path):
    d = open_state_dir(tmp_path / "state")
    assert d.is_dir() and os.stat(d).st_mode & 0o777 == 0o700
    with pytest.raises(SupervisorError, match="cannot create state directory"):
        open_state_dir(tmp_path / "missing" / "state")
    assert not (tmp_path / "missing").exists()


def test_the_default_location_gets_its_parents_0700(tmp_path, monkeypatch):
    monkeypatch.delenv("VLLM_SUPERVISE_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "run" / "user"))
    d = open_state_dir(None)
    assert d == tmp_path / "run" / "user" / "vllm-supervise"
    assert all(os.stat(p).st_mode & 0o777 == 0o700 for p in (d, d.parent, d.parent.parent))


def test_read_only_commands_on_a_missing_state_dir_create_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(orphans, "find_orphans", lambda all_users, claimed=None, supervisors=None: [])
    (tmp_path / "bystander.txt").write_text("x")
    before = _snapshot(tmp_path)
    missing = tmp_path / "state"
    assert commands.status_rows(missing, None, NoGpuProbe("t")) == ([], [])
    assert commands.render_status([], []) == "no supervised instances\n"
    assert commands.stop(missing, ["alpha"], False, None, NoGpuProbe("t"))[0]["error"]
    assert commands.stop(missing, [], True, None, NoGpuProbe("t")) == []
    assert commands.cleanup_candidates(missing, all_users=False) == []
    assert _snapshot(tmp_path) == before


def test_stop_of_an_unknown_name_in_an_existing_state_dir_changes_nothing(tmp_path):
    d = _state_with_bystander(tmp_path)
    before = _snapshot(tmp_path)
    (res,) = commands.stop(d, ["alpha"], False, None, NoGpuProbe("t"))
    assert res["error"].startswith("no such instance")
    assert _snapshot(tmp_path) == before


def test_empty_state_dir_option_is_a_usage_error_not_the_current_folder(tmp_path):
    (tmp_path / "bystander.txt").write_text("x")
    os.chmod(tmp_path, 0o700)
    before = _snapshot(tmp_path)
    res = subprocess.run([sys.executable, "-m", "vllm_supervisor", "status", "--state-dir", ""],
                         cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(REPO)),
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "Traceback" not in res.stderr and "--state-dir" in res.stderr
    assert _snapshot(tmp_path) == before
    with pytest.raises(UsageError):
        open_state_dir("")


@pytest.mark.parametrize("name", ["../../x", "a/b", ".", "..", "", ".hidden", "x.report",
                                  "x.stop", "x.lock", "a\nb", "x" * 101])
def test_a_name_that_is_a_path_or_another_files_name_is_refused(name):
    with pytest.raises(UsageError) as e:
        check_name(name)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("name", ["qwen", "Qwen3-0.6B-8000", "a.b_c-d", "x.reports"])
def test_plain_names_are_accepted(name):
    assert check_name(name) == name


def test_serve_with_a_path_for_a_name_exits_2_before_creating_anything(tmp_path):
    before = _snapshot(tmp_path)
    res = subprocess.run([sys.executable, "-m", "vllm_supervisor", "serve", "--gpu-probe",
                          "none", "--state-dir", str(tmp_path / "state"), "--name", "../../x",
                          "m"], cwd=REPO, capture_output=True, text=True, timeout=60,
                         check=False, stdin=subprocess.DEVNULL)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "--name" in res.stderr and "Traceback" not in res.stderr
    assert _snapshot(tmp_path) == before


def _plant(d: Path, file_name: str, **fields) -> None:
    data = record_dict(make_record()) | fields
    (d / file_name).write_text(json.dumps(data))
    os.chmod(d / file_name, 0o600)


@pytest.mark.parametrize("file_name, name", [("x.json", "../../x"), ("alpha.json", "beta"),
                                             ("beta.json", "alpha")])
def test_a_record_whose_name_is_a_path_or_not_its_own_is_skipped_with_a_warning(
        tmp_path, monkeypatch, file_name, name):
    monkeypatch.setattr(orphans, "find_orphans", lambda all_users, claimed=None, supervisors=None: [])
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    d = tmp_path / "a" / "state"
    d.mkdir(parents=True, mode=0o700)
    for p in (tmp_path / "x.json", tmp_path / "a" / "x.json"):
        p.write_text("bystander")
    private = tmp_path / "vllm-supervise-4242-abc"  # the planted record's tmpdir
    private.mkdir()
    (private / "keep").write_text("bystander")
    _plant(d, file_name, name=name, tmpdir=str(private))
    before = _snapshot(tmp_path)
    rows, problems = commands.status_rows(d, None, NoGpuProbe("t"))
    assert rows == [] and len(problems) == 1 and file_name in problems[0]
    assert "\n" not in problems[0]
    assert commands.stop(d, [], True, None, NoGpuProbe("t")) == []
    for n in {name, file_name.removesuffix(".json")}:
        (res,) = commands.stop(d, [n], False, None, NoGpuProbe("t"))
        assert "error" in res and "complete" not in res
    trees = commands.cleanup_candidates(d, all_users=False)
    assert trees == [] and commands.cleanup(d, trees, 0.0, NoGpuProbe("t")) == []
    assert _snapshot(tmp_path) == before


# -- removable_tmpdir: the record's word alone removes nothing ---------------------
@pytest.fixture
def tmp_as_tempdir(tmp_path, monkeypatch):
    """tmp_path stands in for the system temp dir."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def _rec(tmpdir, pid: int = 4242):
    return make_record(tmpdir=str(tmpdir), supervisor=ProcRef(pid, 1000, ""))


def test_removable_tmpdir_accepts_the_supervisors_own_folder(tmp_as_tempdir):
    mine = tmp_as_tempdir / "vllm-supervise-4242-k3x_9abc"
    mine.mkdir()
    assert removable_tmpdir(_rec(mine)) == mine
    assert removable_tmpdir(make_record(tmpdir=None)) is None


def test_removable_tmpdir_refuses_a_symlink_to_a_bystander(tmp_as_tempdir):
    bystander = tmp_as_tempdir / "precious"
    bystander.mkdir()
    link = tmp_as_tempdir / "vllm-supervise-4242-abc"
    link.symlink_to(bystander)
    assert removable_tmpdir(_rec(link)) is None


def test_removable_tmpdir_refuses_a_folder_outside_the_temp_dir(tmp_as_tempdir):
    deeper = tmp_as_tempdir / "home" / "vllm-supervise-4242-abc"
    deeper.mkdir(parents=True)
    assert removable_tmpdir(_rec(deeper)) is None


@pytest.mark.parametrize("folder", ["vllm-supervise-999-abc", "vllm-supervise-4242-",
                                    "vllm-supervise-4242", "vllm-supervise-42420-abc",
                                    "other-4242-abc", "vllm-supervise-4242-a.b"])
def test_removable_tmpdir_refuses_a_wrong_prefix(tmp_as_tempdir, folder):
    (tmp_as_tempdir / folder).mkdir()
    assert removable_tmpdir(_rec(tmp_as_tempdir / folder)) is None


@needs_root
def test_removable_tmpdir_refuses_another_users_folder(tmp_as_tempdir):
    theirs = tmp_as_tempdir / "vllm-supervise-4242-abc"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    assert removable_tmpdir(_rec(theirs)) is None


def test_removable_tmpdir_refuses_a_file_or_nothing(tmp_as_tempdir):
    f = tmp_as_tempdir / "vllm-supervise-4242-abc"
    f.write_text("x")
    assert removable_tmpdir(_rec(f)) is None
    assert removable_tmpdir(_rec(tmp_as_tempdir / "vllm-supervise-4242-gone")) is None
