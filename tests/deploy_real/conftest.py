"""Fixtures of the deploy_real layer: one systemd machine and one private dockerd for the
whole session (booted once: ~1 s and ~1 s), vllm-supervise's wheel built from this tree,
and the check that the host is left as it was found."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.deploy_real import systems


@pytest.fixture(scope="package")
def host_before():
    """The host before any system starts; after the last one is gone, nothing may be new."""
    before = systems.host_snapshot()
    yield before
    # The systems' fixtures depend on this one, so they are torn down before it.
    left = systems.leftovers(before, systems.host_snapshot())
    assert not left, f"left on the host by the deploy_real systems: {left}"


@pytest.fixture(scope="package")
def deploy_dir(tmp_path_factory, host_before):
    d = tmp_path_factory.mktemp("deploy_real")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="package")
def wheel(deploy_dir):
    return systems.build_wheel(deploy_dir / "wheel")


@pytest.fixture(scope="package")
def machine(deploy_dir, wheel, host_before):
    m = systems.Machine(_mkdir(deploy_dir / "machine"), wheel)
    try:
        m.boot()
        print(f"\nsystemd machine booted in {m.boot_s:.2f} s")
        yield m
    finally:
        m.shutdown()


@pytest.fixture(scope="package")
def dockerd(deploy_dir, host_before):
    d = systems.Dockerd(_mkdir(deploy_dir / "docker"))
    try:
        d.start()
        print(f"\nprivate dockerd answered in {d.start_s:.2f} s")
        yield d
    finally:
        t0 = time.monotonic()
        d.stop()
        print(f"dockerd torn down in {time.monotonic() - t0:.2f} s")


def _mkdir(d):
    d.mkdir()
    return d
