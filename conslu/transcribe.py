"""Plain Whisper speech recognition (English, no timestamps): the baseline of ``conslu transcribe``
(:mod:`conslu.commands.transcribe`) and a check of converted weights."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["transcribe"]


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
