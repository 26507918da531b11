"""Who sent a stop signal, as the report names it, from the siginfo fields alone."""

import os

from vllm_supervisor.host.signals import OUTSIDE, SI_KERNEL, describe_sender

SI_USER, SI_QUEUE, SI_TKILL = 0, -1, -6


def test_a_sender_outside_the_pid_namespace_is_named_as_such_not_as_the_kernel():
    # `docker stop`: kill() from the host reaches the container's PID 1 with si_pid 0.
    for code in (SI_USER, SI_QUEUE, SI_TKILL):
        assert describe_sender(0, code) == OUTSIDE
    assert "kernel" not in OUTSIDE and "docker stop" in OUTSIDE


def test_the_terminal_and_the_kernel_send_with_si_kernel():
    assert describe_sender(0, SI_KERNEL) == "the kernel (terminal or OOM)"


def test_a_visible_sender_is_named_by_pid_and_command_line():
    text = describe_sender(os.getpid(), SI_USER)
    assert text.startswith(f"pid {os.getpid()} (") and "python" in text.lower()


def test_a_sender_that_is_gone_is_said_to_be_gone():
    assert describe_sender(2**22 + 7, SI_USER) == f"pid {2**22 + 7} (gone)"
