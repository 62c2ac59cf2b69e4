"""The embedded default model pair: a small Gemma 4 target and its distilled
drafter, trained by scripts/build_demo.py and shipped inside the package so
that every command works offline."""

from pathlib import Path

from ..errors import LoadError

DEMO_DIR = Path(__file__).parent / "model"


def demo_path() -> Path:
    """The folder of the embedded target (its drafter sits in ``drafter/`` inside)."""
    if not (DEMO_DIR / "config.json").exists():
        raise LoadError(f"the embedded demo model is missing from {DEMO_DIR}: build it with scripts/build_demo.py")
    return DEMO_DIR
