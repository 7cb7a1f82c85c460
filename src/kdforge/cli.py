"""The `kdforge` command. Thin: parse, call a library function, map errors to exit codes.

Each area registers its commands from `kdforge/commands/<area>.py`; those modules import
nothing heavy at import time (`kdforge generate` must start without importing torch).
"""

from __future__ import annotations

import sys

import typer

try:  # typer >= 0.20 vendors click as typer._click; older typer uses click itself
    from typer._click import exceptions as _cx
except ImportError:  # pragma: no cover
    from click import exceptions as _cx

from kdforge.errors import KdforgeError

app = typer.Typer(
    name="kdforge",
    help="Distil a large teacher LLM into a small student, and keep it learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _register() -> None:
    from kdforge.commands import bench, daemon, demo, eval, generate, model, preflight, serve, train

    for mod in (generate, train, model, daemon, serve, demo, preflight, eval, bench):
        mod.register(app)


_register()


def err(msg: str) -> None:
    """Print an error line to stderr (plain, so scripts and tests can read it)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the app, turn the library's errors into messages and exit codes."""
    try:
        rv = app(args=argv, prog_name="kdforge", standalone_mode=False)
    except KeyboardInterrupt:
        err("interrupted")
        sys.exit(130)
    except _cx.ClickException as e:  # usage errors: exit 2 (help on no args: 0)
        if isinstance(e, getattr(_cx, "NoArgsIsHelpError", ())):
            e.show()
            sys.exit(0)
        e.show()
        sys.exit(e.exit_code)
    except KdforgeError as e:
        err(str(e))
        sys.exit(e.exit_code)
    except ValueError as e:  # transformers refusing a folder's own code (trust_remote_code=False): exit 2
        from kdforge.remote_code import refusal

        if (ours := refusal(e)) is None:
            raise
        err(str(ours))
        sys.exit(ours.exit_code)
    except Exception as e:  # noqa: BLE001 - a full disk, an I/O error: one line, exit 1; anything else raises
        from kdforge.daemon.infra import FIX, infrastructure_fault

        if (why := infrastructure_fault(e)) is None:
            raise
        err(f"{why}; {FIX}, then run it again")
        sys.exit(1)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
