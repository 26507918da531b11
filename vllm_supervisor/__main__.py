"""`python -m vllm_supervisor` runs the same CLI as `vllm-supervise`."""

from vllm_supervisor.cli.app import main

if __name__ == "__main__":
    main()
