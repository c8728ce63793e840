"""The LightningModule: ConSLU fine-tuning with the constrained loss, validation by decoding."""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Literal, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from transformers import get_constant_schedule_with_warmup, get_linear_schedule_with_warmup

from conslu.decoding import DecodingOptions, decode
from conslu.context import DEFAULT_BUCKET_SECONDS, encode
from conslu.features import EncoderCache, encoder_cache, fill_encoder_cache
from conslu.grammar import Grammar
from conslu.model import ConSLU, is_model_folder
from conslu.training.augment import SpecAugment
from conslu.training.datamodule import SLUDataModule
from conslu.training.rows import audio_paths
from conslu.training.scores import ValidationScores

__all__ = ["SLUModule", "decode_encoder_outputs"]


def decode_encoder_outputs(slu: ConSLU, enc: torch.Tensor, *, max_new_tokens: int | None = None) -> list[dict]:
    """ConSLU's default decoding (``conslu.decoding.decode``, as ``conslu evaluate`` runs it) from
    encoder outputs [B, frames, d], so a cached frozen encoder is not run again."""
    return decode(slu, DecodingOptions(max_new_tokens=max_new_tokens), encoder_hidden=enc)


class SLUModule(pl.LightningModule):
    """ConSLU fine-tuning.

    Args:
        model: base Whisper model (short name such as ``whisper-tiny.en``, local folder, hub id) or
            an existing ConSLU folder (then grammar/target_format come from the folder).
        grammar: a shipped grammar name (``topv2``), a grammar JSON, or ``train`` to extract it from the training split.
        target_format: ``simplified`` (``transcript | tree``) or ``whislu`` (JSON-style baseline).
        constraints: where the grammar/copy constraints apply: both, loss, decoding, none.
        freeze_encoder: train the decoder only.
        cache_encoder: with a frozen encoder, compute encoder outputs once and train on the cache.
        lr / weight_decay / warmup_steps / adam_betas / adam_eps: AdamW with linear warm-up to
            ``lr`` and linear decay to 0 at the last step (``transformers.get_linear_schedule_with_warmup``).
        spec_augment: mask frequency bands and time spans of the training log-mels.
        val_max_new_tokens: decoding budget for validation (None: the model's default).
        audio_context: encoder context bucket in seconds for a new model (:mod:`conslu.context`;
            None: Whisper's 30 s window); a ConSLU folder keeps its own.

    Under a Trainer, :meth:`setup` builds the model and connects the data module to it; with a
    cached encoder, :meth:`on_fit_start` fills the cache (the model is on its device then, with
    its precision and restored weights, and no batch has been loaded yet). Without a Trainer:
    ``build``, ``connect_data(dm)``, ``fill_encoder_cache(dm)``.
    """

    def __init__(
        self,
        model: str = "whisper-tiny.en",
        grammar: str = "topv2",
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
        audio_context: float | None = DEFAULT_BUCKET_SECONDS,
    ) -> None:
        super().__init__()
        if cache_encoder and not freeze_encoder:
            raise ValueError("model.cache_encoder needs model.freeze_encoder: true (a trained encoder changes its outputs)")
        if cache_encoder and spec_augment:
            raise ValueError("model.spec_augment cannot be used with model.cache_encoder (cached outputs are not augmented)")
        self.save_hyperparameters()
        self.slu: ConSLU | None = None
        self.whisper: torch.nn.Module | None = None
        self.spec_augment = (
            SpecAugment(freq_mask_param, time_mask_param, num_freq_masks, num_time_masks) if spec_augment else None
        )
        self.val_scores = ValidationScores()
        self._skipped_files: set[str] = set()
        self.last_val_result: dict | None = None
        self._cache: EncoderCache | None = None
        self._cache_dir: str | None = None

    # -- building ------------------------------------------------------------------------------
    def build(self, train_logical_forms: Sequence[str] | None = None) -> None:
        """Load or initialise the ConSLU model (idempotent)."""
        if self.slu is not None:
            return
        hp = self.hparams
        if is_model_folder(hp.model):
            slu = ConSLU.from_pretrained(hp.model)
        else:
            grammar: Grammar | str = hp.grammar
            if hp.grammar == "train":
                if train_logical_forms is None:
                    raise ValueError("model.grammar=train needs the training split (run under a Trainer with the data module)")
                grammar = Grammar.extract(train_logical_forms)
            slu = ConSLU.init(hp.model, grammar, target_format=hp.target_format, constraints=hp.constraints,
                              audio_context=hp.audio_context)
        self.slu = slu
        self.whisper = slu.model
        self.whisper.train()  # from_pretrained leaves eval mode; Lightning keeps modules' modes
        if hp.freeze_encoder:
            for p in self.whisper.get_encoder().parameters():
                p.requires_grad_(False)

    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule
        if self.hparams.grammar == "train" and dm is not None:
            self.build(dm.train_logical_forms())
        else:
            self.build()
        if isinstance(dm, SLUDataModule):
            self.connect_data(dm)
            if stage != "fit" and dm.encoder_cache is not None:  # no on_fit_start outside fit: fill now,
                self.whisper.get_encoder().to(self.trainer.strategy.root_device)  # where the model will run
                self.fill_encoder_cache(dm)

    # -- data and the encoder cache ----------------------------------------------------------------
    def connect_data(self, dm: SLUDataModule) -> None:
        """Give ``dm`` this model (its training rows are checked against the grammar) and, with
        ``cache_encoder``, the encoder cache of its ``cache_dir`` (filled by :meth:`fill_encoder_cache`)."""
        assert self.slu is not None, "build() first"
        dm.connect(self.slu)
        dm.encoder_cache = self.encoder_cache(dm.cache_dir) if self.hparams.cache_encoder else None

    def encoder_cache(self, cache_dir: str | None) -> EncoderCache:
        """The cache of this model's encoder in ``cache_dir`` (None: in memory), one per folder."""
        assert self.whisper is not None and self.slu is not None, "build() first"
        if self._cache is None or self._cache_dir != str(cache_dir):
            self._cache = encoder_cache(self.whisper.get_encoder(), self.slu.feature_extractor, cache_dir,
                                        self.slu.audio_context)
            self._cache_dir = str(cache_dir)
        return self._cache

    def fill_encoder_cache(self, dm: SLUDataModule, *, validation: bool = True) -> None:
        """Encode the rows of ``dm`` (training, then validation) not in its cache yet."""
        cache = dm.encoder_cache
        assert cache is not None and self.whisper is not None and self.slu is not None
        for rows in (dm.train_rows, dm.val_rows if validation else None):
            if not rows:
                continue
            t0 = time.perf_counter()
            n = fill_encoder_cache(cache, self.whisper.get_encoder(), self.slu.feature_extractor, audio_paths(rows),
                                   batch_size=dm.val_batch_size, max_seconds=dm.max_audio_seconds)
            if n and (self._trainer is None or self.trainer.is_global_zero):
                print(f"conslu train: cached {n} encoder outputs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    def on_fit_start(self) -> None:
        # the loaders exist already (the schedule needs the epoch length) but read the cache lazily
        dm = self.trainer.datamodule
        if isinstance(dm, SLUDataModule) and dm.encoder_cache is not None:
            self.fill_encoder_cache(dm, validation=self.trainer.limit_val_batches != 0)

    def on_train_epoch_start(self) -> None:
        if self.hparams.freeze_encoder:
            self.whisper.get_encoder().eval()  # no dropout in a frozen encoder

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
                return encode(encoder, features)
        return encode(encoder, features)

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

    def _skip_audio(self, batch: dict) -> None:
        """Say each file the collator left out (once) and log the running count."""
        for msg in batch.get("skipped_audio", ()):
            if msg not in self._skipped_files:
                self._skipped_files.add(msg)
                rank_zero_warn(f"conslu train: skipped {msg} (the rest of its batch goes on)")
        if batch.get("skipped_audio"):
            self.log("train/skipped_audio", float(len(self._skipped_files)), batch_size=1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._skip_audio(batch)
        if not batch["refs"]:  # every file of the batch failed: a zero loss keeps all ranks in step
            return sum((p.sum() * 0.0 for p in self.parameters() if p.requires_grad), torch.zeros((), device=self.device))
        loss = self.compute_loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["refs"]))
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._skip_audio(batch)
        if not batch["refs"]:
            return
        enc = self._encoder_outputs(batch)
        rows = batch["target_rows"]
        loss = None
        if rows:
            idx = torch.tensor(rows, device=enc.device)
            loss = float(self.compute_loss(batch, enc.index_select(0, idx) if len(rows) < enc.shape[0] else enc))
        outs = decode_encoder_outputs(self.slu, enc, max_new_tokens=self.hparams.val_max_new_tokens)
        hyps = [{"transcript": out.get("transcript", ""), "logical_form": out.get("logical_form") or ""} for out in outs]
        self.val_scores.update(batch["refs"], hyps, self.slu.grammar, loss=loss, loss_rows=len(rows))

    def on_validation_epoch_end(self) -> None:
        if not self.val_scores.update_called:
            return
        result = self.val_scores.compute()  # gathered from every rank, so no further reduction is needed
        self.val_scores.reset()
        metrics = {f"val/{k}": float(result[k]) for k in ("em", "em_tree", "validity", "wer")}
        if "loss" in result:
            metrics["val/loss"] = result["loss"]
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
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else 0
        warmup = int(hp.warmup_steps)
        if math.isfinite(total) and total > warmup:
            scheduler = get_linear_schedule_with_warmup(optimizer, warmup, int(total))
        else:  # no known end (or nothing after the warm-up): warm up, then keep lr
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints -----------------------------------------------------------------------------
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
