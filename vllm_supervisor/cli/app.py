"""The `vllm-supervise` command group and its entry point: one-line errors, exit 2 for
usage, tracebacks only with --debug. No os.kill, psutil or pynvml in the cli package."""

from __future__ import annotations

import os
import sys

import click

from vllm_supervisor import __version__
from vllm_supervisor.cli.ops import cleanup, print_unit, status, stop
from vllm_supervisor.cli.serve import demo, serve
from vllm_supervisor.errors import ExitCode, SupervisorError

# click >= 8.2 raises this (a UsageError) for a bare `vllm-supervise`: show the help.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())
_debug = False


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vllm-supervise")
@click.option("--debug", is_flag=True, help="Show tracebacks for internal errors.")
def cli(debug: bool) -> None:
    """Supervise `vllm serve`: start it in its own session, report readiness, and stop the
    whole process tree (SIGTERM, grace, SIGKILL of the group and any escapee), then verify
    the GPU memory came back before reporting the stop as done."""
    global _debug
    _debug = debug


for _command in (serve, demo, print_unit, status, stop, cleanup):
    cli.add_command(_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors, exit 2 for usage, tracebacks only with --debug."""
    try:
        rv = cli.main(args=argv, prog_name="vllm-supervise", standalone_mode=False)
    except _NO_ARGS_IS_HELP as e:
        click.echo(e.ctx.get_help() if e.ctx else str(e))
        sys.exit(ExitCode.USAGE)
    except click.UsageError as e:
        _fail(f"{e.format_message()} (see `vllm-supervise {_cmd(e)}--help`)", ExitCode.USAGE)
    except click.ClickException as e:
        _fail(e.format_message(), e.exit_code)
    except click.exceptions.Abort:
        _fail("aborted", 130)
    except SupervisorError as e:
        _fail(e.one_line(), e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:
        if _debug or os.environ.get("VLLM_SUPERVISE_DEBUG"):
            raise
        _fail(f"internal error: {type(e).__name__}: {e}; hint: rerun with --debug", 1)
    sys.exit(rv if isinstance(rv, int) else 0)


def _cmd(e: click.UsageError) -> str:
    return f"{e.ctx.info_name} " if e.ctx and e.ctx.parent else ""


def _fail(message: str, code: int) -> None:
    click.echo(f"vllm-supervise: error: {message}", err=True)
    sys.exit(code)
