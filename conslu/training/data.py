"""Examples and batches: a dataset over table rows and the collators that pad them.

The collators hold the tokenizer, the feature extractor and CPU constraint tables only - never the
Whisper weights - so data-loader workers can pickle them and never touch a CUDA model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from conslu.audio import AudioError, load_audio, log_mel
from conslu.batch import META, TargetCollator
from conslu.context import context_seconds

__all__ = ["SLUExamples", "TargetCollator", "SLUCollator"]


class SLUExamples(Dataset):
    """Rows of a :mod:`conslu.data` table; yields each row (plus its ``index``) with its audio, or
    with its encoder output from ``cache`` (an :class:`conslu.features.EncoderCache`). A file that
    cannot be read yields the row with ``audio_error`` (the collator leaves it out of the batch)."""

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
            try:
                row["audio_array"] = load_audio(row["audio"], max_seconds=self.max_seconds)
            except AudioError as e:
                row["audio_error"] = str(e)
        return row


class SLUCollator:
    """Examples -> padded batch: input_features (or encoder_outputs), decoder_input_ids, labels,
    loss_states, refs (id, index, transcript, logical_form, domain) and target_rows.

    ``strict=False`` (validation) keeps examples whose target cannot be encoded (a label the grammar
    lacks): they are decoded and scored but have no loss; ``target_rows`` lists the others.
    Examples whose audio could not be read are left out; ``skipped_audio`` holds their messages
    (a batch of such examples only has no ``refs``).
    """

    def __init__(self, targets: TargetCollator, feature_extractor: Any, *, strict: bool = True,
                 audio_context: float | None = None) -> None:
        self.targets = targets
        self.feature_extractor = feature_extractor
        self.strict = strict
        self.audio_context = audio_context

    @classmethod
    def for_model(cls, slu: Any, *, strict: bool = True) -> "SLUCollator":
        return cls(TargetCollator.for_model(slu), slu.feature_extractor, strict=strict, audio_context=slu.audio_context)

    def features(self, audios: list) -> torch.Tensor:
        """Log-mels of a batch: cut to its longest audio's context (batches do not mix contexts:
        :class:`conslu.training.sampling.BucketBatchSampler` with ``groups``), or 30 s windows."""
        sr = int(self.feature_extractor.sampling_rate)
        seconds = max(context_seconds(len(a) / sr, self.audio_context) for a in audios)  # 30: the window
        return log_mel(audios, self.feature_extractor, seconds)

    @staticmethod
    def _target(e: dict) -> tuple[str, str, dict]:
        return e.get("transcript") or "", e.get("logical_form") or "", {k: e.get(k) for k in META}

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        skipped = [e["audio_error"] for e in examples if "audio_error" in e]
        examples = [e for e in examples if "audio_error" not in e]
        if not examples:
            return {"refs": [], "target_rows": [], "skipped_audio": skipped}
        batch: dict[str, Any] = {
            "skipped_audio": skipped,
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
            lengths = {e["encoder_output"].shape[0] for e in examples}
            if len(lengths) > 1:
                raise ValueError(f"cached encoder outputs of {sorted(lengths)} positions in one batch: "
                                 "batches must not mix audio contexts (BucketBatchSampler groups)")
            batch["encoder_outputs"] = torch.stack([e["encoder_output"] for e in examples])
        else:
            batch["input_features"] = self.features([e["audio_array"] for e in examples])
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
