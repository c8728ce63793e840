"""Encoder-output caching for training with a frozen Whisper encoder (CPU-scale runs).

With the encoder frozen, its output for an utterance never changes, so it is computed once and
reused every epoch; only the decoder is trained. An entry is the encoder output over the
utterance's audio context (:mod:`conslu.context`): [50 * seconds, d_model], all 1500 positions of
Whisper's 30 s window for a model without one. The decoder cross-attends to every position, so
an entry is never trimmed after the fact; a cache belongs to one context bucket.

Entries are keyed by the audio file (absolute path, size, modification time) and a fingerprint of
the encoder weights, feature-extractor settings and context bucket, so a changed file or model never hits a stale
entry. The cache lives in memory (``root=None``) or on disk as one fp16 safetensors file per
utterance (about 1.1 MB each for tiny, 1.5 MB for base); disk writes are atomic.

:func:`encoder_cache` opens the cache of one encoder and :func:`fill_encoder_cache` computes the
missing entries; training (``model.cache_encoder``), ``conslu demo`` and ``recipes/ablation`` all
go through these two, so their keys agree and a cache filled by one is reused by the others.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

from conslu.audio import MAX_SECONDS, AudioError, duration, load_audio, log_mel
from conslu.context import WINDOW_SECONDS, check_bucket, context_seconds, encode

__all__ = ["EncoderCache", "model_fingerprint", "audio_key", "encoder_cache", "fill_encoder_cache", "base_encoder"]


def model_fingerprint(encoder: torch.nn.Module, feature_extractor: object | None = None) -> str:
    """sha256 over the encoder's parameters/buffers and the feature-extractor settings."""
    h = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        h.update(name.encode())
        t = tensor.detach().to("cpu").contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    if feature_extractor is not None:
        for attr in ("feature_size", "sampling_rate", "hop_length", "n_fft", "chunk_length", "n_samples"):
            h.update(f"{attr}={getattr(feature_extractor, attr, None)};".encode())
    return h.hexdigest()


def audio_key(path: str | os.PathLike, fingerprint: str) -> str:
    """Cache key for one audio file under one model fingerprint (changes when the file changes)."""
    p = Path(path).resolve()
    st = p.stat()
    return hashlib.sha256(f"{p}|{st.st_size}|{st.st_mtime_ns}|{fingerprint}".encode()).hexdigest()


