"""``ssa experiment finetune --budget quick|default|full|cpu``: SSA fitted onto the real SmolLM2-135M, fine-tuned.

Three fine-tunes of the same pretrained model (the bundled GGUF, de-quantised to float32) on a corpus it was not
tuned on (``sotu`` by default), same data order and steps per seed:
    vanilla     the plain model, every weight trained
    ssa         ``convert`` (identity at init) + the same fine-tune, temperatures at the official 1e-2
    ssa-temps   ``convert`` + temperatures only (the base weights frozen: what SSA alone buys)
Measured: validation perplexity on the corpus's validation documents (mean +- sample std over seeds and the
paired difference to vanilla with a 95 % interval) and zero-shot accuracy through lm-eval, each with its n and
standard error sqrt(acc (1 - acc) / n); tokens-to-target (vanilla's tokens to its final validation perplexity /
the row's, read on the validations during training). Figures: the validation curves of every run, the paired
differences and tokens-to-target per seed (``finetune-<data>*.png``).

Runs live in ``OUT/runs/<method>-seed<S>/`` and resume like ``ssa train``; rerunning skips what is done. One
optimizer step of 4 x 256 tokens takes ~16 s on 2 CPU cores (measured: 60-64 tokens/s), so ``full`` (2 seeds x 3
methods x 300 steps, full task sets) is a GPU job: ``configs/smollm2-sotu-finetune.yaml`` is the same recipe for
one GPU.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError
from selective_attention.experiments import common, lm
from selective_attention.utils.io import read_json
from selective_attention.utils.stats import paired

DEFAULT_SEEDS = 1
METHODS = ("vanilla", "ssa", "ssa-temps")
EVAL_FILE = "finetune_eval.json"


@dataclass
class Config:
    budget: str = "default"
    model: str = ""  # "" -> the bundled SmolLM2-135M GGUF
    data: str = "sotu"
    methods: tuple[str, ...] = METHODS
    steps: int = 60
    seq_len: int = 256
    batch_size: int = 4
    lr: float = 1e-5
    temperature_lr: float = 1e-2
    eval_tokens: int = 32_768  # validation tokens for the final perplexity
    zero_shot_tasks: tuple[str, ...] = ("arc_easy", "piqa", "hellaswag")
    zero_shot_limit: int = 100  # examples per task; 0 = the full set
    checkpoint_every: int = 20  # a checkpoint of the 135M model with its optimizer state is ~1.6 GB


BUDGETS: dict[str, dict[str, Any]] = {
    "quick": {
        "steps": 2,
        "seq_len": 64,
        "batch_size": 2,
        "eval_tokens": 1_024,
        "zero_shot_tasks": ("arc_easy",),
        "zero_shot_limit": 8,
    },
    "default": {},
    "full": {"steps": 300, "zero_shot_limit": 0},
    # the CPU version of the question: 2 seeds x 3 rows x 100 steps of 4 x 256 tokens (~16 s a step on 2
    # cores: ~2.7 h of training, and ~10 min per evaluation, 7 of them) at the weights' 1e-5 / temperatures' 1e-2
    # of the official recipe, 200 examples per zero-shot task; resumable over sittings (checkpoints every 20 steps)
    "cpu": {"steps": 100, "zero_shot_limit": 200},
}
BUDGET_SEEDS = {"quick": 1, "default": 1, "full": 2, "cpu": 2}


def _method(method: str) -> dict[str, Any]:
    if method == "vanilla":
        return {"attention": "vanilla"}
    if method == "ssa":
        return {"attention": "ssa"}
    if method == "ssa-temps":
        return {"attention": "ssa", "temperatures_only": True}
    raise UserError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def model_path(config: Config) -> str:
    from selective_attention.utils.packages import smollm2_gguf

    return config.model or str(smollm2_gguf())


def _val_documents(data: str, tokenizer, max_tokens: int) -> list[str]:
    from selective_attention.data.corpora import load_documents

    out, n = [], 0
    for d in load_documents(data, "val"):
        ids = tokenizer(d, add_special_tokens=False)["input_ids"]
        if n + len(ids) > max_tokens:  # long documents (speeches): keep a prefix so the budget holds
            d = tokenizer.decode(ids[: max(1, max_tokens - n)])
        out.append(d)
        n += min(len(ids), max_tokens - n) + 1
        if n >= max_tokens:
            break
    return out


def _evaluate(run_dir: Path, config: Config, model_dir: str | None = None) -> dict[str, Any]:
    """Validation perplexity and zero-shot accuracy of ``run_dir``'s final model (or of ``model_dir``, e.g. the
    base before fine-tuning), cached in ``run_dir / EVAL_FILE``."""

    def measure() -> dict[str, Any]:
        from selective_attention.evaluate import perplexity
        from selective_attention.hf import load_pretrained

        model, tok = load_pretrained(model_dir or str(run_dir / "final"))
        model.eval()
        docs = _val_documents(config.data, tok, config.eval_tokens)
        ev = perplexity(model, tok, docs, seq_len=config.seq_len, batch_size=4)
        return {
            "val_ppl": ev["token_ppl"],
            "val_loss": ev["loss"],
            "word_ppl": ev["word_ppl"],
            "eval_tokens": ev["tokens"],
            "zero_shot": common.zero_shot_accuracy(model, tok, config.zero_shot_tasks, config.zero_shot_limit),
        }

    return common.cached(run_dir / EVAL_FILE, _eval_settings(config), measure)


def _eval_settings(config: Config) -> dict[str, Any]:
    """What a saved evaluation must have been made with to be reused."""
    return {
        "eval_tokens": config.eval_tokens,
        "tasks": list(config.zero_shot_tasks),
        "limit": config.zero_shot_limit,
        "seq_len": config.seq_len,
        "data": config.data,
    }


def _saved_evaluation(run_dir: Path, config: Config) -> dict[str, Any] | None:
    """The evaluation saved in ``run_dir`` with this config's settings (None when there is none)."""
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return None
    saved = read_json(path, "a saved evaluation")
    return saved if isinstance(saved, dict) and saved.get("settings") == _eval_settings(config) else None


