"""`python -m mlx_specdec`: the `mlx-specdec` command."""

from .commands.cli import app

app(prog_name="mlx-specdec")
