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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Sequence

from conslu.runner import Item, Outcome

__all__ = ["DTYPES", "load_model", "Loader", "model_error", "check_options", "decode", "features", "model_fingerprint",
           "decode_settings", "file_key", "file_items", "directory_error", "record"]

DTYPES = ("float32", "bfloat16", "float16")


def _dtype(name: str, device: str) -> Any:
    """The torch dtype for ``name`` on ``device``; ValueError where the device cannot run it."""
    import torch

    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: expected one of {', '.join(DTYPES)}")
    dtype = getattr(torch, name)
    if name == "bfloat16" and str(device).startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ValueError(f"{device} does not support bfloat16; use --dtype float16 or float32")
    return dtype


def load_model(path: str, device: str | None = None, audio_context: float | None | str = "model",
               dtype: str = "float32") -> Any:
    """``ConSLU.from_pretrained(path)`` on ``device`` (default: CUDA when available, else CPU) in
    ``dtype`` (``float32``, ``bfloat16``, ``float16``); ``audio_context``: ``"model"`` keeps the
    folder's, else the bucket in seconds (None: 30 s windows)."""
    import torch

    from conslu.model import ConSLU

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = _dtype(dtype, device)
    slu = ConSLU.from_pretrained(path).to(device, None if dtype == "float32" else torch_dtype)
    if audio_context != "model":
        slu.audio_context = audio_context
    return slu


@dataclass(frozen=True)
class Loader:
    """Loads the ConSLU model of a run (``load()``) and checks that ``options`` suit it; raises
    :class:`conslu.runner.RunError` (exit 2) with one line otherwise. Picklable, so each process of
    a sharded run (:func:`conslu.runner.run_files` with ``devices``) loads its own copy
    (:meth:`on` gives the copy for another device)."""

    model: str
    options: Any
    device: str | None = None
    audio_context: float | None | str = "model"
    dtype: str = "float32"
    debug: bool = False

    def on(self, device: str) -> "Loader":
        return replace(self, device=device)

    def __call__(self) -> Any:
        from conslu.runner import RunError

        if not self.debug:
            from conslu.commands._options import quiet_transformers

            quiet_transformers()
        try:
            model = load_model(self.model, self.device, self.audio_context, self.dtype)
        except Exception as e:  # noqa: BLE001 - one clear line; the traceback on --debug
            raise RunError(model_error(self.model, e)) from e
        err = check_options(model, self.options)
        if err:
            raise RunError(err)
        return model


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


def decode(model: Any, audios: Any, options: Any) -> list[dict]:
    """``model.parse(audios, options)``: one ``{"transcript", "logical_form", "valid", ...}`` per audio
    (``audios``: arrays, or their log-mels from :func:`features`)."""
    return list(model.parse(audios, options))


def features(model: Any) -> Any:
    """The model's log-mel maker (:attr:`conslu.model.ConSLU.feature_maker`), for the file loop to
    run ahead of decoding (``run_files(prepare=features)``); None for a model without one (it is
    given the audio arrays)."""
    return getattr(model, "feature_maker", None)


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


def decode_settings(model: str, options: Any, audio_context: float | None | str = "model",
                    dtype: str = "float32") -> dict:
    """Settings that change a model's output (``options``: ``DecodingOptions``), recorded beside
    resumable outputs: the model folder, its fingerprint (its own audio context included), the
    options (less ``speculative``, which gives the same output either way), an overridden audio
    context and a half-precision dtype."""
    opts = options.as_dict()
    opts.pop("speculative")
    extra: dict[str, Any] = {} if audio_context == "model" else {"audio_context": audio_context}
    if dtype != "float32":
        extra["dtype"] = dtype
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
