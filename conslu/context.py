"""Audio-length encoder context (whisper.cpp's ``audio_ctx``).

Whisper pads every input to its 30 s window: 3000 log-mel frames, 1500 encoder positions, and the
decoder's cross-attention reads all 1500 at every step. A model with an audio context of ``bucket``
seconds encodes only the audio's length rounded up to a multiple of ``bucket``: the log-mels are
cut there and the encoder runs over the first positions of its positional embedding.

An utterance is always encoded at its own context: a batch of several contexts is decoded as one
group per context (:func:`groups`), so a result never depends on what else is in its batch, and
training batches never mix contexts either (:class:`conslu.training.sampling.BucketBatchSampler`
with ``groups``). ``bucket`` None is Whisper's 30 s window.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["DEFAULT_BUCKET_SECONDS", "WINDOW_SECONDS", "TOLERANCE", "context_seconds", "groups", "encode",
           "check_bucket"]

WINDOW_SECONDS = 30.0
TOLERANCE = 0.01  # seconds over a multiple of the bucket that still count as it (half an encoder position)
DEFAULT_BUCKET_SECONDS = 2.0  # a new ConSLU model's bucket (recorded in its folder)


def check_bucket(bucket: float | None) -> float | None:
    """``bucket`` as seconds (None: the 30 s window); ValueError unless it is in (0, 30]."""
    if bucket is None:
        return None
    b = float(bucket)
    if not 0.0 < b <= WINDOW_SECONDS or not math.isfinite(b):
        raise ValueError(f"audio context bucket must be in (0, {WINDOW_SECONDS:g}] seconds, got {bucket}")
    # a whole number of encoder positions (20 ms each)
    if abs(b * 50 - round(b * 50)) > 1e-6:
        raise ValueError(f"audio context bucket must be a multiple of 0.02 s, got {bucket}")
    return b


def context_seconds(seconds: float, bucket: float | None) -> float:
    """The encoded length of ``seconds`` of audio: rounded up to a multiple of ``bucket`` (at least
    one bucket; up to ``TOLERANCE`` over a multiple still counts as that multiple, so a file's
    header duration and its resampled length agree), at most the 30 s window; the window when
    ``bucket`` is None."""
    if bucket is None:
        return WINDOW_SECONDS
    n = max(1, math.ceil(round((float(seconds) - TOLERANCE) / bucket, 9)))
    return min(n * bucket, WINDOW_SECONDS)


def groups(durations: Sequence[float], bucket: float | None) -> dict[float, list[int]]:
    """Indices of ``durations`` (seconds) by context, contexts increasing, indices in order."""
    out: dict[float, list[int]] = {}
    for i, d in enumerate(durations):
        out.setdefault(context_seconds(d, bucket), []).append(i)
    return dict(sorted(out.items()))


def encode(encoder: Any, features: "Tensor") -> "Tensor":
    """Whisper's encoder over ``features`` [B, n_mels, frames] of any even length up to the window:
    ``last_hidden_state`` [B, frames / 2, d]. The full window runs the model's own forward; a shorter
    one runs the same layers with the positional embedding cut to its length (the transformers
    encoder refuses anything but the full window)."""
    import torch
    import torch.nn.functional as F

    full = int(encoder.config.max_source_positions) * 2
    if features.shape[-1] == full:
        return encoder(features).last_hidden_state
    if features.shape[-1] > full or features.shape[-1] % 2:
        raise ValueError(f"encoder input must have an even number of frames up to {full}, got {features.shape[-1]}")
    x = F.gelu(encoder.conv1(features))
    x = F.gelu(encoder.conv2(x)).permute(0, 2, 1)
    x = x + encoder.embed_positions.weight[: x.shape[1]]
    x = F.dropout(x, p=encoder.dropout, training=encoder.training)
    for layer in encoder.layers:
        if encoder.training and encoder.layerdrop > 0.0 and bool(torch.rand([]) < encoder.layerdrop):
            continue
        x = layer(x, None)
        if isinstance(x, tuple):
            x = x[0]
    return encoder.layer_norm(x)
