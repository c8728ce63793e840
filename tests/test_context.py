"""Audio-length encoder context: rounding, exact log-mels, the encoder over a cut window, batches
that never mix contexts, the folder setting, the cache and the commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conslu.context import TOLERANCE, WINDOW_SECONDS, check_bucket, context_seconds, encode, groups


def test_context_rounds_up_to_the_bucket_within_the_window() -> None:
    assert context_seconds(0.0, 2.0) == 2.0  # at least one bucket
    assert context_seconds(2.0, 2.0) == 2.0
    assert context_seconds(2.0 + TOLERANCE / 2, 2.0) == 2.0  # a header/resampling rounding stays in its bucket
    assert context_seconds(2.0 + 2 * TOLERANCE, 2.0) == 4.0
    assert context_seconds(3.1, 1.5) == 4.5
    assert context_seconds(29.5, 4.0) == WINDOW_SECONDS  # never past the window
    assert context_seconds(3.0, None) == WINDOW_SECONDS  # no context: Whisper's window
    assert groups([3.0, 1.0, 2.5, 0.5], 2.0) == {2.0: [1, 3], 4.0: [0, 2]}


@pytest.mark.parametrize("bad", [0, -1, 31, 0.015, float("nan")])
def test_bad_buckets_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="bucket"):
        check_bucket(bad)


def test_log_mels_of_a_context_are_the_first_frames_of_the_window() -> None:
    from transformers import WhisperFeatureExtractor

    from conslu.audio import log_mel

    rng = np.random.default_rng(0)
    for n_mels in (80, 128):
        fe = WhisperFeatureExtractor(feature_size=n_mels)
        # lengths inside, at and just over a bucket edge
        audios = [0.1 * rng.standard_normal(n).astype(np.float32) for n in (16000 * 3, 16000 * 4, 16000 * 4 + 80)]
        full = log_mel(audios, fe)
        cut = log_mel(audios, fe, 4.0)
        assert cut.shape == (3, n_mels, 400)
        assert torch.equal(cut[:2], full[:2, :, :400])
        # the 5 ms over the bucket are cut: the frames equal those of the audio cut there
        assert torch.equal(cut[2], log_mel([audios[2][: 16000 * 4]], fe)[0, :, :400])
    with pytest.raises(ValueError, match="longer than the 2 s context"):
        log_mel([np.zeros(16000 * 3, np.float32)], fe, 2.0)


def _encoder(max_positions: int, seed: int = 0):
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    torch.manual_seed(seed)
    cfg = WhisperConfig(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, num_mel_bins=80,
                        max_source_positions=max_positions)
    return WhisperEncoder(cfg).eval()


def test_encoder_over_a_cut_window_is_the_encoder_built_for_that_length() -> None:
    """Reference: a transformers encoder configured for 200 positions with the same weights (its
    positional embedding = the first 200 rows) - the model's own forward, no re-implementation."""
    full = _encoder(1500)
    short = _encoder(200)
    state = full.state_dict()
    state["embed_positions.weight"] = state["embed_positions.weight"][:200]
    short.load_state_dict(state)
    feats = torch.randn(2, 80, 400)
    with torch.no_grad():
        assert torch.allclose(encode(full, feats), short(feats).last_hidden_state, atol=1e-5)
        window = torch.randn(2, 80, 3000)
        assert torch.equal(encode(full, window), full(window).last_hidden_state)  # the window: the model's forward
    with pytest.raises(ValueError, match="even number of frames"):
        encode(full, torch.randn(1, 80, 401))


def test_encoder_context_trains(tiny_en) -> None:
    """Gradients reach the encoder through a cut window (full fine-tuning)."""
    encoder = tiny_en.model.get_encoder()
    encoder.train()
    out = encode(encoder, torch.randn(2, 80, 20))
    out.pow(2).mean().backward()
    assert encoder.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in encoder.layers.parameters())  # (the positions stay frozen, as in Whisper)




def test_parse_decodes_each_context_apart_in_input_order(monkeypatch) -> None:
    """A batch of several contexts is decoded one context at a time (each audio at its own, so a
    result never depends on the rest of the batch), results in input order."""
    from transformers import WhisperFeatureExtractor

    import conslu.model as model_mod
    from conslu.model import ConSLU
    from slu_fixtures import grammar, tiny_whisper, whisper_tokenizer

    slu = ConSLU.from_parts(tiny_whisper(0), WhisperFeatureExtractor(feature_size=80), whisper_tokenizer(), grammar(),
                            audio_context=2.0)
    seen: list[tuple[int, int]] = []

    def fake_decode(s, options, input_features=None, **_):
        seen.append((input_features.shape[0], input_features.shape[-1]))
        return [{"frames": input_features.shape[-1], "row": i} for i in range(input_features.shape[0])]

    monkeypatch.setattr(model_mod, "decode", fake_decode)
    sr = 16000
    audios = [np.zeros(int(sr * s), np.float32) for s in (3.0, 1.0, 5.5, 3.9)]
    out = slu.parse(audios)
    assert seen == [(1, 200), (2, 400), (1, 600)]
    assert [o["frames"] for o in out] == [400, 200, 600, 400]
    slu.audio_context = None
    assert [o["frames"] for o in slu.parse(audios)] == [3000] * 4


