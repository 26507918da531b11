"""`vllm-supervise print-unit`: the systemd unit, the docker run line and the Kubernetes
snippet, generated from the same options as `serve`, so that the outer manager's time
budgets always cover the supervisor's own: grace + kill wait + VRAM wait (+ a margin).

What goes into a unit or manifest is quoted for it: ExecStart= with systemd's own rules
(`%` -> `%%`, `$` -> `$$`, double quotes with C escapes), the docker line with shlex, the
Kubernetes command as JSON strings (valid YAML). Control characters are refused."""

from __future__ import annotations

import json
import re
import shlex
import unicodedata

from vllm_supervisor.errors import UsageError
from vllm_supervisor.host.diagnose import BUDGET_S
from vllm_supervisor.host.health import poll_timeout

MARGIN_S = 15  # process start-up, the report, slack
# Written bare in ExecStart=; anything else is double-quoted.
_SYSTEMD_BARE = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def check_printable(args, where: str) -> None:
    """A usage error for a control character (a newline, ...) in ARGS: no unit, manifest
    or shell line can carry one safely."""
    for a in args:
        bad = [c for c in a if unicodedata.category(c) in ("Cc", "Cs") or c in "\ufffe\uffff"]
        if bad:
            raise UsageError(f"cannot write {a!r} into {where}: it contains the control "
                             f"character {bad[0]!r}")


def systemd_escape(arg: str) -> str:
    """ARG as one word of ExecStart= that systemd turns back into exactly ARG."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if _SYSTEMD_BARE.fullmatch(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def yaml_string(arg: str) -> str:
    """ARG as a JSON string, which is a YAML double-quoted scalar; the two Unicode line
    separators, line breaks to YAML, are escaped too."""
    return (json.dumps(arg, ensure_ascii=False)
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def grace_note(cfg) -> str:
    """How the grace relates to vLLM's drain, for the budget comments."""
    if cfg.drain_s <= 0:
        return (f"grace {cfg.grace_s:g} s (vLLM has no --shutdown-timeout: it aborts "
                "requests in flight at once)")
    if cfg.grace_s < cfg.drain_s:
        return (f"grace {cfg.grace_s:g} s, SHORTER than vLLM's --shutdown-timeout "
                f"{cfg.drain_s:g} s: its drain will be cut by SIGKILL")
    return f"grace {cfg.grace_s:g} s (vLLM's drain of up to {cfg.drain_s:g} s fits in it)"


def stop_budget(cfg) -> int:
    """Seconds the outer manager must give the supervisor between SIGTERM and SIGKILL
    (--metrics-linger included: the endpoint stays up that long after the stop)."""
    return int(cfg.grace_s + cfg.kill_wait_s + cfg.vram_timeout_s + cfg.metrics_linger_s
               + MARGIN_S + 0.999)


def budget_note(cfg) -> str:
    """The budget's terms after the grace, for the comments."""
    linger = f" + metrics linger {cfg.metrics_linger_s:g} s" if cfg.metrics_linger_s else ""
    return (f"+ kill wait {cfg.kill_wait_s:g} s + VRAM wait {cfg.vram_timeout_s:g} s{linger} "
            f"+ {MARGIN_S} s")




def start_budget(cfg) -> float:
    """Seconds a start may take: the wait for the GPUs (--gpu-wait, with reservations),
    vLLM's --startup-timeout, and a margin."""
    return (cfg.gpu_wait_s if cfg.reservations else 0.0) + cfg.startup_timeout_s + MARGIN_S


def watchdog_sec(cfg) -> int:
    """WatchdogSec= for CFG: longer than our own /health verdict (failures x (interval +
    the poll's timeout)) and a hang's diagnosis, so that our orderly stop, which disarms
    systemd's watchdog, always comes before systemd's hard kill; at least 60 s."""
    poll = cfg.health_interval_s + poll_timeout(cfg.health_interval_s)
    own = cfg.health_failures * poll if cfg.health_interval_s > 0 else 0
    return int(max(60, own + MARGIN_S, 2 * (BUDGET_S + MARGIN_S)) + 0.999)


def serve_argv(cfg, passthrough: list[str]) -> list[str]:
    """`vllm-supervise serve [options] MODEL -- ARGS`, as the unit will run it."""
    return ["vllm-supervise", "serve", *passthrough, cfg.model, "--", *cfg.vllm_args]


