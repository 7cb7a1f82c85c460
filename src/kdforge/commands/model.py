"""CLI commands of this area (placeholder until the area lands)."""

import typer


def register(app: typer.Typer) -> None:
    pass
