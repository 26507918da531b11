"""Deployments: systemd's notify protocol, and the units and manifests `print-unit`
writes."""
