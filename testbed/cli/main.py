"""`testbed` entry point: one Typer app; each area registers its sub-commands from its own module."""

from __future__ import annotations

import sys
from typing import Any

import typer

from testbed.errors import TestbedError

app = typer.Typer(
    name="testbed",
    help="Edge-fog-cloud testbed for pipelined LLM inference.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # Each module adds its commands to `app` (import for side effect). One line per area.
    # plan/list/check; up/status/down/clean/doctor/image; replay/compare; model/profile/stage/generate;
    # simulate/sweep/calibrate; fidelity
    from testbed.cli import (  # noqa: F401
        fidelity_cmd,
        generate_cmd,
        model_cmd,
        plan_cmd,
        replay_cmd,
        reproduce_cmd,
        runtime_cmd,
        sim_cmd,
        stage_cmd,
    )


_register()


def _usage_error(exc: BaseException) -> tuple[str, int] | None:
    """(one-line message, exit code) for a command-line usage error, else None.

    typer >= 0.29 raises its own vendored exception classes (``typer._click.exceptions``) that
    are not click's, and older typer raises click's; both families carry ``exit_code`` and
    ``format_message()``, so they are recognised by that shape rather than by class. Typer no
    longer depends on click, so click is not imported here.
    """
    fmt = getattr(exc, "format_message", None)
    code = getattr(exc, "exit_code", None)
    if not callable(fmt) or not isinstance(code, int):
        return None
    ctx = getattr(exc, "ctx", None)
    command = getattr(ctx, "command_path", None) or "testbed"
    message = " ".join(str(fmt()).split())
    return f"error: {command}: {message} (see '{command} --help')", max(code, 2)


def _wants_help(exc: BaseException) -> Any:
    """The context whose help to print when a command was called without its arguments."""
    if type(exc).__name__ == "NoArgsIsHelpError":
        return getattr(exc, "ctx", None)
    return None


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; testbed errors and usage errors become one line and exit code 2 (bad input)."""
    try:
        app(args=argv, prog_name="testbed", standalone_mode=False)
    except TestbedError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:
        ctx = _wants_help(exc)
        if ctx is not None:
            typer.echo(ctx.get_help())
            sys.exit(0)
        usage = _usage_error(exc)
        if usage is None:
            raise
        typer.secho(usage[0], err=True, fg=typer.colors.RED)
        sys.exit(usage[1])


if __name__ == "__main__":
    main()
