"""`vllm-supervise print-unit`: the systemd unit, the docker run line and the Kubernetes
snippet, generated from the same options as `serve`, so that the outer manager's time
budgets always cover the supervisor's own: grace + kill wait + VRAM wait (+ a margin)."""

from __future__ import annotations

import shlex

MARGIN_S = 15  # process start-up, the report, slack


def stop_budget(cfg) -> int:
    """Seconds the outer manager must give the supervisor between SIGTERM and SIGKILL."""
    return int(cfg.grace_s + cfg.kill_wait_s + cfg.vram_timeout_s + MARGIN_S + 0.999)


def serve_argv(cfg, passthrough: list[str]) -> list[str]:
    """`vllm-supervise serve [options] MODEL -- ARGS`, as the unit will run it."""
    return ["vllm-supervise", "serve", *passthrough, cfg.model, "--", *cfg.vllm_args]


def systemd_unit(cfg, passthrough: list[str], exe: str) -> str:
    """A Type=notify unit whose timeouts agree with CFG."""
    cmd = shlex.join([exe, *serve_argv(cfg, passthrough)[1:]])
    return f"""[Unit]
Description=vLLM serving {cfg.model} (supervised by vllm-supervise)
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={cmd}
# The supervisor stops vLLM itself (SIGTERM to vLLM, grace, SIGKILL of the whole tree,
# then the GPU check): systemd sends SIGTERM to it alone, and SIGKILLs what is left only
# after TimeoutStopSec.
KillMode=mixed
KillSignal=SIGTERM
# grace {cfg.grace_s:g} s + kill wait {cfg.kill_wait_s:g} s + VRAM wait {cfg.vram_timeout_s:g} s + {MARGIN_S} s
TimeoutStopSec={stop_budget(cfg)}
# Model loads take minutes: the supervisor extends this while the start makes progress
# (EXTEND_TIMEOUT_USEC) and applies its own --startup-timeout and --stall-timeout.
TimeoutStartSec={int(cfg.startup_timeout_s + MARGIN_S)}
WatchdogSec=60
Restart=on-failure
RestartSec=5
# Exit 5 (a process survived SIGKILL) and 6 (GPU memory not released): a restart would
# start into an out-of-memory error; leave those for a person.
RestartPreventExitStatus=5 6

[Install]
WantedBy=multi-user.target
"""


def docker_run(cfg, passthrough: list[str], image: str) -> str:
    """A docker run line whose --stop-timeout covers the supervisor's stop."""
    args = ["docker", "run", "--gpus", "all", f"--stop-timeout={stop_budget(cfg)}",
            "-p", f"{cfg.health_port}:{cfg.health_port}", image,
            *serve_argv(cfg, passthrough)]
    return shlex.join(args) + "\n"


def kubernetes(cfg, passthrough: list[str], image: str) -> str:
    """A Deployment snippet whose terminationGracePeriodSeconds covers the stop."""
    cmd = ", ".join(f'"{a}"' for a in serve_argv(cfg, passthrough))
    port = cfg.health_port
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
    spec:
      # grace {cfg.grace_s:g} s (it includes vLLM's own --shutdown-timeout) + kill wait
      # {cfg.kill_wait_s:g} s + VRAM wait {cfg.vram_timeout_s:g} s + {MARGIN_S} s
      terminationGracePeriodSeconds: {stop_budget(cfg)}
      containers:
        - name: vllm
          image: {image}
          command: [{cmd}]
          ports: [{{containerPort: {port}}}]
          readinessProbe:
            httpGet: {{path: /health, port: {port}}}
            periodSeconds: 5
          startupProbe:
            httpGet: {{path: /health, port: {port}}}
            periodSeconds: 10
            failureThreshold: {int(cfg.startup_timeout_s // 10) + 1}
          livenessProbe:
            httpGet: {{path: /health, port: {port}}}
            periodSeconds: 10
            failureThreshold: 6
          resources:
            limits: {{nvidia.com/gpu: 1}}
"""
