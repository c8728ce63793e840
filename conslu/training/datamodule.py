"""The Lightning data module: STOP-layout manifests -> training and validation loaders.

It only loads data. What it needs from the model comes in through :meth:`SLUDataModule.connect`
(the ConSLU model's tokenizer, feature extractor and constraint tables) and, for a frozen encoder
with cached outputs, :attr:`SLUDataModule.encoder_cache` (filled by the LightningModule); under a
Trainer, :class:`conslu.training.module.SLUModule` does both in its ``setup``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from conslu.context import context_seconds
from conslu.data import DataError, read_stop, spread
from conslu.training.data import SLUCollator, SLUExamples, TargetCollator
from conslu.training.rows import (audio_paths, report_notes, report_skipped, row_location, target_length,
                                  unlearnable_rows, usable_audio)
from conslu.training.sampling import BucketBatchSampler, ResumableDataLoader

__all__ = ["SLUDataModule"]


class SLUDataModule(pl.LightningDataModule):
    """STOP-layout data for training and validation.

    Args:
        data_dir: STOP root (``manifests/*.tsv`` + audio), official or made by ``conslu synth``.
        train_split / val_split: manifest names (``train``, ``eval``, ``test``).
        domains: keep only these domains (all when None).
        limit_train: at most this many training examples (the first, after the domain filter).
        limit_val: validate on this many examples, spread evenly over the split (a fixed subset
            covering every domain); with ``trainer.val_check_interval: N`` (and
            ``trainer.check_val_every_n_epoch: null``) that subset is decoded every N steps.
        batch_size: per device; the effective batch is batch_size x devices x accumulate_grad_batches.
        val_batch_size: decoding batch size (default: batch_size).
        bucket_size: batches per length bucket (1 = sort each batch alone, i.e. no bucketing effect).
        bucket_by: ``target`` (characters of transcript + logical form; free) or ``duration``
            (audio length from the file headers).
        cache_dir: folder for cached encoder outputs when the model caches them (None: in memory).
        skip_bad: skip malformed manifest rows (reported by the reader) instead of failing.

    Rows with an empty reference tree, and rows whose audio is unreadable, empty or longer than
    ``max_audio_seconds`` (checked from the file headers when the split is read), are left out
    and reported with their count; a file that fails later, when its samples are read, is left
    out of its batch and counted (``train/skipped_audio``).
    """

    def __init__(
        self,
        data_dir: str,
        train_split: str = "train",
        val_split: str = "eval",
        domains: list[str] | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        batch_size: int = 16,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        bucket_size: int = 50,
        bucket_by: Literal["target", "duration"] = "target",
        shuffle: bool = True,
        seed: int = 0,
        max_audio_seconds: float = 30.0,
        cache_dir: str | None = None,
        skip_bad: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.train_split = train_split
        self.val_split = val_split
        self.domains = domains
        self.limit_train = limit_train
        self.limit_val = limit_val
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.bucket_size = bucket_size
        self.bucket_by = bucket_by
        self.shuffle = shuffle
        self.seed = seed
        self.max_audio_seconds = max_audio_seconds
        self.cache_dir = cache_dir
        self.skip_bad = skip_bad
        self.train_rows: list[dict] | None = None
        self.val_rows: list[dict] | None = None
        self.targets: TargetCollator | None = None  # set by connect()
        self.feature_extractor: Any = None
        self.audio_context: float | None = None  # the model's (set by connect())
        self._labels: list[str] | None = None
        self._rows_checked = False
        #: an EncoderCache holding every row's encoder output (None: load audio, compute log-mels)
        self.encoder_cache: Any = None

    # -- reading -----------------------------------------------------------------------------
    def _read(self, split: str, limit: int | None, evenly: bool = False) -> list[dict]:
        skipped: list[str] = []
        notes: list[str] = []
        ds = read_stop(self.data_dir, split, domains=self.domains, limit=None if evenly else limit,
                       skip_bad=self.skip_bad, skipped=skipped, notes=notes)
        if evenly and limit is not None and limit < len(ds):
            ds = ds.select(spread(len(ds), limit))
        report_skipped(split, skipped)
        report_notes(notes)
        rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
        rows, unusable = usable_audio(rows, self.max_audio_seconds)
        report_skipped(split, unusable, what="unusable audio")
        if not rows:
            raise ValueError(f"{self.data_dir}: no {split!r} examples (domains={self.domains})")
        return rows

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_rows is None:
            self.train_rows = self._read(self.train_split, self.limit_train)
        if stage in (None, "fit", "validate") and self.val_rows is None:
            self.val_rows = self._read(self.val_split, self.limit_val, evenly=True)

    def train_logical_forms(self) -> list[str]:
        """Logical forms of the training split (for a grammar extracted from the training data)."""
        self.setup("fit")
        assert self.train_rows is not None
        return [r["logical_form"] for r in self.train_rows]

    # -- the model's side ----------------------------------------------------------------------
    def connect(self, slu: Any) -> None:
        """Batch for this :class:`conslu.model.ConSLU`: keep its tokenizer, feature extractor, CPU
        constraint tables and label set (not its weights), and check the training rows against them
        (now if they are read, else when the training loader is made)."""
        self.targets = TargetCollator.for_model(slu)
        self.feature_extractor = slu.feature_extractor
        self.audio_context = slu.audio_context
        self._labels = list(slu.grammar.labels) if slu.target_format == "simplified" else None
        self._rows_checked = False
        self._check_rows()

    def _check_rows(self) -> None:
        if self._rows_checked or self.train_rows is None or self.targets is None:
            return
        if self._labels is not None:  # WhiSLU targets are plain text: any label can be written
            self.train_rows = self._learnable(self.train_rows, self._labels, self.targets)
        self._rows_checked = True

    def _learnable(self, rows: list[dict], labels: list[str], targets: TargetCollator) -> list[dict]:
        """Refuse (or, with ``skip_bad``, drop and report) training rows whose trees use a label the
        model's grammar lacks (they could not be encoded) or whose words are not copies of the
        transcript (the constrained loss could not follow them)."""
        bad = unlearnable_rows(rows, labels, targets)
        if not bad:
            return rows
        messages = [f"{row_location(self.data_dir, self.train_split, rows[i])}: {why}" for i, why in bad.items()]
        if not self.skip_bad:
            more = f" (and {len(messages) - 1} more row(s))" if len(messages) > 1 else ""
            raise DataError(f"{messages[0]}{more}; use a grammar that covers the training data (model.grammar: train) "
                            "or set data.skip_bad: true to leave such rows out")
        report_skipped(self.train_split, messages)
        keep = [r for i, r in enumerate(rows) if i not in bad]
        if not keep:
            raise DataError(f"{self.data_dir}: no usable {self.train_split!r} row (labels the model's grammar lacks, "
                            "or trees whose words are not copies of the transcript)")
        return keep

    # -- loaders -------------------------------------------------------------------------------
    def _sampler_inputs(self, rows: list[dict]) -> tuple[list[float], list[float] | None]:
        """The sampler's lengths (``bucket_by``) and each row's audio context, so batches never mix
        two (None without one: 30 s windows). Each file header is read once."""
        durations = [float(r["duration"]) for r in rows]   # read with the rows (usable_audio)
        lengths = durations if self.bucket_by == "duration" else [target_length(r) for r in rows]
        if self.audio_context is None:
            return lengths, None
        return lengths, [context_seconds(d, self.audio_context) for d in durations]

    def _examples(self, rows: list[dict]) -> SLUExamples:
        cache = self.encoder_cache
        if cache is None:
            return SLUExamples(rows, max_seconds=self.max_audio_seconds)
        return SLUExamples(rows, cache=cache, cache_keys=[cache.key(p) for p in audio_paths(rows)])

    def _collator(self, strict: bool) -> SLUCollator:
        if self.targets is None:
            raise RuntimeError("SLUDataModule.connect(slu) first (SLUModule.setup does it under a Trainer)")
        return SLUCollator(self.targets, self.feature_extractor, strict=strict, audio_context=self.audio_context)

    def _progress(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        collate = self._collator(strict=True)
        self._check_rows()
        assert self.train_rows is not None
        lengths, groups = self._sampler_inputs(self.train_rows)
        sampler = BucketBatchSampler(lengths, self.batch_size, bucket_size=self.bucket_size,
                                     shuffle=self.shuffle, seed=self.seed, groups=groups)
        return ResumableDataLoader(
            self._examples(self.train_rows),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            progress=self._progress,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self.val_rows is not None
        collate = self._collator(strict=False)
        lengths, groups = self._sampler_inputs(self.val_rows)
        sampler = BucketBatchSampler(lengths, self.val_batch_size, bucket_size=max(1, len(self.val_rows)),
                                     shuffle=False, groups=groups)
        return DataLoader(
            self._examples(self.val_rows),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=self.num_workers,
        )
