"""Training with Lightning: ``conslu train --config conf/<name>.yaml [--section.key value ...]``.

One job per module (all configurable through LightningCLI, see ``conf/``):

* :mod:`~conslu.training.datamodule` - :class:`SLUDataModule` reads a STOP root (official or
  ``conslu synth`` output) through :func:`conslu.data.read_stop` and makes the loaders; it only
  loads data: the model side (tokenizer, constraint tables) comes in through ``connect`` and a
  filled encoder cache through ``encoder_cache``, both set by :class:`SLUModule`.
* :mod:`~conslu.training.data` - the dataset and the collators (audio -> log-mels or cached
  encoder outputs; targets tokenised in the data-loader workers, without the model weights).
* :mod:`~conslu.training.sampling` - :class:`BucketBatchSampler` (length buckets, DDP shards,
  exact mid-epoch resume) and :class:`ResumableDataLoader`.
* :mod:`~conslu.training.rows` - row lengths, manifest locations, the grammar/copy check.
* :mod:`~conslu.training.augment` - :class:`SpecAugment` (training log-mels only).
* :mod:`~conslu.training.module` - :class:`SLUModule` wraps a :class:`conslu.model.ConSLU` (built
  from a base Whisper model or an existing ConSLU folder in ``setup``), trains with the ConSLU
  loss, AdamW and a linear warm-up + linear decay schedule, and each validation decodes the
  validation split greedily with ConSLU's constrained decoder (``conslu.decoding.decode``),
  logging ``val/em``, ``val/em_tree``, ``val/validity``, ``val/wer`` (fractions) and ``val/loss``.
* :mod:`~conslu.training.scores` - :class:`ValidationScores`, those figures as a torchmetrics
  Metric (gathered over DDP ranks, each example counted once).
* :mod:`~conslu.training.export`, :mod:`~conslu.training.callbacks` - :func:`export_model` (a
  ConSLU folder, swapped in atomically), :class:`ExportBest` (the best model so far by
  ``val/em``, to ``<default_root_dir>/best`` unless ``export.dirpath`` is set) and
  :class:`StepTimer`.
* :mod:`~conslu.training.cli` - :class:`SLUCLI` (LightningCLI with ``--ckpt_path``, a
  ModelCheckpoint ``checkpoint.*`` keeping ``last.ckpt`` and the best one, and ``export.*``),
  :func:`make_cli` and :func:`run_fit`, used by ``conslu train`` (:mod:`conslu.commands.train`)
  and by :func:`conslu.demo.fit`.

Frozen encoder with cached outputs (``model.freeze_encoder`` + ``model.cache_encoder``): the
encoder runs once per utterance when fitting starts (:mod:`conslu.features`) and only the decoder
is trained. SpecAugment cannot be used in that mode (the encoder would have to see every augmented
copy), so the combination is rejected.

Several GPUs / nodes: Lightning's own DDP (``--trainer.strategy ddp --trainer.devices N
[--trainer.num_nodes M]`` or ``--config conf/ddp.yaml`` after the model config). Precision:
``bf16-mixed`` on GPUs that support it, ``16-mixed`` otherwise (V100, T4), ``32-true`` on CPU.
"""

from conslu.training.augment import SpecAugment
from conslu.training.callbacks import ExportBest, StepTimer
from conslu.training.cli import SLUCLI, make_cli, run_fit
from conslu.training.data import SLUCollator, SLUExamples, TargetCollator
from conslu.training.datamodule import SLUDataModule
from conslu.training.export import export_model
from conslu.training.module import SLUModule, decode_encoder_outputs
from conslu.training.sampling import BucketBatchSampler, ResumableDataLoader
from conslu.training.scores import ValidationScores

__all__ = [
    "BucketBatchSampler",
    "ResumableDataLoader",
    "SLUExamples",
    "TargetCollator",
    "SLUCollator",
    "SpecAugment",
    "SLUDataModule",
    "SLUModule",
    "ValidationScores",
    "ExportBest",
    "StepTimer",
    "export_model",
    "decode_encoder_outputs",
    "SLUCLI",
    "make_cli",
    "run_fit",
]
