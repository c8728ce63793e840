"""ConSLU folders: save/load round trip, refusals, collate/loss, and `conslu init`."""

import json
import shutil
from functools import lru_cache

import numpy as np
import pytest
import torch

from conslu.model import ConSLU, ModelFolderError
from slu_fixtures import EXAMPLES, GRAMMAR, tiny_conslu


@lru_cache(maxsize=None)
def _saved(tmp_root):
    slu = tiny_conslu(0)
    out = slu.save_pretrained(f"{tmp_root}/m")
    return slu, out


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return _saved(str(tmp_path_factory.mktemp("conslu")))


def test_round_trip(saved):
    slu, out = saved
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "preprocessor_config.json", "grammar.json", "conslu.json"} <= names
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".m.")]  # no temp folders left
    back = ConSLU.from_pretrained(out)
    assert back.target_format == "simplified" and back.constraints == "both"
    assert back.tokenizer.label_ids == slu.tokenizer.label_ids
    assert back.tokenizer.sep_id == slu.tokenizer.sep_id
    for k, v in slu.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k]), k
    batch = slu.collate([(t, lf, {}) for t, lf in EXAMPLES[:2]])
    feats = slu.features([np.zeros(8000, np.float32)] * 2)
    assert torch.allclose(slu.loss(feats, batch["labels"]), back.loss(feats, batch["labels"], loss_states=batch["loss_states"]))
    assert slu.generate(feats, max_new_tokens=8) == back.generate(feats, max_new_tokens=8)
    # saving again over an existing folder replaces it atomically
    back.constraints = "decoding"
    back.save_pretrained(out)
    assert json.loads((out / "conslu.json").read_text())["constraints"] == "decoding"
    back.constraints = "both"
    back.save_pretrained(out)


def test_new_embeddings_are_piece_means():
    slu = tiny_conslu(1)
    emb = slu.model.get_input_embeddings().weight
    tok = slu.tokenizer
    pieces = tok.text_ids(" create alarm")
    assert torch.allclose(emb[tok.label_ids["IN:CREATE_ALARM"]], emb[pieces].mean(0))
    assert torch.allclose(emb[tok.open_id], emb[tok.text_ids(" [")].mean(0))
    assert slu.model.proj_out.weight.shape[0] == len(tok)


def test_refusals(saved, tmp_path):
    _, out = saved
    bad = tmp_path / "nogrammar"
    shutil.copytree(out, bad)
    (bad / "grammar.json").unlink()
    with pytest.raises(ModelFolderError, match="no grammar.json"):
        ConSLU.from_pretrained(bad)
    with pytest.raises(ModelFolderError, match="'simplified'-target model, but target format 'whislu'"):
        ConSLU.from_pretrained(out, target_format="whislu")
    other = tmp_path / "othergrammar"
    shutil.copytree(out, other)
    g = json.loads((other / "grammar.json").read_text())
    from conslu.grammar import Grammar

    gr = Grammar.load(other / "grammar.json")
    gr.children["ROOT"] = set(gr.children["ROOT"]) | {"IN:BRAND_NEW"}
    gr.counts.setdefault("ROOT", {})["IN:BRAND_NEW"] = 1
    gr.save(other / "grammar.json")
    with pytest.raises(ModelFolderError, match="does not match the tokenizer's label tokens.*IN:BRAND_NEW"):
        ConSLU.from_pretrained(other)
    with pytest.raises(ModelFolderError, match="not a ConSLU model folder"):
        ConSLU.from_pretrained(tmp_path)
    assert g  # the original grammar was readable JSON


def test_collate_layout_and_loss_modes():
    slu = tiny_conslu(2)
    batch = slu.collate([(t, lf, {"domain": "x"}) for t, lf in EXAMPLES[:3]])
    dec, lab = batch["decoder_input_ids"], batch["labels"]
    P = len(slu.tokenizer.prefix_ids)
    assert dec.shape == lab.shape
    assert dec[:, :P].tolist() == [slu.tokenizer.prefix_ids] * 3
    assert (lab[:, : P - 1] == -100).all()
    assert torch.equal(slu.decoder_inputs(lab), dec)
    feats = slu.features([np.zeros(8000, np.float32)] * 3)
    constrained = slu.loss(feats, lab)
    slu.constraints = "decoding"
    plain = slu.loss(feats, lab)
    with torch.no_grad():
        logits = slu.model(input_features=feats, decoder_input_ids=dec).logits
    from conslu.loss import slu_loss

    assert torch.allclose(constrained, slu_loss(logits, lab, slu.tables), rtol=1e-5)
    assert torch.allclose(plain, torch.nn.functional.cross_entropy(logits.flatten(0, 1), lab.flatten(), ignore_index=-100), rtol=1e-5)
    assert not torch.allclose(constrained, plain) and "loss_states" not in slu.collate([EXAMPLES[0]])


def test_whislu_needs_no_constraints():
    with pytest.raises(ValueError, match="constraints='none' with target_format='whislu'"):
        tiny_conslu(0, "whislu", "both")
    slu = tiny_conslu(0, "whislu", "none")
    assert slu.tables is None and len(slu.tokenizer) == 51864
    batch = slu.collate([(EXAMPLES[0][0], EXAMPLES[0][1], {"gender": "female", "native": "yes", "domain": "alarm"})])
    assert torch.isfinite(slu.loss(slu.features([np.zeros(8000, np.float32)]), batch["labels"]))


@pytest.mark.slow
def test_conslu_init_cli_real_tiny(tmp_path):
    from conslu.cli import main

    out = tmp_path / "init"
    assert main(["init", "--model", "whisper-tiny.en", "--grammar", str(GRAMMAR), "--out", str(out)]) == 0
    slu = ConSLU.from_pretrained(out)
    res = slu.parse([np.zeros(16000, np.float32)], max_new_tokens=20)
    assert res[0]["valid"]
    assert main(["init", "--model", "whisper-tiny.en", "--grammar", str(tmp_path / "missing.json"), "--out", str(out)]) == 2
