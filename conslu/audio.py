"""Audio input: any common file as 16 kHz mono float32, and Whisper log-mel features.

``load_audio`` reads with soundfile (libsndfile: wav, flac, ogg/vorbis, mp3, aiff, ... at any
sample rate, channel count and bit depth), falls back to audioread for other containers when a
backend is installed, mixes down to mono and resamples with soxr (high quality). Every problem
with a file is raised as one :class:`AudioError` whose text is ``"{path}: {reason}"``.

Whisper sees at most 30 s at a time; longer files are refused unless the caller passes
``max_seconds=None`` and splits them itself (:func:`chunk_audio`), so audio is never silently cut.
"""

from __future__ import annotations

import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["SAMPLE_RATE", "MAX_SECONDS", "AudioError", "load_audio", "probe", "chunk_audio", "log_mel", "duration",
           "Features", "FeatureMaker"]

SAMPLE_RATE = 16000
MAX_SECONDS = 30.0  # Whisper's input window

_HEAD_BYTES = 64


class AudioError(ValueError):
    """A file that cannot be used as speech input; ``str(e) == f"{path}: {reason}"``."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


def _read_head(path: Path) -> bytes:
    """First bytes of the file (raises PermissionError/OSError like any open)."""
    with open(path, "rb") as f:
        return f.read(_HEAD_BYTES)


def _looks_like_text(head: bytes) -> bool:
    if not head or b"\x00" in head:
        return False
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        # a multi-byte character cut at the end of the sample
        try:
            text = head[:-3].decode("utf-8")
        except UnicodeDecodeError:
            return False
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    return printable >= 0.95 * max(len(text), 1)


def _container(head: bytes) -> str | None:
    """Name of a known container from its magic bytes (for error messages)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and (head[1] & 0xE0) == 0xE0):
        return "mp3"
    if head[4:8] == b"ftyp":
        return "mp4/m4a"
    if head[:4] == b"\x1aE\xdf\xa3":
        return "webm/mkv"
    if head[:4] == b"FORM":
        return "aiff"
    return None


def _check_riff(path: Path, size: int) -> None:
    """Refuse a RIFF/WAVE file whose data chunk is shorter than its header says (cut-off copy).

    libsndfile reads such files without complaint, returning only part of the recording. Streams
    written to a pipe carry placeholder sizes (0 or 0xFFFFFFFF); those are not checked.
    """
    with open(path, "rb") as f:
        f.seek(12)
        while True:
            hdr = f.read(8)
            if len(hdr) < 8:
                raise AudioError(path, "corrupt wav: no 'data' chunk (file truncated?)")
            cid, clen = hdr[:4], struct.unpack("<I", hdr[4:])[0]
            if cid == b"data":
                if clen in (0, 0xFFFFFFFF) or clen >= 0x7FFFF000:
                    return
                have = size - f.tell()
                if have < clen:
                    raise AudioError(path, f"truncated wav: header promises {clen} bytes of samples, file has {have}")
                return
            f.seek(clen + (clen & 1), os.SEEK_CUR)
            if f.tell() > size:
                raise AudioError(path, f"corrupt wav: chunk {cid!r} runs past the end of the file (truncated?)")