def systemd_unit(cfg, passthrough: list[str], exe: str, name: str,
                 state_dir: str | None = None) -> str:
    """A Type=notify unit whose timeouts agree with CFG. Instance NAME (in PASSTHROUGH as
    --name) is what ExecStopPost= finishes when the supervisor itself was killed."""
    if not exe.startswith("/"):
        raise UsageError(f"--exe must be an absolute path, got {exe!r}")
    argv = [exe, *serve_argv(cfg, passthrough)[1:]]
    post = [exe, "stop", "--missing-ok", *(["--state-dir", state_dir] if state_dir else []),
            "--", name]
    check_printable(argv + post, "a systemd unit")
    cmd = " ".join(map(systemd_escape, argv))
    post_cmd = " ".join(map(systemd_escape, post))
    start = f"{start_budget(cfg):.0f}" if cfg.startup_timeout_s else "infinity"
    return f"""[Unit]
Description=vLLM serving {cfg.model.replace("%", "%%")} (supervised by vllm-supervise)
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={cmd}
# Runs after the supervisor's end, however it ended. When systemd killed it (WatchdogSec=,
# TimeoutStopSec=) or the kernel did (OOM), its tree is still in this cgroup at this point:
# this does the supervisor's stop from its record (SIGTERM, grace, SIGKILL), waits for the
# GPU memory and fails if it did not come back. After a normal stop there is no record
# left and it does nothing.
ExecStopPost={post_cmd}
# The supervisor stops vLLM itself (SIGTERM to vLLM, grace, SIGKILL of the whole tree,
# then the GPU check): systemd sends SIGTERM to it alone; once it has exited (or after
# TimeoutStopSec), ExecStopPost= runs, then systemd SIGKILLs whatever is left.
KillMode=mixed
KillSignal=SIGTERM
# {grace_note(cfg)}
# {budget_note(cfg)}
TimeoutStopSec={stop_budget(cfg)}
# Model loads take minutes: the supervisor extends this while the start makes progress
# (EXTEND_TIMEOUT_USEC) and applies its own --startup-timeout and --stall-timeout.
TimeoutStartSec={start}
# Pinged every WatchdogSec/2 while /health answers, and around a hang's diagnosis; the
# stop disarms it. Longer than our own /health verdict and the diagnosis ({BUDGET_S:g} s).
WatchdogSec={watchdog_sec(cfg)}
Restart=on-failure
RestartSec=5
# Exit 4: a requested stop that needed SIGKILL, but the tree is gone and the GPU checked:
# a completed stop like 0, not a failed unit (the report in the journal says what was cut).
SuccessExitStatus=4
# Exit 5 (a process survived SIGKILL) and 6 (GPU memory not released): a restart would
# start into an out-of-memory error; leave those for a person.
RestartPreventExitStatus=5 6

[Install]
WantedBy=multi-user.target
"""


def docker_run(cfg, passthrough: list[str], image: str) -> str:
    """A docker run line whose --stop-timeout covers the supervisor's stop."""
    metrics = ["-p", f"{cfg.metrics_port}:{cfg.metrics_port}"] if cfg.metrics_port else []
    args = ["docker", "run", "--gpus", "all", f"--stop-timeout={stop_budget(cfg)}",
            "-p", f"{cfg.health_port}:{cfg.health_port}", *metrics,
            # Whatever the image's own ENTRYPOINT (vLLM's images start vLLM): the
            # supervisor is PID 1 and gets `docker stop`'s SIGTERM.
            "--entrypoint", "vllm-supervise", image,
            *serve_argv(cfg, passthrough)[1:]]
    check_printable(args, "a docker run line")
    return shlex.join(args) + "\n"


def kubernetes(cfg, passthrough: list[str], image: str) -> str:
    """A Deployment snippet whose terminationGracePeriodSeconds covers the stop."""
    argv = serve_argv(cfg, passthrough)
    check_printable([image, *argv], "a Kubernetes manifest")
    cmd = ", ".join(map(yaml_string, argv))
    port = cfg.health_port
    ports = f"{{containerPort: {port}}}"
    annotations = ""
    if cfg.metrics_port:
        ports += f", {{containerPort: {cfg.metrics_port}, name: metrics}}"
        annotations = ("      annotations:\n"
                       '        prometheus.io/scrape: "true"\n'
                       f'        prometheus.io/port: "{cfg.metrics_port}"\n'
                       '        prometheus.io/path: "/metrics"\n')
    return f"""apiVersion: apps/v1
kind: Deployment
metadata:
  name: vllm
spec:
  replicas: 1
  selector:
    matchLabels: {{app: vllm}}
  template:
    metadata:
      labels: {{app: vllm}}
{annotations}    spec:
      # {grace_note(cfg)}
      # {budget_note(cfg)}
      terminationGracePeriodSeconds: {stop_budget(cfg)}
      containers:
        - name: vllm
          image: {yaml_string(image)}
          command: [{cmd}]
          ports: [{ports}]
          readinessProbe:
            httpGet: {{path: /health, port: {port}}}
            periodSeconds: 5
{_k8s_probes(cfg, port)}          resources:
            limits: {{nvidia.com/gpu: 1}}
"""


def _k8s_probes(cfg, port: int) -> str:
    """The startup and liveness probes; none with --startup-timeout 0 (no limit), where the
    supervisor's --stall-timeout and its own health checks (exit 7) judge the pod."""
    if not cfg.startup_timeout_s:
        return ("          # --startup-timeout 0: no startup limit, so no startup or "
                "liveness probe\n")
    return f"""          startupProbe:
            httpGet: {{path: /health, port: {port}}}
            periodSeconds: 10
            failureThreshold: {int((start_budget(cfg) - MARGIN_S) // 10) + 1}
          livenessProbe:
            httpGet: {{path: /health, port: {port}}}
            periodSeconds: 10
            failureThreshold: 6
"""
