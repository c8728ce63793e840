"""conslu.audio: loading every common file kind as 16 kHz mono float32, clear errors, log-mels."""

from __future__ import annotations

import os
import struct

import numpy as np
import pytest
import soundfile as sf

from conslu import audio
from conslu.audio import AudioError, chunk_audio, load_audio, log_mel

SR = 16000


def tone(seconds: float, sr: int, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_hz(x: np.ndarray, sr: int = SR) -> float:
    spec = np.abs(np.fft.rfft(x))
    return float(np.argmax(spec) * sr / len(x))


def expect_error(path, fragment: str, **kw) -> AudioError:
    with pytest.raises(AudioError) as ei:
        load_audio(path, **kw)
    e = ei.value
    assert str(e).startswith(f"{path}: "), str(e)
    assert fragment in e.reason, e.reason
    return e


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000])
def test_any_sample_rate_becomes_16k(tmp_path, sr):
    p = tmp_path / f"tone_{sr}.wav"
    sf.write(p, tone(1.0, sr), sr, subtype="PCM_16")
    x = load_audio(p)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - SR) <= 2
    assert abs(peak_hz(x) - 440.0) < 3.0
    assert 0.3 < np.sqrt(np.mean(x[200:-200] ** 2)) < 0.4  # 0.5 / sqrt(2) kept through resampling


@pytest.mark.parametrize("fmt,subtype,ext", [
    ("WAV", "PCM_24", "wav"), ("WAV", "PCM_32", "wav"), ("WAV", "FLOAT", "wav"), ("WAV", "PCM_U8", "wav"),
    ("FLAC", "PCM_16", "flac"), ("FLAC", "PCM_24", "flac"), ("OGG", "VORBIS", "ogg"), ("MP3", "MPEG_LAYER_III", "mp3"),
])
def test_bit_depths_and_formats(tmp_path, fmt, subtype, ext):
    if fmt not in sf.available_formats() or subtype not in sf.available_subtypes(fmt):
        pytest.skip(f"libsndfile here cannot write {fmt}/{subtype}")
    p = tmp_path / f"x.{ext}"
    sf.write(p, tone(1.0, 44100), 44100, format=fmt, subtype=subtype)
    x = load_audio(p)
    assert x.dtype == np.float32 and x.ndim == 1
    assert abs(len(x) - SR) < 0.08 * SR  # mp3/vorbis add encoder padding
    assert abs(peak_hz(x) - 440.0) < 5.0


def test_stereo_is_mixed_down(tmp_path):
    p = tmp_path / "stereo.wav"
    left = tone(1.0, 48000)
    sf.write(p, np.stack([left, np.zeros_like(left)], axis=1), 48000, subtype="PCM_24")
    x = load_audio(p)
    assert x.ndim == 1 and abs(len(x) - SR) <= 2
    assert np.max(np.abs(x[100:-100])) == pytest.approx(0.25, abs=0.01)  # mean of the two channels


def test_silence_and_clipping_load(tmp_path):
    sf.write(tmp_path / "silence.wav", np.zeros(SR, np.float32), SR, subtype="PCM_16")
    assert not load_audio(tmp_path / "silence.wav").any()
    square = np.sign(tone(1.0, SR)).astype(np.float32) * 1.5  # clipped when stored as 16-bit
    sf.write(tmp_path / "clipped.wav", square, SR, subtype="PCM_16")
    x = load_audio(tmp_path / "clipped.wav")
    assert np.isclose(np.abs(x).max(), 1.0, atol=1e-3)


def test_long_audio_refused_unless_asked(tmp_path):
    p = tmp_path / "long.wav"
    sf.write(p, tone(31.0, 8000), 8000, subtype="PCM_16")
    e = expect_error(p, "31.0 s long")
    assert "chunk_audio" in e.reason and "max_seconds=None" in e.reason
    x = load_audio(p, max_seconds=None)
    assert len(x) == 31 * SR
    pieces = chunk_audio(x)
    assert [len(c) for c in pieces] == [30 * SR, SR]
    assert np.array_equal(np.concatenate(pieces), x)
    assert len(load_audio(p, max_seconds=40)) == 31 * SR
    expect_error(p, "more than the model's 5 s window", max_seconds=5)


def test_chunk_audio_edges():
    assert chunk_audio(np.zeros(0, np.float32)) == []
    assert [len(c) for c in chunk_audio(np.zeros(SR * 3, np.float32), seconds=1.0)] == [SR] * 3
    with pytest.raises(ValueError):
        chunk_audio(np.zeros((2, 10)))
    with pytest.raises(ValueError):
        chunk_audio(np.zeros(10), seconds=0)


