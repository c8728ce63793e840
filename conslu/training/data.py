"""Examples and batches: a dataset over table rows and the collators that pad them.

The collators hold the tokenizer, the feature extractor and CPU constraint tables only - never the
Whisper weights - so data-loader workers can pickle them and never touch a CUDA model.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from conslu.audio import load_audio, log_mel
from conslu.constraints import Tables
from conslu.loss import IGNORE, teacher_states

__all__ = ["SLUExamples", "TargetCollator", "SLUCollator", "cpu_tables"]

META = ("gender", "native", "domain")


class SLUExamples(Dataset):
    """Rows of a :mod:`conslu.data` table; yields each row (plus its ``index``) with its audio, or
    with its encoder output from ``cache`` (an :class:`conslu.features.EncoderCache`)."""

    def __init__(
        self,
        rows: list[dict],
        *,
        cache: Any | None = None,
        cache_keys: list[str] | None = None,
        max_seconds: float | None = 30.0,
    ) -> None:
        self.rows = rows
        self.cache = cache
        self.cache_keys = cache_keys
        self.max_seconds = max_seconds

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        row = dict(self.rows[i], index=i)
        if self.cache is not None:
            assert self.cache_keys is not None
            value = self.cache.get(self.cache_keys[i])
            if value is None:
                raise KeyError(f"{row.get('audio')}: encoder output missing from the cache")
            row["encoder_output"] = value
        else:
            if not row.get("audio"):
                raise ValueError(f"example {row.get('id')!r} has no audio file; training needs speech")
            row["audio_array"] = load_audio(row["audio"], max_seconds=self.max_seconds)
        return row


def cpu_tables(slu: Any) -> Tables | None:
    """The model's constraint tables on the CPU (None for the WhiSLU format)."""
    tables = slu.tables
    return None if tables is None else tables.to("cpu")


class TargetCollator:
    """(transcript, logical form[, meta]) examples -> ``decoder_input_ids`` and ``labels`` [B, T]
    (prompt and padding -100) and, with ``with_states``, the teacher-forced ``loss_states`` of the
    constrained loss: the batch :meth:`conslu.model.ConSLU.collate` makes, from the tokenizer and
    CPU tables alone (``tests/test_train.py`` checks that the two agree)."""

    def __init__(self, tokenizer: Any, tables: Tables | None = None, *, with_states: bool = False) -> None:
        if with_states and tables is None:
            raise ValueError("constraint states need the simplified target format (constraint tables)")
        self.tokenizer = tokenizer
        self.tables = tables
        self.with_states = with_states

    @classmethod
    def for_model(cls, slu: Any) -> "TargetCollator":
        """The collator of a :class:`conslu.model.ConSLU` (states when its loss is constrained)."""
        return cls(slu.tokenizer, cpu_tables(slu), with_states=bool(slu.loss_constrained))

    def __call__(self, examples: Sequence[tuple], *, with_states: bool | None = None) -> dict[str, Any]:
        prefix = self.tokenizer.prefix_ids
        P = len(prefix)
        targets = []
        for ex in examples:
            meta = dict(ex[2]) if len(ex) > 2 and ex[2] else {}
            targets.append(self.tokenizer.encode(ex[0], ex[1], **{k: meta[k] for k in META if k in meta}))
        T = P - 1 + max(len(t) for t in targets)
        dec = torch.full((len(targets), T), self.tokenizer.pad_token_id, dtype=torch.long)
        lab = torch.full((len(targets), T), IGNORE, dtype=torch.long)
        for i, t in enumerate(targets):
            seq = prefix + t
            dec[i, : len(seq) - 1] = torch.tensor(seq[:-1])
            lab[i, P - 1 : P - 1 + len(t)] = torch.tensor(t)
        out: dict[str, Any] = {"decoder_input_ids": dec, "labels": lab}
        if self.with_states if with_states is None else with_states:
            assert self.tables is not None
            out["loss_states"] = teacher_states(lab, self.tables)
        return out


class SLUCollator:
    """Examples -> padded batch: input_features (or encoder_outputs), decoder_input_ids, labels,
    loss_states, refs (id, index, transcript, logical_form, domain) and target_rows.

    ``strict=False`` (validation) keeps examples whose target cannot be encoded (a label the grammar
    lacks): they are decoded and scored but have no loss; ``target_rows`` lists the others.
    """

    def __init__(self, targets: TargetCollator, feature_extractor: Any, *, strict: bool = True) -> None:
        self.targets = targets
        self.feature_extractor = feature_extractor
        self.strict = strict

    @classmethod
    def for_model(cls, slu: Any, *, strict: bool = True) -> "SLUCollator":
        return cls(TargetCollator.for_model(slu), slu.feature_extractor, strict=strict)

    @staticmethod
    def _target(e: dict) -> tuple[str, str, dict]:
        return e.get("transcript") or "", e.get("logical_form") or "", {k: e.get(k) for k in META}

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "refs": [
                {
                    "id": str(e["id"]),
                    "index": e.get("index"),
                    "transcript": e.get("transcript") or "",
                    "logical_form": e.get("logical_form") or "",
                    "domain": e.get("domain"),
                }
                for e in examples
            ]
        }
        if "encoder_output" in examples[0]:
            batch["encoder_outputs"] = torch.stack([e["encoder_output"] for e in examples])
        else:
            batch["input_features"] = log_mel([e["audio_array"] for e in examples], self.feature_extractor)
        ok = []
        for i, e in enumerate(examples):
            transcript, lf, meta = self._target(e)
            try:
                self.targets.tokenizer.encode(transcript, lf, **meta)
                ok.append(i)
            except ValueError as err:
                if self.strict:
                    raise ValueError(f"example {e.get('id')!r}: {err}") from None
        batch["target_rows"] = ok
        if ok:
            batch.update(self.targets([self._target(examples[i]) for i in ok]))
        return batch
