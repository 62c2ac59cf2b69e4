"""Convert a Gemma 4 target and its MTP assistant into one MLX folder.

The same as `mlx-specdec convert` (see `python scripts/convert_weights.py --help`), e.g.

    python scripts/convert_weights.py google/gemma-4-E2B-it --out gemma-4-E2B-it-mlx --quantize 4
"""

import sys

from mlx_specdec.commands.cli import app

if __name__ == "__main__":
    app(args=["convert", *sys.argv[1:]], prog_name="convert_weights.py")
