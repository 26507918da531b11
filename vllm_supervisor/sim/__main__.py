"""`python -m vllm_supervisor.sim serve MODEL ...` runs the simulated vLLM."""

import sys

from vllm_supervisor.sim.server import main

if __name__ == "__main__":
    sys.exit(main())
