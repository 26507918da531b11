"""The `gpus` fixture: the test's own NVML view (tests/gpu/nvml_view.py)."""

from __future__ import annotations

import pytest

from tests.gpu.nvml_view import Gpus


@pytest.fixture(scope="module")
def gpus() -> Gpus:
    """Every GPU NVML sees, with its idle usage at the start of the module."""
    return Gpus()
