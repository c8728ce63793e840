"""Encoder-output caching for training with a frozen Whisper encoder (CPU-scale runs).

With the encoder frozen, its output for an utterance never changes, so it is computed once and
reused every epoch; only the decoder is trained. Whisper's encoder always sees 30 s (3000 log-mel
frames) and returns [1500, d_model]; the cache keeps all 1500 positions because the decoder
cross-attends to every one of them (trimming would change the model's outputs).

Entries are keyed by the audio file (absolute path, size, modification time) and a fingerprint of
the encoder weights and feature-extractor settings, so a changed file or model never hits a stale
entry. The cache lives in memory (``root=None``) or on disk as one fp16 safetensors file per
utterance (about 1.1 MB each for tiny, 1.5 MB for base); disk writes are atomic.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from safetensors.torch import load_file, save_file

__all__ = ["EncoderCache", "model_fingerprint", "audio_key"]


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
    """Encoder outputs ([1500, d_model], stored fp16) by key, in memory or in a folder."""

    def __init__(self, root: str | os.PathLike | None, fingerprint: str) -> None:
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
        load_features: Callable[[list[str]], torch.Tensor],
        encode: Callable[[torch.Tensor], torch.Tensor],
        *,
        batch_size: int = 8,
        progress: Callable[[Iterable], Iterable] | None = None,
    ) -> int:
        """Compute and store the outputs for every path not cached yet; returns how many were computed.

        ``load_features(paths) -> [B, n_mels, 3000]`` log-mels; ``encode(features) -> [B, 1500, d]``.
        """
        todo: list[tuple[str, str]] = []
        seen: set[str] = set()
        for p in paths:
            k = self.key(p)
            if k not in seen and k not in self:
                todo.append((p, k))
                seen.add(k)
        chunks = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
        for chunk in progress(chunks) if progress is not None else chunks:
            with torch.no_grad():
                out = encode(load_features([p for p, _ in chunk]))
            for (_, k), row in zip(chunk, out):
                self.put(k, row)
        return len(todo)
