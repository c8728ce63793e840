"""Test helper: a minimal writer of the CTranslate2 ``model.bin`` format and tiny synthetic Whisper models.

Independent of ``conslu.ct2``: it writes what the CTranslate2 converter would write for a Whisper
model (fused q/k/v with a zero key bias, fused cross-attention k/v, projection aliased to the
embeddings, optional int8 quantisation with per-row scales) from an HF state dict.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4, "bfloat16": 5}
N_BPE = 256  # byte-level base vocabulary of the synthetic tokenizer


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<H", len(b) + 1) + b + b"\0"


def write_model_bin(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
                    *, version: int = 6, spec: str = "WhisperSpec", revision: int = 3,
                    bfloat16: frozenset[str] = frozenset()) -> bytes:
    """Serialise `variables` (numpy arrays; dtype chooses the type id) the way CTranslate2 does.

    Names in `bfloat16` hold uint16 arrays of raw bfloat16 bits (numpy has no bfloat16).
    """
    out = bytearray(struct.pack("<I", version))
    if version >= 2:
        out += _string(spec) + struct.pack("<I", revision)
    out += struct.pack("<I", len(variables))
    for name in sorted(variables):
        arr = np.asarray(variables[name])  # tobytes() is C order; ascontiguousarray would make 0-d arrays 1-d
        out += _string(name) + struct.pack("<B", arr.ndim)
        out += b"".join(struct.pack("<I", d) for d in arr.shape)
        raw = arr.astype(arr.dtype.newbyteorder("<")).tobytes()
        if version >= 4:
            type_id = TYPE_IDS["bfloat16"] if name in bfloat16 else TYPE_IDS[str(arr.dtype)]
            out += struct.pack("<B", type_id) + struct.pack("<I", len(raw))
        else:
            out += struct.pack("<B", arr.dtype.itemsize) + struct.pack("<I", arr.size)
        out += raw
    if version >= 3:
        aliases = aliases or {}
        out += struct.pack("<I", len(aliases))
        for alias in sorted(aliases):
            out += _string(alias) + _string(aliases[alias])
    Path(path).write_bytes(bytes(out))
    return bytes(out)


def specials() -> list[str]:
    """English-only Whisper special tokens in id order (after the BPE vocabulary)."""
    langs = [f"<|l{i:02d}|>" for i in range(98)]  # 99 language slots; the first is <|en|>
    return (["<|endoftext|>", "<|startoftranscript|>", "<|en|>"] + langs
            + ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>",
               "<|notimestamps|>"])


def vocab_size(n_timestamps: int = 1501) -> int:
    return N_BPE + len(specials()) + n_timestamps


def tokenizer_json() -> dict:
    """A byte-level BPE tokenizer.json with the Whisper special tokens (like the ct2 packages ship)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert len(chars) == N_BPE
    vocab = {c: i for i, c in enumerate(chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    data = json.loads(tok.to_str())
    data["added_tokens"] = [
        {"id": N_BPE + i, "content": c, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, c in enumerate(specials())
    ]
    return data


def tiny_hf_model(seed: int = 0, d_model: int = 64, heads: int = 4, layers: int = 2, n_mels: int = 80):
    """A random tiny HF Whisper model whose vocabulary matches the synthetic tokenizer."""
    import torch
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    eot = N_BPE
    cfg = WhisperConfig(
        vocab_size=vocab_size(), num_mel_bins=n_mels, d_model=d_model, encoder_layers=layers, decoder_layers=layers,
        encoder_attention_heads=heads, decoder_attention_heads=heads, encoder_ffn_dim=4 * d_model,
        decoder_ffn_dim=4 * d_model, max_source_positions=1500, max_target_positions=448,
        pad_token_id=eot, bos_token_id=eot, eos_token_id=eot, decoder_start_token_id=eot + 1,
    )
    model = WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make every bias and norm non-trivial so a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    amax = np.abs(w).reshape(w.shape[0], -1).max(axis=1)
    amax[amax == 0] = 127.0
    scale = (127.0 / amax).astype(np.float32)
    q = np.rint(w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.int8)
    return q, scale


def hf_to_ct2(model, dtype: str = "float32", *, num_heads: bool = True) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The CTranslate2 variables of an HF Whisper model, as the CTranslate2 converter lays them out.

    dtype: float32 / float16 (all floats), or int8 (linear weights int8 + ``weight_scale``, rest float32).
    """
    sd = {k: v.detach().cpu().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    cfg = model.config
    v: dict[str, np.ndarray] = {}
    linear_names: list[str] = []

    def lin(ct2: str, w: np.ndarray, b: np.ndarray) -> None:
        v[f"{ct2}/weight"], v[f"{ct2}/bias"] = w, b
        linear_names.append(f"{ct2}/weight")

    def norm(ct2: str, hf: str) -> None:
        v[f"{ct2}/gamma"], v[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def attn(ct2: str, hf: str, cross: bool) -> None:
        q, k, vv = (f"{hf}.{x}_proj" for x in "qkv")
        o = f"{hf}.out_proj"
        zeros = np.zeros_like(sd[f"{q}.bias"])
        if cross:
            lin(f"{ct2}/linear_0", sd[f"{q}.weight"], sd[f"{q}.bias"])
            lin(f"{ct2}/linear_1", np.concatenate([sd[f"{k}.weight"], sd[f"{vv}.weight"]]),
                np.concatenate([zeros, sd[f"{vv}.bias"]]))
            lin(f"{ct2}/linear_2", sd[f"{o}.weight"], sd[f"{o}.bias"])
        else:
            lin(f"{ct2}/linear_0", np.concatenate([sd[f"{q}.weight"], sd[f"{k}.weight"], sd[f"{vv}.weight"]]),
                np.concatenate([sd[f"{q}.bias"], zeros, sd[f"{vv}.bias"]]))
            lin(f"{ct2}/linear_1", sd[f"{o}.weight"], sd[f"{o}.bias"])
        norm(f"{ct2}/layer_norm", f"{hf}_layer_norm")

    def ffn(ct2: str, hf: str) -> None:
        lin(f"{ct2}/linear_0", sd[f"{hf}.fc1.weight"], sd[f"{hf}.fc1.bias"])
        lin(f"{ct2}/linear_1", sd[f"{hf}.fc2.weight"], sd[f"{hf}.fc2.bias"])
        norm(f"{ct2}/layer_norm", f"{hf}.final_layer_norm")

    e, d = "model.encoder", "model.decoder"
    for i in (1, 2):
        v[f"encoder/conv{i}/weight"], v[f"encoder/conv{i}/bias"] = sd[f"{e}.conv{i}.weight"], sd[f"{e}.conv{i}.bias"]
    v["encoder/position_encodings/encodings"] = sd[f"{e}.embed_positions.weight"]
    for i in range(cfg.encoder_layers):
        attn(f"encoder/layer_{i}/self_attention", f"{e}.layers.{i}.self_attn", False)
        ffn(f"encoder/layer_{i}/ffn", f"{e}.layers.{i}")
    norm("encoder/layer_norm", f"{e}.layer_norm")
    v["decoder/embeddings/weight"] = sd[f"{d}.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = sd[f"{d}.embed_positions.weight"]
    for i in range(cfg.decoder_layers):
        attn(f"decoder/layer_{i}/self_attention", f"{d}.layers.{i}.self_attn", False)
        attn(f"decoder/layer_{i}/attention", f"{d}.layers.{i}.encoder_attn", True)
        ffn(f"decoder/layer_{i}/ffn", f"{d}.layers.{i}")
    norm("decoder/layer_norm", f"{d}.layer_norm")

    if dtype == "float16":
        v = {k: x.astype(np.float16) for k, x in v.items()}
    elif dtype == "int8":
        for name in linear_names:
            v[name], v[name + "_scale"] = _quantize_int8(v[name])
    elif dtype != "float32":
        raise ValueError(dtype)
    if num_heads:
        v["encoder/num_heads"] = np.array(cfg.encoder_attention_heads, dtype=np.int16)
        v["decoder/num_heads"] = np.array(cfg.decoder_attention_heads, dtype=np.int16)
    v["decoder/scale_embeddings"] = np.array(0, dtype=np.int8)
    return v, {"decoder/projection/weight": "decoder/embeddings/weight"}


def write_ct2_folder(folder: Path, variables: dict[str, np.ndarray], aliases: dict[str, str], *,
                     parts: int = 1, version: int = 6) -> list[Path]:
    """Write a CTranslate2 model folder (model.bin or model.bin.part1..N in part folders) and return the folders."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"alignment_heads": [[1, 0], [1, 2]], "lang_ids": list(range(N_BPE + 2, N_BPE + 101)),
              "suppress_ids": [1, 2, 7], "suppress_ids_begin": [220 % N_BPE, N_BPE]}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer_json()))
    data = write_model_bin(folder / "model.bin", variables, aliases, version=version)
    if parts == 1:
        return [folder]
    (folder / "model.bin").unlink()
    size = -(-len(data) // parts)
    folders = []
    for i in range(parts):
        sub = folder / f"pkg{i + 1}" / "data"
        sub.mkdir(parents=True)
        (sub / f"model.bin.part{i + 1}").write_bytes(data[i * size : (i + 1) * size])
        folders.append(sub)
    for name in ("config.json", "tokenizer.json"):
        (folder / name).rename(folders[0] / name)
    return folders