def test_missing_directory_empty(tmp_path):
    expect_error(tmp_path / "nope.wav", "no such file")
    expect_error(tmp_path, "is a directory")
    (tmp_path / "empty.wav").write_bytes(b"")
    expect_error(tmp_path / "empty.wav", "empty file")


def test_zero_length_audio(tmp_path):
    p = tmp_path / "zero.wav"
    sf.write(p, np.zeros(0, np.float32), SR, subtype="PCM_16")
    expect_error(p, "zero length")


def test_truncated_and_corrupt_wav(tmp_path):
    good = tmp_path / "good.wav"
    sf.write(good, tone(1.0, SR), SR, subtype="PCM_16")
    data = good.read_bytes()
    cut = tmp_path / "cut.wav"
    cut.write_bytes(data[: len(data) // 2])
    expect_error(cut, "truncated wav")
    header_only = tmp_path / "header.wav"
    header_only.write_bytes(data[:20])
    expect_error(header_only, "corrupt wav")
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(data[:12] + os.urandom(200))
    with pytest.raises(AudioError) as ei:
        load_audio(garbage)
    assert str(ei.value).startswith(f"{garbage}: ")


def test_streamed_wav_with_placeholder_size_loads(tmp_path):
    """Wavs written to a pipe (espeak-ng --stdout, ffmpeg -) carry 0x7FFFFFFF-ish sizes: not truncation."""
    p = tmp_path / "stream.wav"
    sf.write(p, tone(0.5, SR), SR, subtype="PCM_16")
    data = bytearray(p.read_bytes())
    pos = data.index(b"data")
    data[pos + 4: pos + 8] = struct.pack("<I", 0x7FFFF000)
    data[4:8] = struct.pack("<I", 0x7FFFF024)
    p.write_bytes(bytes(data))
    assert len(load_audio(p)) == SR // 2


def test_text_file_named_wav_and_unknown_format(tmp_path):
    txt = tmp_path / "notes.wav"
    txt.write_text("this is not audio, just text\nsecond line\n")
    expect_error(txt, "not audio")
    blob = tmp_path / "blob.m4a"
    blob.write_bytes(b"\x00\x00\x00\x18ftypM4A " + os.urandom(300))
    expect_error(blob, "unsupported audio format")
    rnd = tmp_path / "random.bin"
    rnd.write_bytes(b"\x00\x01" + os.urandom(500))
    expect_error(rnd, "not audio or an unsupported format")


def test_non_finite_samples(tmp_path):
    x = tone(0.5, SR)
    x[100] = np.nan
    p = tmp_path / "nan.wav"
    sf.write(p, x, SR, subtype="FLOAT")
    expect_error(p, "NaN or infinite")


def test_unreadable_permissions(tmp_path, monkeypatch):
    p = tmp_path / "secret.wav"
    sf.write(p, tone(0.5, SR), SR, subtype="PCM_16")
    if os.geteuid() != 0:
        p.chmod(0)
        try:
            expect_error(p, "permission denied")
        finally:
            p.chmod(0o644)
        return
    # root ignores file modes: simulate what open() raises for everyone else
    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(audio, "open", denied, raising=False)
    expect_error(p, "permission denied")


def test_audio_error_is_value_error_with_fields(tmp_path):
    e = expect_error(tmp_path / "x.wav", "no such file")
    assert isinstance(e, ValueError)
    assert e.path == str(tmp_path / "x.wav")


@pytest.mark.parametrize("n_mels", [80, 128])
def test_log_mel_shapes(n_mels):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=n_mels)
    feats = log_mel([tone(1.0, SR), tone(2.5, SR, freq=1000.0), np.zeros(SR * 30, np.float32)], fe)
    assert feats.shape == (3, n_mels, 3000)
    assert feats.dtype.is_floating_point
    assert not feats[0].equal(feats[1])
    # matches the extractor called directly
    direct = fe([tone(1.0, SR)], sampling_rate=SR, return_tensors="pt")["input_features"]
    assert np.allclose(feats[0].numpy(), direct[0].numpy(), atol=1e-5)
    assert log_mel([], fe).shape == (0, n_mels, 3000)


def test_log_mel_refuses_what_whisper_would_cut():
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    with pytest.raises(ValueError, match="audio 1: 31.0 s is longer"):
        log_mel([tone(1.0, SR), np.zeros(31 * SR, np.float32)], fe)
    with pytest.raises(ValueError, match="audio 0: expected a 1-D"):
        log_mel([np.zeros((2, SR), np.float32)], fe)
    bad = tone(1.0, SR)
    bad[5] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        log_mel([bad], fe)


def test_duration_from_header(tmp_path):
    p = tmp_path / "d.flac"
    sf.write(p, tone(2.0, 22050), 22050)
    assert audio.duration(p) == pytest.approx(2.0)
    with pytest.raises(AudioError):
        audio.duration(tmp_path / "missing.wav")
