"""A converted model evaluates through lm-eval's HFLM (in-process model + tokenizer) on a local task file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from selective_attention.hf import convert
from test_hf_convert import randomise_temperatures
from test_hf_io import byte_tokenizer, tiny_llama_257

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
metric_list:
  - metric: acc
"""


def test_lm_eval_hflm_runs_a_converted_model(tmp_path: Path) -> None:
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    rows = [{"question": f"Q{i}: is {i} even?", "choices": [" yes", " no"], "answer": i % 2} for i in range(4)]
    data = tmp_path / "tiny.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "ssa_tiny_mc.yaml").write_text(TASK_YAML.format(data=data))
    tok = byte_tokenizer()
    model = convert(tiny_llama_257())
    randomise_temperatures(model)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2)
    res = lm_eval.simple_evaluate(model=lm, tasks=["ssa_tiny_mc"], log_samples=True,
                                  task_manager=lm_eval.tasks.TaskManager(include_path=str(tmp_path)))
    acc = res["results"]["ssa_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    # lm-eval scored with the converted model: its log-likelihoods equal ours, computed directly
    samples = res["samples"]["ssa_tiny_mc"]
    checked = 0
    for s in samples:
        for (context, continuation), resp in zip(s["arguments"], s["resps"]):
            ctx, cont = tok(context).input_ids, tok(continuation).input_ids
            full = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model(full[:, :-1]).logits.log_softmax(-1)[0, len(ctx) - 1:]
            ours = logp.gather(-1, torch.tensor(cont)[:, None]).sum().item()
            assert abs(ours - resp[0][0]) < 1e-4
            checked += 1
    assert checked == 8  # 4 questions x 2 choices
