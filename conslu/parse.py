"""Parsing audio files with a ConSLU model: what ``conslu parse`` and ``conslu evaluate`` share.

* :func:`load_model`: a ConSLU folder on a device (CUDA when available, else CPU).
* :func:`decode_settings`: the settings that change a model's output (model folder and its
  weights, beam, constraints, max new tokens, ...), recorded beside resumable outputs.
* :func:`file_items`: audio files as :class:`conslu.runner.Item` s (a file named twice once, a
  directory refused with a hint); :func:`record`: one output line.
* :func:`decode`: the batch function for :func:`conslu.runner.run_files`.

The loop itself (batches, background loading, resume, error lines) is :mod:`conslu.runner`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from conslu.runner import Item, Outcome

__all__ = ["load_model", "model_error", "check_options", "decode", "model_fingerprint", "decode_settings",
           "file_key", "file_items", "directory_error", "record"]


def load_model(path: str, device: str | None = None, audio_context: float | None | str = "model") -> Any:
    """``ConSLU.from_pretrained(path)`` on ``device`` (default: CUDA when available, else CPU);
    ``audio_context``: ``"model"`` keeps the folder's, else the bucket in seconds (None: 30 s windows)."""
    import torch

    from conslu.model import ConSLU

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    slu = ConSLU.from_pretrained(path).to(device)
    if audio_context != "model":
        slu.audio_context = audio_context
    return slu


def model_error(model: str, e: Exception) -> str:
    """One line for a model that cannot be loaded (the model is named once)."""
    return f"{e}" if str(model) in str(e) else f"model {model}: {e}"


def check_options(model: Any, options: Any) -> str | None:
    """A usage error when the decoding options do not suit the model (length budget, language), else None."""
    try:
        model.check(options)
    except ValueError as e:
        return str(e)
    return None


def decode(model: Any, audios: list[np.ndarray], options: Any) -> list[dict]:
    """``model.parse(audios, options)``: one ``{"transcript", "logical_form", "valid", ...}`` per audio."""
    return list(model.parse(audios, options))


FINGERPRINT_FILES = ("conslu.json", "grammar.json", "generation_config.json", "tokenizer.json")
FINGERPRINT_BYTES = 1 << 20


def model_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity of a model folder's content: sha256 over each weights/config file's name,
    size and first and last MiB (so a retrained model in the same folder differs, and copying the
    folder elsewhere does not)."""
    folder = Path(path)
    h = hashlib.sha256()
    if not folder.is_dir():
        return ""
    names = sorted({p.name for p in folder.glob("*.safetensors")} | {n for n in FINGERPRINT_FILES if (folder / n).is_file()})
    for name in names:
        f = folder / name
        size = f.stat().st_size
        h.update(f"{name}:{size};".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                fh.seek(size - FINGERPRINT_BYTES)
                h.update(fh.read(FINGERPRINT_BYTES))
            elif size > FINGERPRINT_BYTES:
                h.update(fh.read())
    return h.hexdigest()[:16]


def decode_settings(model: str, options: Any, audio_context: float | None | str = "model") -> dict:
    """Settings that change a model's output (``options``: ``DecodingOptions``), recorded beside
    resumable outputs: the model folder, its fingerprint (its own audio context included), the
    options (less ``speculative``, which gives the same output either way) and an overridden
    audio context."""
    opts = options.as_dict()
    opts.pop("speculative")
    extra = {} if audio_context == "model" else {"audio_context": audio_context}
    return {"model": str(Path(model).resolve()), "model_fingerprint": model_fingerprint(model), **opts, **extra}


def file_key(path: str) -> str:
    """The identity of an input file in a resumable output (absolute, normalised path)."""
    return os.path.normpath(os.path.abspath(path))


def directory_error(path: str | None) -> str | None:
    """The error line for a directory given as an audio file (directories are not expanded: a
    folder can hold anything), else None."""
    if path and os.path.isdir(path):
        return f"{path}: is a directory (give the audio files, e.g. {path.rstrip('/')}/*.wav)"
    return None


def file_items(files: Sequence[str]) -> list[Item]:
    """One item per distinct file (a file named twice is parsed once), in order; record ``file``:
    the name as given."""
    seen: set[str] = set()
    items: list[Item] = []
    for f in files:
        k = file_key(f)
        if k not in seen:
            seen.add(k)
            items.append(Item(k, f, {"file": f}, error=directory_error(f)))
    return items


def record(oc: Outcome) -> dict:
    """The output line of a parsed item: its ``meta``, then transcript, logical form, validity and
    ``seconds`` (the batch's decode time divided by its size)."""
    res = oc.result or {}
    return {**oc.item.meta, "transcript": res.get("transcript", ""), "logical_form": res.get("logical_form") or "",
            "valid": bool(res.get("valid")), "seconds": round(oc.seconds, 4)}
