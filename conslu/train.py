"""Training with Lightning: ``conslu train --config conf/<name>.yaml [--section.key value ...]``.

Pieces (all configurable through LightningCLI, see ``conf/``):

* :class:`SLUDataModule` reads a STOP root (official or ``conslu synth`` output) through
  :func:`conslu.data.read_stop`, loads audio, computes log-mels (or looks up cached encoder outputs)
  and tokenises targets in the data-loader workers. Training batches come from
  :class:`BucketBatchSampler`: shuffled utterances are cut into buckets of ``bucket_size`` batches,
  sorted by target length (or audio duration) inside each bucket, and the batches are shuffled, so
  a batch holds similar lengths (little decoder padding) while the order still changes every epoch.
  The sampler shards batches across DDP ranks itself (``trainer.use_distributed_sampler`` is off)
  and its position is saved in checkpoints, so ``--ckpt_path last`` resumes mid-epoch exactly.
* :class:`SLUModule` wraps a :class:`conslu.model.ConSLU` (built from a base Whisper model or an
  existing ConSLU folder in :meth:`SLUModule.setup`), trains with the ConSLU loss, AdamW and a
  linear warm-up + linear decay schedule, optionally applies SpecAugment to log-mels (training
  only) and, each validation, decodes the validation split greedily with ConSLU's constrained
  decoder and logs ``val/em``, ``val/em_tree``, ``val/validity``, ``val/wer`` (fractions) and
  ``val/loss``.
* Frozen encoder with cached outputs (``model.freeze_encoder`` + ``model.cache_encoder``): the
  encoder runs once per utterance before training (:mod:`conslu.features`) and only the decoder is
  trained. SpecAugment cannot be used in that mode (the encoder would have to see every augmented
  copy), so the combination is rejected.
* :class:`ExportBest` writes the best model so far (by ``val/em``) as a ConSLU folder
  (``<default_root_dir>/best`` unless ``export.dirpath`` is set), replacing the previous one by
  renames. A :class:`~lightning.pytorch.callbacks.ModelCheckpoint` (``checkpoint.*``) keeps
  ``last.ckpt`` (every validation and every ``checkpoint.every_n_train_steps``) and the best one.

Several GPUs / nodes: Lightning's own DDP (``--trainer.strategy ddp --trainer.devices N
[--trainer.num_nodes M]`` or ``--config conf/ddp.yaml`` after the model config). Precision:
``bf16-mixed`` on GPUs that support it, ``16-mixed`` otherwise (V100, T4), ``32-true`` on CPU.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader, Dataset, Sampler

from conslu.atomic import atomic_folder, atomic_write_json
from conslu.data import DataError

__all__ = [
    "BucketBatchSampler",
    "ResumableDataLoader",
    "SLUExamples",
    "SLUCollator",
    "SpecAugment",
    "SLUDataModule",
    "SLUModule",
    "ExportBest",
    "export_model",
    "SLUCLI",
    "cmd_train",
]


# ---------------------------------------------------------------------------------------------
# Batching


class BucketBatchSampler(Sampler[list[int]]):
    """Length-bucketed batches, deterministic for a (seed, epoch), sharded over DDP ranks.

    Each epoch: shuffle all indices (seeded by ``seed + epoch``), cut them into buckets of
    ``batch_size * bucket_size`` items, sort each bucket by length, cut it into batches, then
    shuffle the batches. With ``shuffle=False`` the order is fixed (buckets in index order).
    Every rank gets the same number of batches (the list is padded by repeating batches from the
    start, as ``DistributedSampler`` does). ``skip_to(epoch, n)`` makes the next iteration of that
    epoch start after its first ``n`` batches (exact mid-epoch resume).
    """

    def __init__(
        self,
        lengths: Sequence[float],
        batch_size: int,
        *,
        bucket_size: int = 50,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be >= 1, got {bucket_size}")
        self.lengths = [float(x) for x in lengths]
        self.batch_size = batch_size
        self.bucket_size = bucket_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self._num_replicas = num_replicas
        self._rank = rank
        self.epoch = 0
        self._skip: tuple[int, int] | None = None

    # DDP layout: taken from the process group at iteration time unless given explicitly.
    @property
    def num_replicas(self) -> int:
        if self._num_replicas is not None:
            return self._num_replicas
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size()
        return 1

    @property
    def rank(self) -> int:
        if self._rank is not None:
            return self._rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_to(self, epoch: int, n_batches: int) -> None:
        self._skip = (int(epoch), int(n_batches))

    def all_batches(self, epoch: int | None = None) -> list[list[int]]:
        """Every rank's batches for ``epoch``, before sharding."""
        epoch = self.epoch if epoch is None else epoch
        idx = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 1_000_003 + epoch)
        if self.shuffle:
            rng.shuffle(idx)
        chunk = self.batch_size * self.bucket_size
        batches: list[list[int]] = []
        for start in range(0, len(idx), chunk):
            bucket = sorted(idx[start : start + chunk], key=lambda i: self.lengths[i])
            for b in range(0, len(bucket), self.batch_size):
                batch = bucket[b : b + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def _shard(self, batches: list[list[int]]) -> list[list[int]]:
        r, n = self.rank, self.num_replicas
        if n == 1 or not batches:
            return batches
        per_rank = math.ceil(len(batches) / n)
        padded = batches + [batches[i % len(batches)] for i in range(per_rank * n - len(batches))]
        return padded[r::n]

    def __iter__(self) -> Iterator[list[int]]:
        batches = self._shard(self.all_batches())
        start = 0
        if self._skip is not None:
            if self._skip[0] == self.epoch:
                start = min(self._skip[1], len(batches))
            self._skip = None
        return iter(batches[start:])

    def __len__(self) -> int:
        chunk = self.batch_size * self.bucket_size
        n = len(self.lengths)
        total = 0
        for start in range(0, n, chunk):
            size = min(chunk, n - start)
            total += size // self.batch_size if self.drop_last else math.ceil(size / self.batch_size)
        return math.ceil(total / self.num_replicas) if total else 0


class ResumableDataLoader(DataLoader):
    """A DataLoader whose position Lightning stores in checkpoints (``state_dict``/``load_state_dict``).

    The position is the number of batches the training loop has *processed* in the current epoch
    (read from ``progress``), not the number fetched, because Lightning prefetches a batch ahead.
    """

    def __init__(self, *args: Any, progress: Callable[[], int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress

    def state_dict(self) -> dict[str, int]:
        sampler = self.batch_sampler
        return {"epoch": int(getattr(sampler, "epoch", 0)), "batches": int(self.progress()) if self.progress else 0}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.batch_sampler
        if isinstance(sampler, BucketBatchSampler):
            sampler.skip_to(state.get("epoch", 0), state.get("batches", 0))


# ---------------------------------------------------------------------------------------------
# Examples and collation


class SLUExamples(Dataset):
    """Rows of a :mod:`conslu.data` table; yields audio (or a cached encoder output) plus targets."""

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
        row = dict(self.rows[i])
        if self.cache is not None:
            assert self.cache_keys is not None
            value = self.cache.get(self.cache_keys[i])
            if value is None:
                raise KeyError(f"{row.get('audio')}: encoder output missing from the cache")
            row["encoder_output"] = value
        else:
            from conslu.audio import load_audio

            if not row.get("audio"):
                raise ValueError(f"example {row.get('id')!r} has no audio file; training needs speech")
            row["audio_array"] = load_audio(row["audio"], max_seconds=self.max_seconds)
        return row


class _TargetCollate:
    """``ConSLU.collate`` without the model: tokenizer + CPU constraint tables only, so data-loader
    workers neither pickle the Whisper weights nor touch a CUDA model from a forked process."""

    def __init__(self, slu: Any) -> None:
        self.tokenizer = slu.tokenizer
        self.loss_constrained = bool(slu.loss_constrained)
        self._tables = slu._cpu_tables() if self.loss_constrained else None

    def _cpu_tables(self) -> Any:
        return self._tables

    def __call__(self, examples: list[tuple[str, str, dict]]) -> dict[str, Any]:
        from conslu.model import ConSLU

        return ConSLU.collate(self, examples)  # type: ignore[arg-type]  # uses only the attributes above


class SLUCollator:
    """Examples -> padded batch: input_features (or encoder_outputs), decoder_input_ids, labels, refs.

    Holds only the tokenizer and feature extractor (picklable for data-loader workers).
    """

    def __init__(self, slu: Any, strict: bool = True) -> None:
        self.target_collate = _TargetCollate(slu)
        self.feature_extractor = slu.feature_extractor
        self.strict = strict  # False: keep examples whose target cannot be encoded (validation)

    def targets(self, examples: list[dict]) -> dict[str, Any]:
        return self.target_collate([(e.get("transcript") or "", e.get("logical_form") or "",
                                     {k: e.get(k) for k in ("gender", "native", "domain")}) for e in examples])

    def __call__(self, examples: list[dict]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "refs": [
                {
                    "id": str(e["id"]),
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
            from conslu.audio import log_mel

            batch["input_features"] = log_mel([e["audio_array"] for e in examples], self.feature_extractor)
        ok = []
        for i, e in enumerate(examples):
            try:
                self.target_collate.tokenizer.encode(e.get("transcript") or "", e.get("logical_form") or "",
                                                     **{k: e.get(k) for k in ("gender", "native", "domain")})
                ok.append(i)
            except ValueError as err:
                if self.strict:
                    raise ValueError(f"example {e.get('id')!r}: {err}") from None
        # rows of decoder_input_ids/labels (validation may hold labels the grammar lacks: those
        # examples are decoded and scored but have no loss)
        batch["target_rows"] = ok
        if ok:
            batch.update(self.targets([examples[i] for i in ok]))
        return batch


class SpecAugment(torch.nn.Module):
    """Frequency and time masking of log-mels [B, n_mels, T] (independent masks per example).

    Active only in training mode; in eval mode it returns its input unchanged. Masked cells get the
    example's mean value (Whisper log-mels are not zero-centred, so 0 would be a loud artefact).
    """

    def __init__(self, freq_mask_param: int = 27, time_mask_param: int = 100, num_freq_masks: int = 2,
                 num_time_masks: int = 2) -> None:
        super().__init__()
        import torchaudio

        self.freq = torchaudio.transforms.FrequencyMasking(freq_mask_param, iid_masks=True)
        self.time = torchaudio.transforms.TimeMasking(time_mask_param, iid_masks=True)
        self.num_freq_masks = num_freq_masks
        self.num_time_masks = num_time_masks

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return features
        x = features.unsqueeze(1)  # [B, 1, F, T]: iid masks need a channel dimension
        mean = x.mean(dim=(2, 3), keepdim=True)
        x = x - mean
        for _ in range(self.num_freq_masks):
            x = self.freq(x)
        for _ in range(self.num_time_masks):
            x = self.time(x)
        return (x + mean).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Data module


def _target_length(row: dict) -> float:
    return float(len(row.get("transcript") or "") + len(row.get("logical_form") or ""))


def _duration(path: str | None) -> float:
    import soundfile

    if not path:
        return 0.0
    try:
        info = soundfile.info(path)
    except Exception as e:
        raise ValueError(f"{path}: cannot read audio header ({e})") from e
    return info.frames / max(info.samplerate, 1)


_LABEL = re.compile(r"\[\s*((?:IN|SL):[^\s\[\]]+)")


def _report_skipped(split: str, skipped: Sequence[str], limit: int = 20) -> None:
    """Print the rows ``data.skip_bad`` left out (stderr, rank 0 only)."""
    if not skipped or int(os.environ.get("LOCAL_RANK", os.environ.get("RANK", "0")) or 0) != 0:
        return
    for msg in skipped[:limit]:
        print(f"conslu train: skipped {msg}", file=sys.stderr)
    more = f" (first {limit} shown)" if len(skipped) > limit else ""
    print(f"conslu train: {len(skipped)} bad {split!r} row(s) skipped{more}", file=sys.stderr)


def _row_location(data_dir: str, split: str, row: dict) -> str:
    """``manifest:line`` of a row (by its id), for error messages; the manifest alone if not found."""
    manifest = Path(data_dir) / "manifests" / f"{split}.tsv"
    if Path(data_dir).is_file():
        manifest = Path(data_dir)
    want = str(row.get("id"))
    try:
        with open(manifest, encoding="utf-8-sig") as f:
            for lineno, line in enumerate(f, 1):
                if line.split("\t", 1)[0].strip() == want:
                    return f"{manifest}:{lineno}"
    except OSError:
        pass
    return f"{manifest}: row {want!r}"


class SLUDataModule(pl.LightningDataModule):
    """STOP-layout data for training and validation.

    Args:
        data_dir: STOP root (``manifests/*.tsv`` + audio), official or made by ``conslu synth``.
        train_split / val_split: manifest names (``train``, ``eval``, ``test``).
        domains: keep only these domains (all when None).
        limit_train / limit_val: at most this many examples (after the domain filter).
        batch_size: per device; the effective batch is batch_size x devices x accumulate_grad_batches.
        val_batch_size: decoding batch size (default: batch_size).
        bucket_size: batches per length bucket (1 = sort each batch alone, i.e. no bucketing effect).
        bucket_by: ``target`` (characters of transcript + logical form; free) or ``duration``
            (audio length from the file headers).
        cache_dir: folder for cached encoder outputs when the model caches them (None: in memory).
        skip_bad: skip malformed manifest rows (reported by the reader) instead of failing.
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
        self._slu: Any | None = None
        self._cache: Any | None = None

    # -- reading -----------------------------------------------------------------------------
    def _read(self, split: str, limit: int | None) -> list[dict]:
        from conslu.data import read_stop

        skipped: list[str] = []
        ds = read_stop(self.data_dir, split, domains=self.domains, limit=limit, skip_bad=self.skip_bad,
                       skipped=skipped)
        _report_skipped(split, skipped)
        rows = ds.to_list() if hasattr(ds, "to_list") else list(ds)
        if not rows:
            raise ValueError(f"{self.data_dir}: no {split!r} examples (domains={self.domains})")
        return rows

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_rows is None:
            self.train_rows = self._read(self.train_split, self.limit_train)
        if stage in (None, "fit", "validate") and self.val_rows is None:
            self.val_rows = self._read(self.val_split, self.limit_val)

    def train_logical_forms(self) -> list[str]:
        """Logical forms of the training split (for a grammar extracted from the training data)."""
        self.setup("fit")
        assert self.train_rows is not None
        return [r["logical_form"] for r in self.train_rows]

    # -- model hookup --------------------------------------------------------------------------
    def attach(self, module: "SLUModule") -> None:
        """Use this module's tokenizer/feature extractor (done automatically under a Trainer)."""
        self._module = module

    def _get_module(self) -> "SLUModule":
        module = getattr(self, "_module", None)
        if module is None and self.trainer is not None:
            module = self.trainer.lightning_module
        if module is None or module.slu is None:
            raise RuntimeError("SLUDataModule needs a built SLUModule (call attach() or run under a Trainer)")
        return module

    def _lengths(self, rows: list[dict]) -> list[float]:
        if self.bucket_by == "duration":
            return [_duration(r.get("audio")) for r in rows]
        return [_target_length(r) for r in rows]

    def _examples(self, rows: list[dict], module: "SLUModule") -> SLUExamples:
        if not module.hparams.cache_encoder:
            return SLUExamples(rows, max_seconds=self.max_audio_seconds)
        cache = module.encoder_cache(self.cache_dir)
        for r in rows:
            if not r.get("audio"):
                raise ValueError(f"example {r.get('id')!r} has no audio file; training needs speech")
        paths = [r["audio"] for r in rows]
        module.fill_cache(cache, paths, self.max_audio_seconds, batch_size=self.val_batch_size)
        return SLUExamples(rows, cache=cache, cache_keys=[cache.key(p) for p in paths])

    def _progress(self) -> int:
        trainer = self.trainer
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def check_labels(self, module: "SLUModule") -> None:
        """Refuse (or, with ``skip_bad``, drop and report) training rows whose trees use a label the
        model's grammar lacks (they could not be encoded) or whose words are not copies of the
        transcript (the constrained loss could not follow them)."""
        assert self.train_rows is not None
        slu = module.slu
        if slu is None or getattr(slu, "target_format", "simplified") != "simplified":
            return  # WhiSLU targets are plain text: any label can be written
        known = set(slu.grammar.labels)
        keep: list[dict] = []
        bad: list[str] = []
        for r in self.train_rows:
            unknown = sorted({lab for lab in _LABEL.findall(r.get("logical_form") or "") if lab not in known})
            if unknown:
                bad.append(f"{_row_location(self.data_dir, self.train_split, r)}: label(s) {', '.join(unknown)} "
                           f"not in the model's grammar ({len(known)} labels)")
            else:
                keep.append(r)
        keep = self._check_copies(slu, keep, bad)
        if not bad:
            return
        if not self.skip_bad:
            more = f" (and {len(bad) - 1} more row(s))" if len(bad) > 1 else ""
            raise DataError(f"{bad[0]}{more}; use a grammar that covers the training data (model.grammar: train) "
                            "or set data.skip_bad: true to leave such rows out")
        _report_skipped(self.train_split, bad)
        if not keep:
            raise DataError(f"{self.data_dir}: no usable {self.train_split!r} row (labels the model's grammar lacks, "
                            "or trees whose words are not copies of the transcript)")
        self.train_rows = keep

    def _check_copies(self, slu: Any, rows: list[dict], bad: list[str], chunk: int = 256) -> list[dict]:
        """Rows whose tree the constraint machine accepts (its words whole-word, in-order copies of the
        transcript); the others are added to ``bad`` with their manifest line."""
        from conslu.loss import uncopyable_rows

        tables = slu._cpu_tables()
        keep: list[dict] = []
        for i in range(0, len(rows), chunk):
            part = rows[i : i + chunk]
            labels = slu.collate([(r.get("transcript") or "", r.get("logical_form") or "") for r in part],
                                 with_states=False)["labels"]
            wrong = set(uncopyable_rows(labels, tables))
            for j, r in enumerate(part):
                if j in wrong:
                    bad.append(f"{_row_location(self.data_dir, self.train_split, r)}: the tree's words are not whole-word, "
                               f"in-order copies of the transcript ({r.get('transcript')!r} | {r.get('logical_form')!r})")
                else:
                    keep.append(r)
        return keep

    def train_dataloader(self) -> DataLoader:
        self.setup("fit")
        assert self.train_rows is not None
        module = self._get_module()
        self.check_labels(module)
        dataset = self._examples(self.train_rows, module)
        sampler = BucketBatchSampler(self._lengths(self.train_rows), self.batch_size, bucket_size=self.bucket_size,
                                     shuffle=self.shuffle, seed=self.seed)
        return ResumableDataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=SLUCollator(module.slu),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            progress=self._progress,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup("validate")
        assert self.val_rows is not None
        module = self._get_module()
        dataset = self._examples(self.val_rows, module)
        sampler = BucketBatchSampler(self._lengths(self.val_rows), self.val_batch_size,
                                     bucket_size=max(1, len(self.val_rows)), shuffle=False)
        return DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=SLUCollator(module.slu, strict=False),
            num_workers=self.num_workers,
        )


# ---------------------------------------------------------------------------------------------
# Lightning module


def _is_conslu_folder(path: str) -> bool:
    from conslu import model as core

    checker = getattr(core, "is_conslu_folder", None)
    if checker is not None:
        return bool(checker(path))
    p = Path(path)
    return p.is_dir() and (p / getattr(core, "CONFIG_NAME", "conslu.json")).is_file()


def decode_encoder_outputs(slu: Any, enc: torch.Tensor, *, max_new_tokens: int | None = None) -> list[dict]:
    """ConSLU's default decoding (``conslu.decoding.decode``, as ``conslu evaluate`` runs it) from
    encoder outputs [B, frames, d], so a cached frozen encoder is not run again."""
    from conslu.decoding import DecodingOptions, decode

    return decode(slu, DecodingOptions(max_new_tokens=max_new_tokens), encoder_hidden=enc)


class SLUModule(pl.LightningModule):
    """ConSLU fine-tuning.

    Args:
        model: base Whisper model (short name such as ``whisper-tiny.en``, local folder, hub id) or
            an existing ConSLU folder (then grammar/target_format come from the folder).
        grammar: grammar JSON, or ``train`` to extract it from the training split.
        target_format: ``simplified`` (``transcript | tree``) or ``whislu`` (JSON-style baseline).
        constraints: where the grammar/copy constraints apply: both, loss, decoding, none.
        freeze_encoder: train the decoder only.
        cache_encoder: with a frozen encoder, compute encoder outputs once and train on the cache.
        lr / weight_decay / warmup_steps / adam_betas / adam_eps: AdamW with linear warm-up to
            ``lr`` and linear decay to 0 at the last step.
        spec_augment: mask frequency bands and time spans of the training log-mels.
        val_max_new_tokens: decoding budget for validation (None: the model's default).
    """

    def __init__(
        self,
        model: str = "whisper-tiny.en",
        grammar: str = "grammar/topv2.json",
        target_format: Literal["simplified", "whislu"] = "simplified",
        constraints: Literal["both", "loss", "decoding", "none"] = "both",
        freeze_encoder: bool = False,
        cache_encoder: bool = False,
        lr: float = 3e-5,
        weight_decay: float = 0.01,
        warmup_steps: int = 5000,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        spec_augment: bool = False,
        freq_mask_param: int = 27,
        time_mask_param: int = 100,
        num_freq_masks: int = 2,
        num_time_masks: int = 2,
        val_max_new_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if cache_encoder and not freeze_encoder:
            raise ValueError("model.cache_encoder needs model.freeze_encoder: true (a trained encoder changes its outputs)")
        if cache_encoder and spec_augment:
            raise ValueError("model.spec_augment cannot be used with model.cache_encoder (cached outputs are not augmented)")
        self.save_hyperparameters()
        self.slu: Any | None = None
        self.whisper: torch.nn.Module | None = None
        self.spec_augment = (
            SpecAugment(freq_mask_param, time_mask_param, num_freq_masks, num_time_masks) if spec_augment else None
        )
        self._val_refs: list[dict] = []
        self._val_hyps: list[dict] = []
        self._val_losses: list[tuple[float, int]] = []
        self._fingerprint: str | None = None

    # -- building ------------------------------------------------------------------------------
    def build(self, train_logical_forms: Sequence[str] | None = None) -> None:
        """Load or initialise the ConSLU model (idempotent)."""
        if self.slu is not None:
            return
        from conslu.model import ConSLU

        hp = self.hparams
        if _is_conslu_folder(hp.model):
            slu = ConSLU.from_pretrained(hp.model)
        else:
            from conslu.grammar import Grammar

            if hp.grammar == "train":
                if train_logical_forms is None:
                    raise ValueError("model.grammar=train needs the training split (run under a Trainer with the data module)")
                grammar: Any = Grammar.extract(train_logical_forms)
            else:
                grammar = hp.grammar
            try:
                from conslu.pretrained import resolve_model

                base = resolve_model(hp.model)
            except ImportError:
                base = hp.model
            slu = ConSLU.init(base, grammar, target_format=hp.target_format, constraints=hp.constraints)
        slu.constraints = hp.constraints if not _is_conslu_folder(hp.model) else slu.constraints
        self.slu = slu
        self.whisper = slu.model
        self.whisper.train()  # from_pretrained leaves eval mode; Lightning keeps modules' modes
        if hp.freeze_encoder:
            encoder = self.whisper.get_encoder()
            for p in encoder.parameters():
                p.requires_grad_(False)

    def setup(self, stage: str) -> None:
        forms = None
        if self.hparams.grammar == "train" and self.trainer is not None and self.trainer.datamodule is not None:
            forms = self.trainer.datamodule.train_logical_forms()
        self.build(forms)

    def on_train_epoch_start(self) -> None:
        if self.hparams.freeze_encoder:
            self.whisper.get_encoder().eval()  # no dropout in a frozen encoder

    # -- encoder cache ----------------------------------------------------------------------------
    def encoder_cache(self, cache_dir: str | None) -> Any:
        from conslu.features import EncoderCache, model_fingerprint

        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.whisper.get_encoder(), self.slu.feature_extractor)
        cache = getattr(self, "_cache", None)
        if cache is None or cache.fingerprint != self._fingerprint or str(cache_dir) != getattr(self, "_cache_dir", None):
            cache = EncoderCache(cache_dir, self._fingerprint)
            self._cache, self._cache_dir = cache, str(cache_dir)
        return cache

    def fill_cache(self, cache: Any, paths: list[str], max_seconds: float | None, batch_size: int = 8) -> int:
        from conslu.audio import load_audio, log_mel

        encoder = self.whisper.get_encoder()
        device = next(encoder.parameters()).device
        dtype = next(encoder.parameters()).dtype
        was_training = encoder.training
        encoder.eval()

        def load(ps: list[str]) -> torch.Tensor:
            return log_mel([load_audio(p, max_seconds=max_seconds) for p in ps], self.slu.feature_extractor)

        def encode(features: torch.Tensor) -> torch.Tensor:
            return encoder(features.to(device, dtype)).last_hidden_state

        t0 = time.perf_counter()
        n = cache.fill(paths, load, encode, batch_size=batch_size)
        if n and (self._trainer is None or self._trainer.is_global_zero):
            print(f"conslu train: cached {n} encoder outputs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        encoder.train(was_training)
        return n

    # -- steps -----------------------------------------------------------------------------------
    def _encoder_outputs(self, batch: dict) -> torch.Tensor:
        if "encoder_outputs" in batch:
            return batch["encoder_outputs"].to(self.dtype_for_encoder_outputs())
        features = batch["input_features"]
        if self.spec_augment is not None and self.training:
            features = self.spec_augment(features)
        encoder = self.whisper.get_encoder()
        if self.hparams.freeze_encoder:
            with torch.no_grad():
                return encoder(features).last_hidden_state
        return encoder(features).last_hidden_state

    def dtype_for_encoder_outputs(self) -> torch.dtype:
        return next(self.whisper.get_decoder().parameters()).dtype

    def compute_loss(self, batch: dict, enc: torch.Tensor | None = None) -> torch.Tensor:
        if enc is None:
            enc = self._encoder_outputs(batch)
        return self.slu.loss(None, batch["labels"], decoder_input_ids=batch["decoder_input_ids"],
                             loss_states=batch.get("loss_states"), encoder_outputs=(enc,))

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # refs/audios stay on the CPU; loss_states are moved by slu_loss itself
        keep = {k: batch.pop(k) for k in ("refs", "target_rows", "loss_states") if k in batch}
        batch = super().transfer_batch_to_device(batch, device, dataloader_idx)
        batch.update(keep)
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["refs"]))
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_refs, self._val_hyps, self._val_losses = [], [], []

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        enc = self._encoder_outputs(batch)
        rows = batch["target_rows"]
        if rows:
            idx = torch.tensor(rows, device=enc.device)
            loss = self.compute_loss(batch, enc.index_select(0, idx) if len(rows) < enc.shape[0] else enc)
            self._val_losses.append((float(loss) * len(rows), len(rows)))
        outs = decode_encoder_outputs(self.slu, enc, max_new_tokens=self.hparams.val_max_new_tokens)
        for ref, out in zip(batch["refs"], outs):
            self._val_refs.append(ref)
            self._val_hyps.append({"id": ref["id"], "transcript": out.get("transcript", ""),
                                   "logical_form": out.get("logical_form") or ""})

    def on_validation_epoch_end(self) -> None:
        from conslu.metrics import score

        refs, hyps, losses = self._val_refs, self._val_hyps, self._val_losses
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, (refs, hyps, losses))
            refs = [r for g in gathered for r in g[0]]
            hyps = [h for g in gathered for h in g[1]]
            losses = [x for g in gathered for x in g[2]]
            # DDP pads shards by repeating batches: score each id once
            seen: set[str] = set()
            keep = [i for i, r in enumerate(refs) if not (r["id"] in seen or seen.add(r["id"]))]
            refs, hyps = [refs[i] for i in keep], [hyps[i] for i in keep]
        if not refs:
            return
        result = score(refs, hyps, self.slu.grammar)
        metrics = {
            "val/em": float(result["em"]),
            "val/em_tree": float(result["em_tree"]),
            "val/validity": float(result["validity"]),
            "val/wer": float(result["wer"]),
        }
        if losses:
            metrics["val/loss"] = sum(x for x, _ in losses) / max(1, sum(c for _, c in losses))
        # every rank holds the same gathered values, so no further reduction is needed
        self.log_dict(metrics, prog_bar=True, sync_dist=False, rank_zero_only=False)
        self.last_val_result = result

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias") else decay).append(p)
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": hp.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.lr,
            betas=tuple(hp.adam_betas),
            eps=hp.adam_eps,
        )
        total = int(self._trainer.estimated_stepping_batches) if self._trainer is not None else 0
        warmup = int(hp.warmup_steps)

        def factor(step: int) -> float:
            if warmup > 0 and step < warmup:
                return (step + 1) / warmup
            if total <= warmup or total <= 0 or not math.isfinite(total):
                return 1.0
            return max(0.0, (total - step) / (total - warmup))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # A checkpoint of another target format or grammar has other label tokens: refuse it clearly
        # instead of failing on embedding shapes (or, worse, loading mismatched weights).
        saved = checkpoint.get("conslu")
        if not isinstance(saved, dict) or self.slu is None:
            return
        fmt = saved.get("target_format")
        if fmt is not None and fmt != self.slu.target_format:
            raise ValueError(f"checkpoint was trained with target format {fmt!r}, this run uses "
                             f"{self.slu.target_format!r}; resume with the same model.target_format")
        g = saved.get("grammar")
        labels = (list(g.get("intents") or []) + list(g.get("slots") or [])) if isinstance(g, dict) else None
        if labels and fmt == "simplified" and sorted(labels) != sorted(self.slu.grammar.labels):
            raise ValueError("checkpoint was trained with another grammar (different label tokens); "
                             "resume with the same model.grammar")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Recorded for inspection; resuming rebuilds the same model from the same config.
        if self.slu is not None:
            checkpoint["conslu"] = {
                "grammar": self.slu.grammar.to_dict(),
                "target_format": self.slu.target_format,
                "constraints": self.slu.constraints,
            }


# ---------------------------------------------------------------------------------------------
# Export of the best model


def export_model(slu: Any, dirpath: str | os.PathLike, info: dict | None = None) -> Path:
    """Save ``slu`` as a ConSLU folder at ``dirpath``, replacing an old one only once complete.

    The folder is written under a temporary name next to ``dirpath`` and swapped in by two
    renames (old -> aside, new -> dirpath); readers never see a half-written folder.
    """
    dirpath = Path(dirpath)
    with atomic_folder(dirpath) as tmp:
        slu.write_files(tmp)
        if info is not None:
            atomic_write_json(tmp / "training.json", info, indent=2)
    return dirpath


class ExportBest(Callback):
    """After each validation, export the model as a ConSLU folder when ``monitor`` improves.

    Args:
        dirpath: output folder (default ``<trainer.default_root_dir>/best``).
        monitor: logged metric to compare (``val/em``).
        mode: ``max`` or ``min``.
    """

    def __init__(self, dirpath: str | None = None, monitor: str = "val/em", mode: Literal["max", "min"] = "max") -> None:
        self.dirpath = dirpath
        self.monitor = monitor
        self.mode = mode
        self.best: float | None = None

    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if self.mode == "max" else value < self.best

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])
        if not self._better(value):
            return
        self.best = value
        if trainer.is_global_zero:
            dirpath = self.dirpath or os.path.join(trainer.default_root_dir, "best")
            info = {"monitor": self.monitor, "value": value, "epoch": trainer.current_epoch,
                    "global_step": trainer.global_step,
                    "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}}
            export_model(pl_module.slu, dirpath, info)
        trainer.strategy.barrier("conslu_export_best")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


# ---------------------------------------------------------------------------------------------
# CLI


class SLUCLI(LightningCLI):
    """LightningCLI with ``--ckpt_path``, a ModelCheckpoint (``checkpoint.*``) and ExportBest (``export.*``)."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        parser.add_argument("--ckpt_path", type=str | None, default=None,
                            help="resume from this checkpoint, or 'last' for <checkpoint.dirpath>/last.ckpt")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/em",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.save_top_k": 1,
            "checkpoint.filename": "best-step{step}-em{val/em:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(ExportBest, "export")
        parser.set_defaults({"trainer.use_distributed_sampler": False, "trainer.num_sanity_val_steps": 0})

    def before_instantiate_classes(self) -> None:
        cfg = self.config
        root = cfg["trainer"].get("default_root_dir") or os.getcwd()
        if cfg["checkpoint"].get("dirpath") is None:
            cfg["checkpoint"]["dirpath"] = os.path.join(root, "checkpoints")
        if cfg["export"].get("dirpath") is None:
            cfg["export"]["dirpath"] = os.path.join(root, "best")


@contextlib.contextmanager
def _patched_argv(argv: list[str]) -> Iterator[None]:
    old = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = old


def cmd_train(argv: list[str]) -> int:
    """``conslu train`` entry: parse with LightningCLI, then ``trainer.fit`` (with ``--ckpt_path``)."""
    try:
        # LightningCLI warns when sys.argv holds words besides args (always, under `conslu` or pytest)
        with _patched_argv(["conslu train"]):
            cli = SLUCLI(
                SLUModule,
                SLUDataModule,
                run=False,
                args=list(argv),
                seed_everything_default=0,
                save_config_kwargs={"overwrite": True},
                parser_kwargs={"prog": "conslu train", "default_env": False},
            )
    except SystemExit as e:  # --help, --print_config, argument errors
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    ckpt = cli.config.get("ckpt_path")
    if ckpt not in (None, "last") and not Path(ckpt).is_file():
        print(f"conslu train: --ckpt_path {ckpt}: no such checkpoint file", file=sys.stderr)
        return 2
    if ckpt == "last":
        last = Path(cli.config["checkpoint"]["dirpath"]) / "last.ckpt"
        if not last.is_file():
            print(f"conslu train: --ckpt_path last: {last} does not exist (nothing to resume)", file=sys.stderr)
            return 2
        ckpt = str(last)
    fit_kwargs: dict[str, Any] = {}
    if "weights_only" in inspect.signature(cli.trainer.fit).parameters:
        fit_kwargs["weights_only"] = True  # never unpickle code from a checkpoint file
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt, **fit_kwargs)
    except SystemExit:
        # Lightning turns Ctrl-C into sys.exit(1) after a graceful shutdown
        if getattr(cli.trainer, "interrupted", False):
            print("conslu train: interrupted; resume with --ckpt_path last (same config)", file=sys.stderr)
            return 130
        raise
    return 0
