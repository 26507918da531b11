"""The simulated vLLM: the same process tree and titles as the real one (API server ->
VLLM::EngineCore -> VLLM::Worker_TP<n>), misbehaving on request, with simulated or real
CUDA memory. Run as `python -m vllm_supervisor.sim serve MODEL ...`; imported by nothing
in the package but the demo."""
