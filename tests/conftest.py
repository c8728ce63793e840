"""Shared pytest fixtures: tokenizers, tiny Whisper models (English-only and multilingual), a fake
model for the command tests, a wav factory and the TOPv2 text.

TOPv2: ``topv2_sample`` is the small sample shipped in ``tests/data/topv2`` (every test can use it);
``topv2_full`` is the whole release, from ``CONSLU_TOPV2_DIR`` (or a ``shared/data/topv2`` folder
beside the checkout, where CI keeps it), and skips the test with the reason when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOPV2_SAMPLE = REPO / "tests" / "data" / "topv2"


def full_topv2_dir() -> Path | None:
    """The whole TOPv2 release, or None."""
    env = os.environ.get("CONSLU_TOPV2_DIR")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data" / "topv2"]:
        if any(candidate.glob("*_train.tsv")):
            return candidate
    return None


TOPV2_DIR = full_topv2_dir()
NO_TOPV2 = f"the full TOPv2 release is not here (set CONSLU_TOPV2_DIR; tried {os.environ.get('CONSLU_TOPV2_DIR') or REPO.parent / 'shared' / 'data' / 'topv2'})"


@pytest.fixture(scope="session")
def topv2_sample() -> Path:
    return TOPV2_SAMPLE


@pytest.fixture(scope="session")
def topv2_full() -> Path:
    if TOPV2_DIR is None:
        pytest.skip(NO_TOPV2)
    return TOPV2_DIR


@pytest.fixture(scope="session")
def whisper_tok():
    """The real tiny.en Whisper tokenizer."""
    from slu_fixtures import whisper_tokenizer

    return whisper_tokenizer()


@pytest.fixture(scope="session")
def slu_tok():
    """SLUTokenizer on tiny.en with the shipped TOPv2 grammar."""
    from slu_fixtures import slu_tokenizer

    return slu_tokenizer()


@pytest.fixture(scope="session")
def multilingual_slu_tok():
    """SLUTokenizer on the multilingual (base) Whisper tokenizer; skips when it is not installed."""
    from decoder_fixtures import multilingual_slu_tokenizer

    return multilingual_slu_tokenizer()


@pytest.fixture
def tiny_en():
    """A tiny random English-only ConSLU model (real tiny.en tokenizer, TOPv2 grammar)."""
    from slu_fixtures import tiny_conslu

    return tiny_conslu(0)


@pytest.fixture
def tiny_multilingual():
    """A tiny random multilingual ConSLU model (base tokenizer, 51865 ids)."""
    from decoder_fixtures import untrained

    return untrained("multi")


@pytest.fixture
def fake_model():
    """A stand-in for ConSLU with the ``parse``/``check`` interface (answers by sample count)."""
    from parse_fixtures import FakeModel

    return FakeModel()


@pytest.fixture
def wav_factory(tmp_path):
    """``make(name, n_samples, freq=440.0)`` writes a 16 kHz mono sine wav and returns its path."""
    from parse_fixtures import write_wav

    def make(name: str, n_samples: int, freq: float = 440.0) -> Path:
        return write_wav(tmp_path / name, n_samples, freq)

    return make