def test_folder_records_the_context(tmp_path: Path) -> None:
    from transformers import WhisperFeatureExtractor

    from conslu.model import ConSLU, ModelFolderError
    from slu_fixtures import grammar, tiny_whisper, whisper_tokenizer

    slu = ConSLU.from_parts(tiny_whisper(0), WhisperFeatureExtractor(feature_size=80), whisper_tokenizer(), grammar(),
                            audio_context=1.5)
    slu.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "conslu.json").read_text())["audio_context"] == 1.5
    assert ConSLU.from_pretrained(tmp_path / "m").audio_context == 1.5
    cfg = json.loads((tmp_path / "m" / "conslu.json").read_text())
    del cfg["audio_context"]  # a folder written before the setting existed reads 30 s windows
    (tmp_path / "m" / "conslu.json").write_text(json.dumps(cfg))
    assert ConSLU.from_pretrained(tmp_path / "m").audio_context is None
    cfg["audio_context"] = "soon"
    (tmp_path / "m" / "conslu.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match="audio_context"):
        ConSLU.from_pretrained(tmp_path / "m")


def test_sampler_groups_never_share_a_batch() -> None:
    from conslu.training.sampling import BucketBatchSampler

    lengths = list(range(40))
    groups_ = [i % 3 for i in range(40)]
    for shuffle in (True, False):
        sampler = BucketBatchSampler(lengths, 4, bucket_size=2, shuffle=shuffle, seed=1, groups=groups_)
        for epoch in (0, 1):
            sampler.set_epoch(epoch)
            batches = list(sampler)
            assert len(batches) == len(sampler)
            assert sorted(i for b in batches for i in b) == list(range(40))
            assert all(len({groups_[i] for i in b}) == 1 for b in batches)
    # no groups: the batches of before (one partition)
    plain = BucketBatchSampler(lengths, 4, bucket_size=2, seed=1)
    assert list(plain) == list(BucketBatchSampler(lengths, 4, bucket_size=2, seed=1, groups=[0] * 40))
    with pytest.raises(ValueError, match="groups"):
        BucketBatchSampler(lengths, 4, groups=[0])


def test_cache_entries_follow_the_context(tmp_path: Path, wav_factory) -> None:
    from transformers import WhisperFeatureExtractor

    from conslu.features import encoder_cache, fill_encoder_cache

    encoder = _encoder(1500)
    fe = WhisperFeatureExtractor(feature_size=80)
    paths = [str(wav_factory(f"{i}.wav", n)) for i, n in enumerate((16000 * 1, 16000 * 3, 16000 * 5, 16000 * 3))]
    window = encoder_cache(encoder, fe, tmp_path / "c")
    ctx = encoder_cache(encoder, fe, tmp_path / "c", 2.0)
    assert window.fingerprint != ctx.fingerprint and ctx.audio_context == 2.0
    assert fill_encoder_cache(ctx, encoder, fe, paths, batch_size=8) == 4
    assert [ctx.get(ctx.key(p)).shape[0] for p in paths] == [100, 200, 300, 200]
    assert fill_encoder_cache(window, encoder, fe, paths[:1]) == 1
    assert window.get(window.key(paths[0])).shape[0] == 1500
    # an entry is what the live encoder gives the utterance at its own context
    from conslu.audio import load_audio, log_mel

    with torch.no_grad():
        live = encode(encoder, log_mel([load_audio(paths[2])], fe, 6.0))[0]
    assert torch.allclose(ctx.get(ctx.key(paths[2])).float(), live, atol=2e-2)


def test_collator_refuses_mixed_cached_contexts() -> None:
    from conslu.training.data import SLUCollator

    col = SLUCollator(targets=None, feature_extractor=None)  # type: ignore[arg-type]
    rows = [{"id": "a", "encoder_output": torch.zeros(100, 4)}, {"id": "b", "encoder_output": torch.zeros(200, 4)}]
    with pytest.raises(ValueError, match="mix audio contexts"):
        col(rows)


def test_commands_take_the_context(tmp_path: Path) -> None:
    from conslu.cli import build_parser
    from conslu import commands

    parser = build_parser(commands.load())
    assert parser.parse_args(["init", "--model", "m", "--grammar", "g", "--out", "o"]).audio_context == 2.0
    assert parser.parse_args(["init", "--model", "m", "--grammar", "g", "--out", "o", "--audio-context", "window"]).audio_context is None
    args = parser.parse_args(["parse", "--model", "m", "x.wav", "--audio-context", "4"])
    assert args.audio_context == 4.0
    assert parser.parse_args(["parse", "--model", "m", "x.wav"]).audio_context == "model"
    with pytest.raises(SystemExit):
        parser.parse_args(["parse", "--model", "m", "x.wav", "--audio-context", "0.013"])
    from conslu.parse import decode_settings
    from conslu.decoding import DecodingOptions

    assert "audio_context" not in decode_settings(str(tmp_path), DecodingOptions())
    assert decode_settings(str(tmp_path), DecodingOptions(), None)["audio_context"] is None


def test_compare_recipe_views_every_kth_training_row(tmp_path: Path) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare", Path(__file__).resolve().parents[1] / "recipes" / "context" / "compare.py")
    compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compare)
    corpus = tmp_path / "c"
    (corpus / "manifests").mkdir(parents=True)
    (corpus / "train").mkdir()
    (corpus / "manifests" / "train.tsv").write_text("h\n" + "".join(f"r{i}\n" for i in range(7)))
    (corpus / "manifests" / "eval.tsv").write_text("h\ne0\n")
    view = compare.corpus_view(corpus, tmp_path / "out", 3)
    assert (view / "manifests" / "train.tsv").read_text().split() == ["h", "r0", "r3", "r6"]
    assert (view / "manifests" / "eval.tsv").read_text() == "h\ne0\n"
    assert (view / "train").resolve() == (corpus / "train").resolve()
    cfg = compare.config(view, tmp_path / "w", None, 5)
    assert cfg["model"]["audio_context"] is None and cfg["trainer"]["max_steps"] == 5
