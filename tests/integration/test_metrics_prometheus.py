"""A real Prometheus (Debian's package, scripts/prepare_prometheus.sh) scrapes a supervised
simulated vLLM every 250 ms; its HTTP API then shows the state going from starting to
ready to stopping to done, and the stop's duration as the report gives it. Also:
`promtool check rules` on the alert rules the docs ship."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, http_get, wait_until

pytestmark = pytest.mark.slow
PREPARED = Path(os.environ.get("VLLM_SUPERVISE_PROMETHEUS_HOME",
                               Path.home() / ".cache/vllm-supervise/prometheus"))


def _missing() -> str | None:
    if shutil.which("prometheus") and shutil.which("promtool"):
        return None
    try:
        why = (PREPARED / "FAILED").read_text().strip()
    except OSError:
        why = "scripts/prepare_prometheus.sh was not run"
    return f"no prometheus/promtool here: {why}"


needs_prometheus = pytest.mark.skipif(_missing() is not None, reason=str(_missing()))


@pytest.fixture
def prometheus(tmp_path):
    """A Prometheus on a loopback port, scraping TARGET every 250 ms, with its own config
    and storage in tmp_path; stopped and reaped at the end."""
    procs = []

    def start(target_port: int) -> int:
        port = free_port()
        conf = tmp_path / "prometheus.yml"
        conf.write_text(
            "global: {scrape_interval: 250ms, scrape_timeout: 200ms}\n"
            "scrape_configs:\n"
            "  - job_name: vllm-supervise\n"
            f"    static_configs: [{{targets: ['127.0.0.1:{target_port}']}}]\n")
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "prometheus.log", "wb"))  # noqa: SIM115 - closed by exit
        procs.append(proc)
        wait_until(lambda: http_get(port, "/-/ready")[0] == 200, 60, "Prometheus ready")
        # Its scrape manager takes up new targets about 5 s after the start: wait for the
        # first (failed) scrape of ours, so that the whole run is scraped.
        wait_until(lambda: _scraped_once(port), 60, "Prometheus' first scrape of the target")
        return port

    yield start
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _scraped_once(port: int) -> bool:
    status, body = http_get(port, "/api/v1/targets")
    if status != 200:
        return False
    targets = json.loads(body)["data"]["activeTargets"]
    return bool(targets) and targets[0]["health"] in ("up", "down")


def query_range(port: int, promql: str, start: float, end: float) -> list[dict]:
    q = urllib.parse.urlencode({"query": promql, "start": start, "end": end, "step": "0.25"})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query_range?{q}",
                                timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


@needs_prometheus
def test_prometheus_sees_starting_ready_stopping_done_and_the_stop_duration(
        supervise, prometheus):
    mport = free_port()
    prom = prometheus(mport)
    t0 = time.time()
    run = supervise("--metrics-port", str(mport), "--metrics-linger", "3",
                    env={"FAKE_VLLM_STARTUP_S": "2", "FAKE_VLLM_STOP_S": "2"})
    run.wait_ready()
    wait_until(lambda: query_range(prom, 'vllm_supervise_state{vllm_supervise_state="ready"}'
                                   " == 1", t0, time.time()), 10, "Prometheus to see ready")
    run.signal(signal.SIGTERM)
    assert run.finish(timeout=60) == 0
    t1 = time.time()
    report = run.report()
    series = query_range(prom, "vllm_supervise_state == 1", t0, t1)
    first = {s["metric"]["vllm_supervise_state"]: float(s["values"][0][0]) for s in series}
    order = sorted(first, key=first.get)
    seen = [s for s in order if s in ("starting", "ready", "stopping", "done")]
    assert seen == ["starting", "ready", "stopping", "done"], first
    assert all(s["metric"]["job"] == "vllm-supervise" for s in series)
    duration = query_range(prom, "vllm_supervise_last_stop_duration_seconds", t0, t1)
    values = [float(v) for _, v in duration[0]["values"] if v != "NaN"]
    assert values[-1] == pytest.approx(report["stop_duration_s"])
    assert report["stop_duration_s"] >= 2  # FAKE_VLLM_STOP_S: the stopping state lasted
    ready = query_range(prom, "vllm_supervise_time_to_ready_seconds", t0, t1)
    assert float(ready[0]["values"][-1][1]) == pytest.approx(report["time_to_ready_s"], abs=1e-3)


@needs_prometheus
def test_the_documented_alert_rules_pass_promtool():
    res = subprocess.run(["promtool", "check", "rules", str(REPO / "docs/prometheus-rules.yml")],
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS: 6 rules found" in res.stdout
