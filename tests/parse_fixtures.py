"""Helpers for the parse/evaluate tests: a fake model with the ConSLU.parse interface, wav writing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000


def write_wav(path: Path, n_samples: int, freq: float = 440.0) -> Path:
    """A sine tone of exactly ``n_samples`` samples (16 kHz mono); the length identifies the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(n_samples) / SR
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), SR, subtype="PCM_16")
    return path


class Stop(BaseException):
    """Simulates the process being stopped (like KeyboardInterrupt, not caught as an error)."""


class FakeModel:
    """Stands in for ConSLU: ``parse`` answers from a table keyed by the audio's sample count
    (default: a transcript naming the length) and records every call."""

    def __init__(self, answers: dict[int, tuple[str, str]] | None = None, *, stop_after: int | None = None,
                 fail_on_call: int | None = None, grammar=None) -> None:
        self.answers = answers or {}
        self.stop_after = stop_after
        self.fail_on_call = fail_on_call
        self.calls: list[dict] = []
        self.grammar = grammar

    def to(self, device=None, dtype=None):
        self.device = device
        self.dtype = dtype
        return self

    def check(self, options):
        """ConSLU.check: the options suit the model (always, here)."""

    def parse(self, audios, options=None):
        from conslu.decoding import DecodingOptions

        o = options or DecodingOptions()
        if self.stop_after is not None and len(self.calls) >= self.stop_after:
            raise Stop("killed")
        self.calls.append({"n": len(audios), "lengths": [len(a) for a in audios], "beam": o.beam_size,
                           "constrained": o.constrained, "max_new_tokens": o.max_new_tokens, "speculative": o.speculative})
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise RuntimeError("CUDA out of memory (fake)")
        out = []
        for a in audios:
            assert isinstance(a, np.ndarray) and a.dtype == np.float32 and a.ndim == 1
            transcript, lf = self.answers.get(len(a), (f"n {len(a)}", "[IN:GET_WEATHER ]"))
            out.append({"transcript": transcript, "logical_form": lf, "valid": True, "text": f"{transcript} | {lf}"})
        return out


def strip_timing(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
    for r in rows:
        assert isinstance(r.pop("seconds"), float)
    return rows
