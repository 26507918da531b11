"""GPU truth: the probe protocol and readings (probe.py), the NVML probe and the GPUs in
scope (nvml.py), the VRAM ledger and its verdicts (ledger.py, verdict.py). Unknown is
never zero."""
