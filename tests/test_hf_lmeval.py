"""A converted model evaluates through lm-eval's HFLM (in-process model + tokenizer) on a local task file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selective_attention.hf import convert

# -------------------------------------------------------------------------------------------------- lm-eval


TASK_YAML = """task: ssa_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
"""


def _loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context) under ``model``, computed directly."""
    ctx, cont = tok(context).input_ids, tok(continuation).input_ids
    full = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = model(full[:, :-1]).logits.log_softmax(-1)[0, len(ctx) - 1 :]
    return logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()


def test_lm_eval_hflm_scores_a_converted_model(
    tmp_path: Path, randomise_temperatures, byte_tokenizer, tiny_llama_257
) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    tok = byte_tokenizer
    model = convert(tiny_llama_257())
    randomise_temperatures(model)
    # The gold answer is the model's own favourite choice on the first 3 questions and the other one on the
    # last 3: lm-eval must report exactly 0.5, and only if it scores with this (converted) model.
    choices = [" yes", " no"]
    rows = []
    for i in range(6):
        q = f"Q{i}: is {i} even?"
        best = max(range(2), key=lambda c: _loglik(model, tok, q, choices[c]))
        rows.append({"question": q, "choices": choices, "answer": best if i < 3 else 1 - best})
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ssa_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    res = lm_eval.simple_evaluate(
        model=lm,
        tasks=["ssa_tiny_mc"],
        log_samples=True,
        task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path)),
    )
    assert res["results"]["ssa_tiny_mc"]["acc,none"] == 0.5
    # and each log-likelihood lm-eval used equals ours
    checked = 0
    for s in res["samples"]["ssa_tiny_mc"]:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            assert abs(_loglik(model, tok, context, continuation) - resp[0][0]) < 1e-4
            checked += 1
    assert checked == 12  # 6 questions x 2 choices
