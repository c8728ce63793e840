"""ConSLU model folders: Whisper + SLU tokenizer + grammar + settings, loss, collate and parse.

A folder holds the Whisper model (safetensors), its generation config, the tokenizer with the
ConSLU tokens, the feature extractor, ``grammar.json`` and ``conslu.json`` (target format,
constraint use, label tokens, version). ``save_pretrained`` writes it atomically (a temporary
sibling folder renamed into place). Target format and constraint use are settings, so every
ablation (simplified/whislu x loss/decoding/both/none) is the same code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from conslu.atomic import atomic_folder, atomic_write_json
from conslu.constraints import Tables, build_tables
from conslu.audio import FeatureMaker, Features, log_mel
from conslu.context import DEFAULT_BUCKET_SECONDS, check_bucket, context_seconds, encode
from conslu.decoding import DEFAULT_MAX_NEW_TOKENS, DecodingOptions, GrammarLogitsProcessor, decode, decode_tokens, resolve
from conslu.grammar import Grammar
from conslu.batch import TargetCollator
from conslu.loss import IGNORE, LossStates, slu_loss
from conslu.tokenizer import SLUTokenizer

CONFIG_NAME = "conslu.json"
GRAMMAR_NAME = "grammar.json"
FORMAT_NAME = "conslu-model"
FORMAT_VERSION = 1
CONSTRAINTS = ("both", "loss", "decoding", "none")
TARGET_FORMATS = ("simplified", "whislu")
__all__ = ["ConSLU", "ModelFolderError", "DEFAULT_MAX_NEW_TOKENS", "DecodingOptions", "is_model_folder"]


class ModelFolderError(ValueError):
    """A folder that is not a usable ConSLU model (the message names the folder and the problem)."""


def _check_settings(target_format: str, constraints: str) -> None:
    if target_format not in TARGET_FORMATS:
        raise ValueError(f"unknown target format {target_format!r}; expected one of {TARGET_FORMATS}")
    if constraints not in CONSTRAINTS:
        raise ValueError(f"unknown constraints setting {constraints!r}; expected one of {CONSTRAINTS}")
    if target_format == "whislu" and constraints != "none":
        raise ValueError("constraints apply to the simplified target only; use constraints='none' with target_format='whislu'")


def _fill_generation_config(model: Any, tok: SLUTokenizer) -> None:
    """Give a bare Whisper generation config the fields Whisper's generate() needs."""
    gc = model.generation_config
    t = tok.tokenizer
    gc.decoder_start_token_id = tok.prefix_ids[0]
    gc.eos_token_id = tok.eos_token_id
    gc.pad_token_id = tok.pad_token_id
    if getattr(gc, "bos_token_id", None) is None:
        gc.bos_token_id = tok.eos_token_id
    gc.no_timestamps_token_id = t.convert_tokens_to_ids("<|notimestamps|>")
    if getattr(gc, "is_multilingual", None) is None:
        gc.is_multilingual = tok.multilingual
    if tok.multilingual:
        if not getattr(gc, "lang_to_id", None):
            gc.lang_to_id = {"<|en|>": t.convert_tokens_to_ids("<|en|>")}
        if not getattr(gc, "task_to_id", None):
            gc.task_to_id = {"transcribe": t.convert_tokens_to_ids("<|transcribe|>")}
    if getattr(gc, "begin_suppress_tokens", None) is None:
        gc.begin_suppress_tokens = [220, tok.eos_token_id]  # " " and <|endoftext|>
    gc.forced_decoder_ids = None
    # Whisper's suppress list bans '{', ' "', ':', ' ]'...: the WhiSLU JSON target needs them, and a
    # fine-tuned SLU model has no use for the pretrained model's punctuation bans.
    gc.suppress_tokens = None
    gc.max_length = int(model.config.max_target_positions)