def _decode_audioread(path: Path) -> tuple[np.ndarray, int]:
    """Decode with audioread (ffmpeg/gstreamer/...); raises AudioError when no backend can."""
    try:
        import audioread
    except ImportError as e:  # pragma: no cover - librosa depends on audioread
        raise AudioError(path, "unsupported audio format (install audioread + ffmpeg to read it)") from e
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with audioread.audio_open(str(path)) as f:
                sr, channels = int(f.samplerate), int(f.channels)
                buf = b"".join(f)
    except audioread.NoBackendError as e:
        raise AudioError(path, "unsupported audio format (no decoder for it here; convert it to wav or flac, "
                               "or install ffmpeg)") from e
    except Exception as e:
        raise AudioError(path, f"cannot decode audio ({e})") from e
    x = np.frombuffer(buf[: len(buf) // 2 * 2], dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        x = x[: len(x) // channels * channels].reshape(-1, channels)
    return x, sr


def duration(path: str | os.PathLike) -> float:
    """Length in seconds from the file header (no decoding); AudioError if unreadable."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except Exception as e:
        raise AudioError(path, f"cannot read audio header ({e})") from e
    return info.frames / info.samplerate if info.samplerate else 0.0


def _open_checked(p: Path, max_seconds: float | None) -> tuple[str | None, Any]:
    """The checks that need no samples: (container, soundfile info or None when libsndfile cannot
    open it). Raises AudioError as :func:`load_audio` does."""
    import soundfile as sf

    if not p.exists():
        raise AudioError(p, "no such file")
    if p.is_dir():
        raise AudioError(p, "is a directory, not an audio file")
    if not p.is_file():
        raise AudioError(p, "not a regular file")
    try:
        size = p.stat().st_size
        head = _read_head(p)
    except PermissionError as e:
        raise AudioError(p, "permission denied") from e
    except OSError as e:
        raise AudioError(p, f"cannot open ({e.strerror or e})") from e
    if size == 0:
        raise AudioError(p, "empty file (0 bytes)")
    kind = _container(head)
    if kind is None and _looks_like_text(head):
        raise AudioError(p, "not audio (looks like a text file)")
    if kind == "wav":
        _check_riff(p, size)
    try:
        info = sf.info(str(p))
    except Exception as e:  # libsndfile cannot open it: another container or not audio at all
        if kind in ("wav", "flac", "ogg", "aiff"):
            raise AudioError(p, f"corrupt {kind} file ({str(e).split(': ', 1)[-1]})") from e
        return kind, None
    if info.frames == 0:
        raise AudioError(p, "no audio samples (zero length)")
    if max_seconds is not None and info.samplerate and info.frames / info.samplerate > max_seconds + 1e-3:
        raise AudioError(p, _too_long(info.frames / info.samplerate, max_seconds))
    return kind, info


def probe(path: str | os.PathLike, *, max_seconds: float | None = MAX_SECONDS) -> float:
    """Seconds of a usable audio file, checked as :func:`load_audio` checks it but without reading
    the samples (formats libsndfile cannot open are decoded). Raises AudioError."""
    p = Path(path)
    kind, info = _open_checked(p, max_seconds)
    if info is not None:
        return info.frames / info.samplerate
    return len(load_audio(p, sr=SAMPLE_RATE, max_seconds=max_seconds)) / SAMPLE_RATE


def load_audio(path: str | os.PathLike, *, sr: int = SAMPLE_RATE, max_seconds: float | None = MAX_SECONDS) -> np.ndarray:
    """The file as a 1-D float32 array at ``sr`` Hz (channels averaged).

    Raises AudioError for a missing path, a directory, an unreadable, empty, truncated or
    non-audio file, an unsupported format, zero-length audio, NaN/inf samples, or audio longer
    than ``max_seconds`` (None: no limit; split long audio with :func:`chunk_audio`).
    """
    import soundfile as sf

    p = Path(path)
    kind, info = _open_checked(p, max_seconds)
    native_sr: int
    if info is None:
        x, native_sr = _decode_audioread(p) if kind is not None else _unknown(p)
    else:
        try:
            x, native_sr = sf.read(str(p), dtype="float32", always_2d=True)
        except Exception as e:
            raise AudioError(p, f"corrupt or truncated audio ({str(e).split(': ', 1)[-1]})") from e

    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float32) if x.shape[1] > 1 else x[:, 0]
    if x.size == 0:
        raise AudioError(p, "no audio samples (zero length)")
    if not np.isfinite(x).all():
        raise AudioError(p, "contains NaN or infinite samples")
    if max_seconds is not None and x.size / native_sr > max_seconds + 1e-3:
        raise AudioError(p, _too_long(x.size / native_sr, max_seconds))
    if native_sr != sr:
        x = resample(x, native_sr, sr)
    return np.ascontiguousarray(x, dtype=np.float32)


def _unknown(p: Path) -> tuple[np.ndarray, int]:
    try:
        return _decode_audioread(p)
    except AudioError as e:
        raise AudioError(p, "not audio or an unsupported format (unrecognised file contents)") from e


def _too_long(seconds: float, max_seconds: float) -> str:
    return (f"audio is {seconds:.1f} s long, more than the model's {max_seconds:g} s window; "
            "split it first (conslu.audio.chunk_audio) or load with max_seconds=None")


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """High-quality resampling (soxr 'HQ'; librosa's soxr path when soxr is missing)."""
    if sr_in == sr_out:
        return x.astype(np.float32, copy=False)
    try:
        import soxr

        return soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32, copy=False)
    except ImportError:  # pragma: no cover - librosa depends on soxr
        import librosa

        return librosa.resample(x, orig_sr=sr_in, target_sr=sr_out, res_type="soxr_hq").astype(np.float32)


def chunk_audio(audio: np.ndarray, seconds: float = MAX_SECONDS, *, sr: int = SAMPLE_RATE) -> list[np.ndarray]:
    """Consecutive pieces of at most ``seconds`` (the last one shorter); [] for empty audio."""
    if seconds <= 0:
        raise ValueError(f"chunk length must be positive, got {seconds}")
    a = np.asarray(audio)
    if a.ndim != 1:
        raise ValueError(f"expected 1-D audio, got shape {a.shape}")
    n = max(1, int(round(seconds * sr)))
    return [a[i : i + n] for i in range(0, len(a), n)]


def log_mel(audios: Sequence[np.ndarray], feature_extractor: Any, seconds: float | None = None) -> "torch.Tensor":
    """Whisper log-mel features ``[B, n_mels, frames]`` (n_mels from the extractor: 80 or 128).

    ``seconds`` (an audio context, :mod:`conslu.context`): only the first ``100 * seconds`` frames,
    exactly those of the 30 s features (the audio is padded one STFT window past the cut, so the
    last frames see the zeros they see in the full window); None: the whole window.

    Audio must be 1-D at the extractor's sampling rate and no longer than its window (Whisper's
    extractor would silently cut it), with finite samples.
    """
    import torch

    from conslu.context import TOLERANCE

    n_samples = int(getattr(feature_extractor, "n_samples", 0) or 0)
    sr = int(getattr(feature_extractor, "sampling_rate", SAMPLE_RATE))
    batch: list[np.ndarray] = []
    for i, a in enumerate(audios):
        a = np.asarray(a, dtype=np.float32)
        if a.ndim != 1:
            raise ValueError(f"audio {i}: expected a 1-D (mono) array, got shape {a.shape}")
        if n_samples and a.shape[0] > n_samples:
            raise ValueError(f"audio {i}: {a.shape[0] / sr:.1f} s is longer than the model's "
                             f"{n_samples / sr:g} s window; split it with conslu.audio.chunk_audio")
        if seconds is not None and a.shape[0] > int(round(seconds * sr)):
            if a.shape[0] > int(round((seconds + TOLERANCE) * sr)):
                raise ValueError(f"audio {i}: {a.shape[0] / sr:.2f} s is longer than the {seconds:g} s context")
            a = a[: int(round(seconds * sr))]
        if not np.isfinite(a).all():
            raise ValueError(f"audio {i}: contains NaN or infinite samples")
        batch.append(a)
    if not batch:
        frames = n_samples // int(getattr(feature_extractor, "hop_length", 160)) if n_samples else 3000
        return torch.zeros(0, int(feature_extractor.feature_size), frames)
    if seconds is None or (n_samples and int(round(seconds * sr)) >= n_samples):
        out = feature_extractor(batch, sampling_rate=sr, return_tensors="pt")
        return out["input_features"].to(torch.float32)
    hop = int(feature_extractor.hop_length)
    frames = int(round(seconds * sr / hop))
    out = feature_extractor(batch, sampling_rate=sr, return_tensors="pt",
                            max_length=frames * hop + int(getattr(feature_extractor, "n_fft", 400)))
    return out["input_features"][:, :, :frames].to(torch.float32)


@dataclass(frozen=True)
class Features:
    """Log-mel features of a batch, one group per audio context: ``(seconds, indices, [b, n_mels,
    100 * seconds] CPU tensor)``, contexts increasing; ``n`` audios in all."""

    groups: tuple
    n: int

    def __len__(self) -> int:
        return self.n


@dataclass(frozen=True)
class FeatureMaker:
    """Audio arrays -> :class:`Features` for a model's feature extractor and audio context (None:
    30 s windows). Holds no weights, so it runs in DataLoader workers and background threads."""

    feature_extractor: Any
    audio_context: float | None

    def __call__(self, audios: Sequence[np.ndarray]) -> Features:
        from conslu.context import groups

        arrays = [np.asarray(a, dtype=np.float32) for a in audios]
        sr = float(self.feature_extractor.sampling_rate)
        out = tuple((seconds, tuple(idx), log_mel([arrays[i] for i in idx], self.feature_extractor, seconds))
                    for seconds, idx in groups([len(a) / sr for a in arrays], self.audio_context).items())
        return Features(out, len(arrays))
