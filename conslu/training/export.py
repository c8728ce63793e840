"""Export of a trained model as a ConSLU folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from conslu.atomic import atomic_folder, atomic_write_json

__all__ = ["export_model"]


def export_model(slu: Any, dirpath: str | os.PathLike, info: dict | None = None) -> Path:
    """Save ``slu`` as a ConSLU folder at ``dirpath`` (plus ``training.json`` with ``info``),
    replacing an old one only once complete.

    The folder is written under a temporary name next to ``dirpath`` and swapped in by two
    renames (old -> aside, new -> dirpath); readers never see a half-written folder.
    """
    dirpath = Path(dirpath)
    with atomic_folder(dirpath) as tmp:
        slu.write_files(tmp)
        if info is not None:
            atomic_write_json(tmp / "training.json", info, indent=2)
    return dirpath