def _init_new_embeddings(model: Any, tok: SLUTokenizer, old_size: int) -> None:
    """New rows = mean embedding of the ordinary pieces of the token's text (e.g. " create alarm")."""
    inp = model.get_input_embeddings().weight
    out_layer = model.get_output_embeddings()
    out = out_layer.weight if out_layer is not None else None
    tied = out is None or out.data_ptr() == inp.data_ptr()
    t = tok.tokenizer
    with torch.no_grad():
        for new_id in range(old_size, inp.shape[0]):
            token = t.convert_ids_to_tokens(new_id)
            pieces = tok.text_ids(tok.init_text(token)) if token else []
            pieces = [p for p in pieces if p < old_size] or [tok.eos_token_id]
            inp[new_id] = inp[pieces].mean(0)
            if not tied:
                out[new_id] = out[pieces].mean(0)


def _load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if not hasattr(tok, "backend_tokenizer"):
        raise ModelFolderError(f"{path}: the tokenizer has no fast (tokenizers) backend")
    return tok


def is_model_folder(path: str | os.PathLike) -> bool:
    """A ConSLU model folder (it has a ``conslu.json``), as opposed to a base Whisper model."""
    return (Path(path) / CONFIG_NAME).is_file()


class ConSLU:
    """Whisper fine-tuned to emit ``transcript | logical form`` (or the WhiSLU JSON target)."""

    def __init__(self, model: Any, feature_extractor: Any, tokenizer: SLUTokenizer, grammar: Grammar,
                 target_format: str = "simplified", constraints: str = "both",
                 audio_context: float | None = None) -> None:
        _check_settings(target_format, constraints)
        self.model = model
        self.audio_context = check_bucket(audio_context)  # seconds per bucket; None: the 30 s window
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.grammar = grammar
        self.target_format = target_format
        self.constraints = constraints
        self._tables: Tables | None = None
        self._prior: Any = None

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def init(cls, base: str, grammar: Grammar | str | os.PathLike, target_format: str = "simplified",
             constraints: str = "both", audio_context: float | None = DEFAULT_BUCKET_SECONDS) -> "ConSLU":
        """An untrained ConSLU from a Whisper folder / short name and a grammar: a ``Grammar``, a JSON
        file path or a shipped short name such as ``topv2`` (:func:`conslu.grammar.load_grammar`).
        ``audio_context``: the encoder's context bucket in seconds (:mod:`conslu.context`); None
        keeps Whisper's 30 s window."""
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

        from conslu.grammar import load_grammar
        from conslu.pretrained import resolve_model

        _check_settings(target_format, constraints)
        grammar = load_grammar(grammar)
        where = resolve_model(str(base))
        model = WhisperForConditionalGeneration.from_pretrained(where)
        fe = WhisperFeatureExtractor.from_pretrained(where)
        return cls.from_parts(model, fe, _load_tokenizer(where), grammar, target_format, constraints, audio_context)

    @classmethod
    def from_parts(cls, model: Any, feature_extractor: Any, tokenizer: Any, grammar: Grammar,
                   target_format: str = "simplified", constraints: str = "both",
                   audio_context: float | None = None) -> "ConSLU":
        """Add the ConSLU tokens to a (Whisper model, feature extractor, tokenizer) and wrap them."""
        _check_settings(target_format, constraints)
        tok = SLUTokenizer(tokenizer, grammar, target_format)
        old = model.get_input_embeddings().weight.shape[0]
        if len(tok) < old:
            raise ValueError(f"tokenizer has {len(tok)} tokens but the model {old} embeddings")
        if len(tok) > old:
            try:
                model.resize_token_embeddings(len(tok), mean_resizing=False)
            except TypeError:  # transformers without mean_resizing
                model.resize_token_embeddings(len(tok))
            _init_new_embeddings(model, tok, old)
        _fill_generation_config(model, tok)
        return cls(model, feature_extractor, tok, grammar, target_format, constraints, audio_context)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, target_format: str | None = None,
                        constraints: str | None = None, device: Any = None) -> "ConSLU":
        """Load a ConSLU folder. ``target_format``: refuse a folder of another format;
        ``constraints``: override the folder's constraint use (e.g. for an ablation run)."""
        from transformers import WhisperFeatureExtractor, WhisperForConditionalGeneration

        folder = Path(path)
        if not folder.is_dir():
            raise ModelFolderError(f"{folder}: no such ConSLU model folder")
        cfg_path = folder / CONFIG_NAME
        if not cfg_path.is_file():
            raise ModelFolderError(f"{folder}: not a ConSLU model folder (no {CONFIG_NAME}); make one with `conslu init`")
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ModelFolderError(f"{cfg_path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(cfg, dict) or cfg.get("format") != FORMAT_NAME:
            raise ModelFolderError(f"{cfg_path}: not a ConSLU model config (format {cfg.get('format') if isinstance(cfg, dict) else None!r})")
        if int(cfg.get("version", 0)) > FORMAT_VERSION:
            raise ModelFolderError(f"{cfg_path}: format version {cfg.get('version')} is newer than this conslu ({FORMAT_VERSION})")
        fmt = cfg.get("target_format")
        if fmt not in TARGET_FORMATS:
            raise ModelFolderError(f"{cfg_path}: unknown target_format {fmt!r}")
        if target_format is not None and target_format != fmt:
            raise ModelFolderError(f"{folder}: a {fmt!r}-target model, but target format {target_format!r} was asked for")
        grammar_path = folder / GRAMMAR_NAME
        if not grammar_path.is_file():
            raise ModelFolderError(f"{folder}: no {GRAMMAR_NAME} (a ConSLU folder needs the grammar its label tokens came from)")
        grammar = Grammar.load(grammar_path)
        labels = list(cfg.get("label_tokens") or [])
        tokenizer = _load_tokenizer(folder)
        structure = [t for t in ("<[>", "<]>", "<|>") if t in tokenizer.get_added_vocab()]
        if fmt == "whislu" and (labels or structure):
            raise ModelFolderError(
                f"{cfg_path}: says target_format 'whislu', but the tokenizer carries the simplified target's "
                f"label/structure tokens ({len(labels)} labels, {structure}): a checkpoint of another target format")
        if fmt == "simplified" and not structure:
            raise ModelFolderError(
                f"{cfg_path}: says target_format 'simplified', but the tokenizer has no <[> <]> <|> tokens: "
                f"a checkpoint of another target format (whislu?)")
        if fmt == "simplified":
            added = tokenizer.get_added_vocab()
            missing_tok = [lab for lab in grammar.labels if lab not in added]
            if missing_tok or labels != grammar.labels:
                diff = sorted(set(grammar.labels) ^ set(labels)) or missing_tok
                raise ModelFolderError(
                    f"{grammar_path}: grammar does not match the tokenizer's label tokens "
                    f"({len(grammar.labels)} grammar labels vs {len(labels)} label tokens; first differences: {diff[:5]})")
        model = WhisperForConditionalGeneration.from_pretrained(str(folder))
        fe = WhisperFeatureExtractor.from_pretrained(str(folder))
        tok = SLUTokenizer(tokenizer, grammar, fmt)
        if model.get_input_embeddings().weight.shape[0] != len(tok):
            raise ModelFolderError(f"{folder}: model has {model.get_input_embeddings().weight.shape[0]} embeddings, tokenizer {len(tok)} tokens")
        _fill_generation_config(model, tok)
        try:
            context = check_bucket(cfg.get("audio_context"))  # absent in older folders: the 30 s window
        except (TypeError, ValueError) as e:
            raise ModelFolderError(f"{cfg_path}: audio_context: {e}") from None
        obj = cls(model, fe, tok, grammar, fmt, constraints or cfg.get("constraints", "both"), context)
        if device is not None:
            obj.to(device)
        return obj

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the folder atomically: into a temporary sibling, then rename over ``path``."""
        with atomic_folder(path) as tmp:
            self.write_files(tmp)
        return Path(path)

    def write_files(self, folder: Path) -> None:
        """Write every file of a ConSLU folder into ``folder`` (not atomic: see ``save_pretrained``)."""
        self.model.save_pretrained(str(folder))
        self.tokenizer.tokenizer.save_pretrained(str(folder))
        self.feature_extractor.save_pretrained(str(folder))
        self.grammar.save(folder / GRAMMAR_NAME)
        cfg = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "target_format": self.target_format,
               "constraints": self.constraints, "label_tokens": list(self.tokenizer.label_tokens),
               "structure_tokens": {"open": self.tokenizer.open_id, "close": self.tokenizer.close_id,
                                    "separator": self.tokenizer.sep_id},
               "prefix_ids": list(self.tokenizer.prefix_ids), "audio_context": self.audio_context}
        atomic_write_json(folder / CONFIG_NAME, cfg, indent=2)

    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "ConSLU":
        """Move the Whisper model to ``device`` and/or cast it to ``dtype`` (bf16/fp16 inference)."""
        self.model.to(device=device, dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- constraint tables ------------------------------------------------------------------
    @property
    def tables(self) -> Tables | None:
        """Constraint tables on the model's device (None for the WhiSLU format)."""
        if self.target_format != "simplified":
            return None
        V = self.model.get_output_embeddings().weight.shape[0]
        if self._tables is None or self._tables.vocab_size != V:
            self._tables = build_tables(self.tokenizer, V)
        if self._tables.device != self.device:
            self._tables = self._tables.to(self.device)
        return self._tables

    @property
    def loss_constrained(self) -> bool:
        return self.target_format == "simplified" and self.constraints in ("both", "loss")

    @property
    def decode_constrained(self) -> bool:
        return self.target_format == "simplified" and self.constraints in ("both", "decoding")

    # -- training ---------------------------------------------------------------------------
    def collate(self, examples: Sequence[tuple[str, str, dict] | tuple[str, str]], *,
                with_states: bool | None = None) -> dict[str, Any]:
        """(transcript, logical_form[, meta]) examples -> padded ``decoder_input_ids`` [B, T] and
        ``labels`` [B, T] (prompt and padding -100), plus ``loss_states`` (teacher-forced constraint
        states, CPU) when the loss is constrained - pass them to ``loss`` to keep the state machine
        off the training step. decoder_input_ids = prompt + target[:-1]; labels = [-100] * (P-1) + target."""
        states = self.loss_constrained if with_states is None else with_states
        return TargetCollator(self.tokenizer, self.tables)(examples, with_states=bool(states))

    def decoder_inputs(self, labels: Tensor) -> Tensor:
        """decoder_input_ids for labels laid out by ``collate``."""
        prefix = torch.tensor(self.tokenizer.prefix_ids, device=labels.device)
        P = prefix.shape[0]
        body = labels[:, P - 1 : -1]
        body = torch.where(body == IGNORE, self.tokenizer.pad_token_id, body)
        return torch.cat([prefix.expand(labels.shape[0], P), body], 1)

    def loss(self, input_features: Tensor | None, labels: Tensor, *, decoder_input_ids: Tensor | None = None,
             loss_states: LossStates | None = None, encoder_outputs: Any = None) -> Tensor:
        """Training loss (constrained per ``self.constraints``); give ``encoder_outputs`` instead of
        ``input_features`` for a cached frozen encoder. Features may be cut to an audio context."""
        if decoder_input_ids is None:
            decoder_input_ids = self.decoder_inputs(labels)
        if encoder_outputs is None:
            encoder_outputs = (encode(self.model.get_encoder(), input_features),)
        out = self.model(encoder_outputs=encoder_outputs, decoder_input_ids=decoder_input_ids, use_cache=False)
        return slu_loss(out.logits, labels, self.tables if self.loss_constrained else None,
                        constrained=self.loss_constrained, states=loss_states)

    # -- inference --------------------------------------------------------------------------
    def context(self, audio: np.ndarray) -> float:
        """The seconds the encoder reads for this audio: its length rounded up to ``audio_context``
        seconds, or Whisper's 30 s window (:func:`conslu.context.context_seconds`)."""
        return context_seconds(len(audio) / self.sampling_rate, self.audio_context)

    @property
    def sampling_rate(self) -> int:
        return int(self.feature_extractor.sampling_rate)

    def features(self, audios: Sequence[np.ndarray], seconds: float | None = None) -> Tensor:
        """Log-mel features [B, n_mels, 100 * seconds] on the model's device and dtype; ``seconds``
        defaults to the longest audio's context (:meth:`context`)."""
        arrays = [np.asarray(a, dtype=np.float32) for a in audios]
        if seconds is None:
            seconds = max(self.context(a) for a in arrays)
        feats = log_mel(arrays, self.feature_extractor, seconds)
        return feats.to(self.device, dtype=next(self.model.parameters()).dtype)

    @property
    def feature_maker(self) -> FeatureMaker:
        """Audio -> log-mels grouped by audio context, without the weights (for loader workers)."""
        return FeatureMaker(self.feature_extractor, self.audio_context)

    def _by_context(self, audios: "Sequence[np.ndarray] | Features", run: Any) -> list:
        """``run(features)`` once per audio context (each audio at its own), results in input order.
        ``audios`` may be made into :class:`conslu.audio.Features` already (by :attr:`feature_maker`)."""
        feats = audios if isinstance(audios, Features) else self.feature_maker(audios)
        out: list = [None] * len(feats)
        dtype = next(self.model.parameters()).dtype
        for _, idx, f in feats.groups:
            for i, r in zip(idx, run(f.to(self.device, dtype=dtype))):
                out[i] = r
        return out

    def logits_processor(self, max_length: int | None) -> GrammarLogitsProcessor:
        """The constrained ``LogitsProcessor`` for ``self.model.generate`` (prompt = ``tokenizer.prefix_ids``)."""
        tables = self.tables
        if tables is None:
            raise ValueError("constrained decoding needs the simplified target format")
        return GrammarLogitsProcessor(tables, len(self.tokenizer.prefix_ids), max_length)

    @property
    def label_drafter(self) -> Any:
        """Label drafts for copy-speculative decoding (``conslu.speculative.label_prior``), built once."""
        from conslu.speculative import label_prior

        tables = self.tables
        if self._prior is None or self._prior.token_ids.device != tables.device:
            self._prior = label_prior(self.tokenizer, tables)
        return self._prior

    def check(self, options: DecodingOptions) -> None:
        """Raise ValueError when ``options`` do not suit this model (length budget, prompt language)."""
        resolve(self, options)

    def generate(self, input_features: Tensor, options: DecodingOptions | None = None, **overrides: Any) -> list[list[int]]:
        """Token rows (prompt included) for a batch of log-mel features (``conslu.decoding.decode_tokens``)."""
        return decode_tokens(self, _options(options, overrides), input_features=input_features)

    def parse(self, audios: "Sequence[np.ndarray] | Features", options: DecodingOptions | None = None,
              **overrides: Any) -> list[dict]:
        """Transcribe and parse audio (16 kHz float arrays, or their :class:`conslu.audio.Features`):
        dicts with transcript, logical_form ("" when none), valid (a well-formed tree allowed by the
        grammar) and text (raw decoded).
        ``options`` (``DecodingOptions``) or its fields as keywords: ``slu.parse(audios, beam_size=4)``."""
        if not len(audios):
            return []
        opts = _options(options, overrides)
        return self._by_context(audios, lambda feats: decode(self, opts, input_features=feats))

    def result(self, ids: Sequence[int]) -> dict:
        transcript, lf = self.tokenizer.decode(ids)
        return {"transcript": transcript, "logical_form": lf or "", "valid": bool(lf) and self.grammar.is_valid(lf),
                "text": self.tokenizer.text(ids)}


def _options(options: DecodingOptions | None, overrides: dict) -> DecodingOptions:
    options = options or DecodingOptions()
    return options.replace(**overrides) if overrides else options
