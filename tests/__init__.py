"""The test suite, one folder per layer: unit/ (pure logic, no processes, milliseconds),
integration/ (real supervisor processes and real signals), sim/ (the simulated vLLM on its
own), gpu/ (real GPUs, marker gpu), real_vllm/ (a real vLLM CPU build, marker real_vllm).
helpers.py holds what they share, conftest.py the shared fixtures."""
