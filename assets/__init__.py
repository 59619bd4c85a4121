"""Data shipped with flowalign: the toy model (``toy/``) and prompt sets (``prompts/``)."""
from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent


def asset_path(*parts: str) -> Path:
    """Return the path of a shipped asset, e.g. ``asset_path("prompts", "shapes_train.jsonl")``."""
    path = ASSETS_DIR.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(f"flowalign asset not found: {path}")
    return path


def resolve_asset(path) -> Path:
    """``path`` as given, or, when it does not exist and starts with ``assets/``, the shipped asset of that name:
    the repository's relative paths (``assets/prompts/shapes_heldout.jsonl``, ``assets/toy``) work from any folder
    with an installed flowalign."""
    path = Path(path)
    if not path.exists() and path.parts and path.parts[0] == "assets":
        packaged = ASSETS_DIR.joinpath(*path.parts[1:])
        if packaged.exists():
            return packaged
    return path
