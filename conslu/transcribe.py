"""Plain Whisper speech recognition: ``conslu transcribe FILES...`` (English, no timestamps).

Prints one JSON line ``{"file": ..., "text": ...}`` per readable file, in input order. Unreadable
files get one ``conslu: FILE: reason`` line on stderr and the others go on; the exit code is 1 when
any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from typing import Any, Sequence

import numpy as np

from conslu.pretrained import DEFAULT_MODEL, load_whisper

__all__ = ["transcribe", "cmd_transcribe"]


def transcribe(model: Any, processor: Any, audios: Sequence[np.ndarray], *, batch_size: int = 8) -> list[str]:
    """Greedy English transcripts (stripped) of 16 kHz float32 `audios`, `batch_size` at a time."""
    import torch

    from conslu.audio import log_mel

    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    texts: list[str] = []
    param = next(model.parameters())
    # English transcription, also on a multilingual checkpoint (no language detection)
    lang = {"language": "en", "task": "transcribe"} if getattr(model.generation_config, "is_multilingual", False) else {}
    for start in range(0, len(audios), batch_size):
        chunk = list(audios[start : start + batch_size])
        feats = log_mel(chunk, processor.feature_extractor).to(param.device, param.dtype)
        with torch.inference_mode():
            ids = model.generate(input_features=feats, return_timestamps=False, **lang)
        texts.extend(t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True))
    return texts


def cmd_transcribe(args: argparse.Namespace) -> int:
    """``conslu transcribe FILES... [--model M] [--batch-size B] [--device D] [--debug]``."""
    from conslu.audio import AudioError, load_audio

    if args.batch_size < 1:
        print(f"conslu: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    if not args.debug:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # generate() chatter about deprecated arguments is not for users
        hf_logging.disable_progress_bar()
    name = args.model or DEFAULT_MODEL
    try:
        model, processor = load_whisper(name, device=args.device)
    except Exception as exc:  # noqa: BLE001 - one clear line; the traceback on --debug
        if args.debug:
            traceback.print_exc()
        print(f"conslu: model {name}: {exc}", file=sys.stderr)
        return 1

    failed = 0

    def flush(batch: list[tuple[str, np.ndarray]]) -> None:
        texts = transcribe(model, processor, [a for _, a in batch], batch_size=len(batch))
        for (path, _), text in zip(batch, texts):
            print(json.dumps({"file": path, "text": text}, ensure_ascii=False), flush=True)

    batch: list[tuple[str, np.ndarray]] = []
    for path in args.files:
        try:
            batch.append((path, load_audio(path)))
        except AudioError as exc:
            failed += 1
            if args.debug:
                traceback.print_exc()
            print(f"conslu: {exc}", file=sys.stderr)
            continue
        if len(batch) == args.batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if failed:
        print(f"conslu: {failed} of {len(args.files)} file(s) failed", file=sys.stderr)
        return 1
    return 0
