"""The GPU path: decoding, the constrained loss and half precision on CUDA agree with the CPU
(``pytest -m cuda``; skipped where no CUDA device is visible; ``recipes/gpu/check.sh`` runs them)."""

from __future__ import annotations

import copy

import pytest
import torch

from conslu.decoding import DecodingOptions, decode_tokens
from decoder_fixtures import PAIRS, family_params, generated, trained

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible")]


def _on(tr, device: str, dtype: torch.dtype = torch.float32):
    slu = copy.deepcopy(tr.slu).to(device, dtype)
    return slu, tr.feats.to(device, dtype)


@pytest.mark.parametrize("family", family_params())
@pytest.mark.parametrize("beam", [1, 4])
def test_decoding_on_cuda_equals_cpu(family, beam):
    """Greedy (copy-speculative and plain) and beam search give the CPU's tokens, with the
    constraint tables built on the GPU."""
    tr = trained(family)
    opts = DecodingOptions(max_new_tokens=64, beam_size=beam, loop_guard=False)
    cpu = decode_tokens(tr.slu, opts, input_features=tr.feats)
    slu, feats = _on(tr, "cuda")
    assert slu.tables.device.type == "cuda"
    got = decode_tokens(slu, opts, input_features=feats)
    assert got == cpu
    if beam == 1:
        assert decode_tokens(slu, opts.replace(speculative=False), input_features=feats) == cpu


@pytest.mark.parametrize("family", family_params())
def test_loss_on_cuda_equals_cpu(family):
    tr = trained(family)
    batch = tr.slu.collate(PAIRS)
    ref = float(tr.slu.loss(tr.feats, batch["labels"], decoder_input_ids=batch["decoder_input_ids"],
                            loss_states=batch["loss_states"]))
    slu, feats = _on(tr, "cuda")
    dev = {k: (v.to("cuda") if hasattr(v, "to") else v) for k, v in slu.collate(PAIRS).items()}
    got = float(slu.loss(feats, dev["labels"], decoder_input_ids=dev["decoder_input_ids"],
                         loss_states=dev["loss_states"]))
    assert got == pytest.approx(ref, rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_speculative_equals_greedy_on_cuda(dtype):
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        pytest.skip("no bf16 on this GPU")
    tr = trained("en")
    slu, feats = _on(tr, "cuda", dtype)
    opts = DecodingOptions(max_new_tokens=64, loop_guard=False)
    spec = decode_tokens(slu, opts, input_features=feats)
    assert spec == decode_tokens(slu, opts.replace(speculative=False), input_features=feats)
    assert sum(generated(a, slu.tokenizer) == generated(b, slu.tokenizer)
               for a, b in zip(spec, decode_tokens(tr.slu, opts, input_features=tr.feats))) >= len(PAIRS) // 2