def _train_config(config: Config, init: str, method: str, seed: int, run_dir: Path) -> Any:
    from selective_attention.train import TrainConfig

    return TrainConfig(
        data=config.data,
        init_from=init,
        max_tokens=config.steps * config.batch_size * config.seq_len,
        seed=seed,
        out=str(run_dir),
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        lr=config.lr,
        temperature_lr=config.temperature_lr,
        warmup=max(1, config.steps // 10),
        eval_every=max(1, config.steps // 4),
        eval_tokens=min(8192, config.eval_tokens),
        progress=False,
        checkpoint_every=config.checkpoint_every,
        keep_checkpoints=1,
        **_method(method),
    )


def _record(method: str, seed: int, run_dir: Path, info: dict[str, Any], ev: dict[str, Any]) -> dict[str, Any]:
    """What one finished fine-tune measured: its run.json ``info``, its evaluation ``ev`` and its curve."""
    curve_tokens, curve_ppl = lm.validation_curve(run_dir)
    return {
        "method": method,
        "seed": seed,
        # the validations during training (eval_tokens of them each): what tokens-to-target reads
        "curve": {"tokens": curve_tokens, "ppl": curve_ppl},
        "curve_final_ppl": float(info["final_val_ppl"]),
        "tokens": int(info["tokens"]),
        "tokens_per_s": float(info["tokens_per_s"]),
        "new_parameters": int(info["parameters"]["new"]),
        "temperatures": info.get("temperatures"),
        **ev,
    }


def run(
    out: Path, config: Config, seeds: list[int], progress: bool = True, tables_only: bool = False
) -> dict[str, Any]:
    """Evaluate the base, fine-tune and evaluate every (seed, method), then write the tables. ``tables_only``
    trains and measures nothing: the tables of the fine-tunes finished and evaluated so far (the rest pending)."""
    from selective_attention.train import train

    if config.budget not in BUDGETS:
        raise UserError(f"unknown budget {config.budget!r}; choose from {', '.join(BUDGETS)}")
    if "vanilla" not in config.methods:
        raise UserError("keep vanilla in methods: every method is compared with it")
    for m in config.methods:
        _method(m)
    init = model_path(config)
    records, pending = [], []
    # before fine-tuning: what a fine-tune may cost
    base = _saved_evaluation(out / "base", config) if tables_only else _evaluate(out / "base", config, model_dir=init)
    bar = common.progress(len(seeds) * len(config.methods), f"finetune ({config.budget})", progress)
    for seed in seeds:
        for m in config.methods:
            d = out / "runs" / f"{m}-seed{seed}"
            if tables_only:
                ev = _saved_evaluation(d, config)
                if ev is None or not (d / "run.json").is_file():
                    pending.append(f"{m}-seed{seed}")
                    continue
                info = read_json(d / "run.json", "a finished fine-tune's run.json")
            else:
                info = train(_train_config(config, init, m, seed, d))
                ev = _evaluate(d, config)
            records.append(_record(m, seed, d, info, ev))
            bar.update(1)
    bar.close()
    results = {
        "experiment": "finetune",
        "config": dataclasses.asdict(config),
        "seeds": list(seeds),
        "model": Path(init).name,
        "base": base,
        "methods": _aggregate(records),
        "runs": records,
        "pending": pending,
        "complete": not pending and base is not None,
    }
    return common.finish(out, results, _figures, summary)


def _aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    vanilla = {r["seed"]: r for r in records if r["method"] == "vanilla"}
    methods: dict[str, dict[str, Any]] = {}
    for m in dict.fromkeys(r["method"] for r in records):
        rows = [r for r in records if r["method"] == m]
        mean, std = common.mean_std([r["val_ppl"] for r in rows])
        d: dict[str, Any] = {
            "val_ppl": mean,
            "val_ppl_std": std,
            "seeds": [r["seed"] for r in rows],
            "val_ppl_per_seed": [r["val_ppl"] for r in rows],
            "new_parameters": rows[0]["new_parameters"],
            "zero_shot": common.pooled_zero_shot(rows) or {},
            "temperatures": lm.temperature_row(rows) if all("temperatures" in r for r in rows) else None,
        }
        pairs = [(r, vanilla[r["seed"]]) for r in rows if r["seed"] in vanilla]
        if m != "vanilla" and pairs:
            d["paired_percent"] = paired([100 * (r["val_ppl"] - v["val_ppl"]) / v["val_ppl"] for r, v in pairs])
            targets = [(r["curve"], v["curve"], v["curve_final_ppl"], v["tokens"]) for r, v in pairs]
            d.update(lm.tokens_to_target(targets))
        methods[m] = d
    return methods


def _accuracy_cell(zero_shot: dict[str, Any], task: str) -> str:
    """acc ± se (n) of one task; "-" when it was not measured (or had no examples, so no standard error)."""
    res = zero_shot.get(task)
    if not res or res["stderr"] is None:
        return "-"
    return f"{res['acc']:.3f} ± {res['stderr']:.3f} ({res['n']})"


def summary(results: dict[str, Any]) -> str:
    cfg = results["config"]
    tasks = list(cfg["zero_shot_tasks"])
    lines = [
        f"# Fine-tuning {results['model']} on {cfg['data']} (budget {cfg['budget']}: {cfg['steps']} steps of "
        f"{cfg['batch_size']} x {cfg['seq_len']} tokens, seeds {results['seeds']})",
        "",
        "| method | new params | val ppl | vs vanilla, paired [95 % CI] | tokens to vanilla's ppl, vanilla / method | "
        + " | ".join(f"{t} acc ± se (n)" for t in tasks)
        + " |",
        "|---" * (5 + len(tasks)) + "|",
    ]
    if results.get("pending"):
        lines[1:1] = [
            "",
            f"**Incomplete**: {len(results['pending'])} fine-tune(s) still to train or evaluate (rerun the same "
            f"command): {', '.join(results['pending'])}",
        ]
    base = results.get("base")
    if base:
        zs = [_accuracy_cell(base["zero_shot"], t) for t in tasks]
        lines.append(f"| base, before fine-tuning | 0 | {base['val_ppl']:.3f} | - | - | " + " | ".join(zs) + " |")
    for m, d in results["methods"].items():
        p = d.get("paired_percent")
        pp = (
            "-"
            if not p
            else (
                f"{p['mean']:+.2f} % (1 seed)"
                if p["low"] is None
                else f"{p['mean']:+.2f} % [{p['low']:+.2f}, {p['high']:+.2f}] {p['verdict']}"
            )
        )
        zs = [_accuracy_cell(d["zero_shot"], t) for t in tasks]
        reach = lm.tokens_to_target_cell(d) if "speedup_per_seed" in d else "-"
        lines.append(
            f"| {m} | {d['new_parameters']:,} | {d['val_ppl']:.3f} ± {d['val_ppl_std']:.3f} | {pp} | {reach} | "
            + " | ".join(zs)
            + " |"
        )
    lines += [
        "",
        f"Val ppl: {cfg['eval_tokens']:,} validation tokens of the final model; tokens-to-target reads the "
        "validations during training (their final value is vanilla's target), same seed.",
    ]
    return "\n".join(lines + lm.temperature_lines(results["methods"]))


def _figures(out: Path, results: dict[str, Any]) -> None:
    """Validation curves per method and seed, the paired differences to vanilla, tokens-to-target and where the
    temperatures ended."""
    if not results["runs"]:
        return
    plt = common.pyplot()
    data, methods = results["config"]["data"], list(results["methods"])
    name = f"{results['model']} on {data}"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lm.plot_validation_curves(ax, results["runs"], methods, f"{name}: validation curves (every seed)")
    common.save_figure(fig, out / f"finetune-{lm.label(data)}.png")
    rows = [(m, d["paired_percent"]) for m, d in results["methods"].items() if "paired_percent" in d]
    if rows:
        lm.paired_figure(rows, methods, name, out / f"finetune-{lm.label(data)}-paired.png")
    lm.tokens_to_target_figure(results["methods"], name, out / f"finetune-{lm.label(data)}-tokens-to-target.png")
    lm.temperatures_figure(results["runs"], methods, name, out / f"finetune-{lm.label(data)}-temperatures.png")
