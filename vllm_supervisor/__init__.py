"""vllm-supervise: a process supervisor for `vllm serve` that stops the whole tree."""

__version__ = "0.1.0"