class EncoderCache:
    """Encoder outputs ([frames, d_model], stored fp16) by key, in memory or in a folder.
    ``audio_context``: the bucket (seconds) its entries were encoded with (None: 30 s windows)."""

    def __init__(self, root: str | os.PathLike | None, fingerprint: str, audio_context: float | None = None) -> None:
        self.audio_context = check_bucket(audio_context)
        self.fingerprint = fingerprint
        self.root = Path(root) / fingerprint[:16] if root is not None else None
        self._memory: dict[str, torch.Tensor] = {}
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)

    def key(self, audio_path: str | os.PathLike) -> str:
        return audio_key(audio_path, self.fingerprint)

    def _file(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        if key in self._memory:
            return True
        return self.root is not None and self._file(key).is_file()

    def get(self, key: str) -> torch.Tensor | None:
        """The cached fp16 tensor, or None."""
        if key in self._memory:
            return self._memory[key]
        if self.root is None:
            return None
        f = self._file(key)
        if not f.is_file():
            return None
        try:
            return load_file(str(f))["encoder_output"]
        except Exception as e:  # a truncated file from a killed run: recompute instead of failing
            raise ValueError(f"{f}: unreadable encoder cache entry ({e}); delete it to recompute") from e

    def put(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to("cpu", torch.float16).contiguous()
        if self.root is None:
            self._memory[key] = value
            return
        f = self._file(key)
        f.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=f".{f.name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file({"encoder_output": value}, tmp)
            os.replace(tmp, f)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def fill(
        self,
        paths: Sequence[str],
        load_features: Callable[[list[str], float], torch.Tensor],
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        batch_size: int = 8,
        progress: Callable[[Iterable], Iterable] | None = None,
        durations: Callable[[str], float] | None = None,
    ) -> int:
        """Compute and store the outputs for every path not cached yet; returns how many were computed.

        ``load_features(paths, seconds) -> [B, n_mels, 100 * seconds]`` log-mels;
        ``encode(features) -> [B, 50 * seconds, d]``. Batches never mix contexts: ``durations(path)``
        (seconds, needed with an audio context) puts each path in its own.
        """
        if self.audio_context is not None and durations is None:
            raise ValueError("a cache with an audio context needs each path's duration (durations=...)")
        todo: list[tuple[str, str]] = []
        seen: set[str] = set()
        for p in paths:
            k = self.key(p)
            if k not in seen and k not in self:
                todo.append((p, k))
                seen.add(k)
        by_context: dict[float, list[tuple[str, str]]] = {}
        for p, k in todo:
            seconds = context_seconds(durations(p), self.audio_context) if self.audio_context is not None else WINDOW_SECONDS
            by_context.setdefault(seconds, []).append((p, k))
        chunks = [(seconds, items[i : i + batch_size]) for seconds, items in sorted(by_context.items())
                  for i in range(0, len(items), batch_size)]
        for seconds, chunk in progress(chunks) if progress is not None else chunks:
            with torch.no_grad():
                out = encode(load_features([p for p, _ in chunk], seconds))
            for (_, k), row in zip(chunk, out):
                self.put(k, row)
        return len(todo)


def encoder_cache(encoder: torch.nn.Module, feature_extractor: Any, root: str | os.PathLike | None,
                  audio_context: float | None = None) -> EncoderCache:
    """The :class:`EncoderCache` of this encoder, feature extractor and context bucket (in memory when
    ``root`` is None)."""
    fingerprint = model_fingerprint(encoder, feature_extractor)
    if audio_context is not None:  # 30 s caches keep the keys they always had
        fingerprint = hashlib.sha256(f"{fingerprint}|context={check_bucket(audio_context)}".encode()).hexdigest()
    return EncoderCache(root, fingerprint, audio_context)


def _progress_bar(desc: str) -> Callable[[Iterable], Iterable]:
    from tqdm import tqdm

    def progress(chunks: Iterable) -> Iterable:
        chunks = list(chunks)
        return tqdm(chunks, desc=desc, unit="batch", file=sys.stderr, dynamic_ncols=True, disable=not chunks)

    return progress


def fill_encoder_cache(cache: EncoderCache, encoder: torch.nn.Module, feature_extractor: Any, paths: Sequence[str], *,
                       batch_size: int = 8, max_seconds: float | None = MAX_SECONDS, desc: str | None = None) -> int:
    """Encode every audio file of ``paths`` not cached yet; returns how many were computed.

    The encoder runs in eval mode (its mode is restored afterwards) on its own device and dtype;
    audio longer than ``max_seconds`` is refused (:func:`conslu.audio.load_audio`). ``desc``: show
    a progress bar (stderr) with this label.
    """
    def load(ps: list[str], seconds: float) -> torch.Tensor:
        return log_mel([load_audio(p, max_seconds=max_seconds) for p in ps], feature_extractor,
                       None if cache.audio_context is None else seconds)

    def run(features: torch.Tensor) -> torch.Tensor:
        p = next(encoder.parameters())
        return encode(encoder, features.to(p.device, p.dtype))

    def seconds_of(path: str) -> float:
        try:
            return duration(path)
        except AudioError:
            return WINDOW_SECONDS  # unreadable: load_audio reports it in the batch that loads it

    progress = None if desc is None else _progress_bar(desc)

    was_training = encoder.training
    encoder.eval()
    try:
        return cache.fill(list(paths), load, run, batch_size=batch_size, progress=progress, durations=seconds_of)
    finally:
        encoder.train(was_training)


def base_encoder(model: str) -> tuple[torch.nn.Module, Any]:
    """(encoder in eval mode, feature extractor) of a base Whisper model; the encoder of every ConSLU
    model trained from it with a frozen encoder is identical, so cache keys agree."""
    from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

    from conslu.pretrained import resolve_model

    where = resolve_model(model)
    whisper = WhisperForConditionalGeneration.from_pretrained(where)
    return whisper.get_encoder().eval(), WhisperFeatureExtractor.from_pretrained(where)
