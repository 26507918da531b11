"""Settings derived from vLLM's own arguments: where /health is, the default grace."""

from __future__ import annotations

import pytest

from vllm_supervisor.errors import UsageError
from vllm_supervisor.lifecycle.config import default_grace, health_target


def test_health_target_and_default_grace():
    assert health_target(()) == ("http", "127.0.0.1", 8000)
    assert health_target(("--host", "::", "--port=9001")) == ("http", "::1", 9001)
    assert health_target(("--ssl-keyfile", "k", "--host", "10.0.0.5")) == \
        ("https", "10.0.0.5", 8000)
    with pytest.raises(UsageError):
        health_target(("--port", "70000"))
    assert default_grace(()) == 20.0
    assert default_grace(("--shutdown-timeout", "60")) == 80.0
