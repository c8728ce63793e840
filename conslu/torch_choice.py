"""Which torch ``setup.sh`` installs: an installed torch that sees a GPU is kept (replacing it could
leave a machine training on the CPU); otherwise the CPU pair known to load together is installed.
``CONSLU_KEEP_TORCH=1`` keeps any installed torch.

Run as a script, before the package is installed (it imports nothing of conslu); it prints one
line, ``keep <reason>`` or ``install <requirement> <requirement>``.
"""

from __future__ import annotations

import os
import sys

CPU_PAIR = ("torch==2.14.1", "torchaudio==2.11.0")


def choice(keep_any: bool = False) -> tuple[str, str]:
    """("keep", why) or ("install", the requirements, space-separated)."""
    if keep_any:
        return "keep", "the installed torch (CONSLU_KEEP_TORCH=1)"
    try:
        import torch
    except Exception:  # noqa: BLE001 - absent or broken: install the pair
        return "install", " ".join(CPU_PAIR)
    try:
        cuda = bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001
        cuda = False
    if cuda:
        return "keep", f"the installed torch {torch.__version__} (CUDA is available)"
    return "install", " ".join(CPU_PAIR)


if __name__ == "__main__":
    action, detail = choice(os.environ.get("CONSLU_KEEP_TORCH", "0") == "1")
    print(action, detail)
    sys.exit(0)
