"""`testbed` entry point: one Typer app; each area registers its sub-commands from its own module."""

from __future__ import annotations

import sys

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
    # plan/list/check; up/status/down/clean/doctor/image; replay/compare; model/profile/stage/generate
    from testbed.cli import (  # noqa: F401
        generate_cmd,
        model_cmd,
        plan_cmd,
        replay_cmd,
        runtime_cmd,
        stage_cmd,
    )


_register()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; testbed errors become a clear message and their exit code (2 = bad input)."""
    try:
        app(args=argv, standalone_mode=False)
    except TestbedError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.secho("aborted", err=True)
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Exit):
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
