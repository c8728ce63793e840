"""Shared test settings: where the TOPv2 text lives (../shared beside the checkout, as in CI)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOPV2_DIR = Path(os.environ.get("CONSLU_TOPV2_DIR", REPO.parent / "shared" / "data" / "topv2"))
os.environ.setdefault("CONSLU_TOPV2_DIR", str(TOPV2_DIR))
