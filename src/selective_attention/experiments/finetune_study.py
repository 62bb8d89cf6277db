"""``ssa experiment finetune-study``: the paper's own setting on a base of our own - fit SSA onto a pretrained model
and fine-tune it. "I have a pretrained model: should I convert it to SSA before fine-tuning?"

Design (``--budget full``; ``quick`` is a CI-sized check of the machinery):
- the base: a vanilla ``study`` model (the LM study's model, d 192, 4 layers, 512 tokens) pre-trained on ``wiki``
  at the LM study's ``full`` budget (4M tokens, lr 2e-3), once, in ``OUT/base`` (kept and reused);
- fine-tunes of that base on ``sotu`` (State-of-the-Union speeches: another register, long documents), 1M tokens,
  weights at lr 3e-4, same validation tokens for every run; seeds 0-2 vary the fine-tuning data order only;
- rows: ``vanilla`` fine-tuning; ``ssa`` (convert, identity start, temperatures in their own group at 1e-2, the
  official recipe's temperature rate; c moves 1e-2 per step, ``position_scale`` 1 under ``--init-from``);
  ``ssa-temps`` (temperatures only, the base frozen); ``ssa-official`` (the official release's form, one c per
  layer) and ``const`` (a learned constant temperature per head at the same fast rate: fast scalar parameters
  with no token or position awareness, so a gain can be told apart from "more fast parameters");
- measured: validation perplexity, paired per seed against vanilla (95 % Student-t interval; a claim only when it
  excludes zero), tokens-to-target (the tokens a row needs to reach vanilla's final perplexity: the paper's "1.45x
  fewer tokens"), perplexity at equal wall-clock, perplexity by length (1x / 2x / 4x on whole validation
  speeches), where every temperature ended, and zero-shot accuracy (the bundled ARC-Easy / PIQA sets through
  lm-eval) of the base and of every fine-tune, with n and standard errors.

Runs live in ``OUT/base`` and ``OUT/runs/<corpus>/<row>-seed<S>``, ordinary ``ssa train`` run directories that
resume from their checkpoints; rerunning the same command skips what is done and rebuilds the tables from disk.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from selective_attention.errors import UserError
from selective_attention.experiments import common, lm
from selective_attention.utils.io import read_json

if TYPE_CHECKING:
    from selective_attention.train import TrainConfig

DEFAULT_SEEDS = 3
ROWS = ("vanilla", "ssa", "ssa-temps", "ssa-official", "const")
ZERO_SHOT_FILE = "zero_shot.json"


@dataclass
class Config:
    budget: str = "full"
    size: str = "study"
    vocab_size: int = 2048
    seq_len: int = 512
    batch_size: int = 8
    base_data: str = "wiki"
    base_tokens: int = 4_000_000
    base_lr: float = 2e-3
    base_eval_every: int = 50
    base_seed: int = 0
    data: str = "sotu"
    max_tokens: int = 1_000_000  # fine-tuning tokens per run
    lr: float = 3e-4
    temperature_lr: float = 1e-2
    methods: tuple[str, ...] = ROWS
    eval_every: int = 25
    eval_tokens: int = 65_536
    checkpoint_every: int = 25
    length_multipliers: tuple[int, ...] = (1, 2, 4)
    length_windows: int = 16
    entropy_windows: int = 1
    zero_shot_tasks: tuple[str, ...] = ("arc_easy", "piqa")
    zero_shot_limit: int = 500  # examples per task; 0 = the full set
    split_seed: int = 0


BUDGETS: dict[str, dict[str, Any]] = {
    "quick": {
        "size": "tiny",
        "vocab_size": 512,
        "seq_len": 64,
        "batch_size": 4,
        "base_tokens": 16_384,
        "base_eval_every": 16,
        "max_tokens": 8_192,
        "eval_every": 8,
        "eval_tokens": 4_096,
        "checkpoint_every": 32,
        "length_windows": 2,
        "methods": ("vanilla", "ssa", "const"),
        "zero_shot_tasks": ("arc_easy",),
        "zero_shot_limit": 8,
    },
    "full": {},
}
BUDGET_SEEDS = {"quick": 2, "full": 3}


def row_settings(row: str, config: Config) -> dict[str, Any]:
    """TrainConfig fields of one fine-tuning row (besides the shared ones)."""
    t = {"temperature_lr": config.temperature_lr}
    rows: dict[str, dict[str, Any]] = {
        "vanilla": {"attention": "vanilla"},
        "ssa": {"attention": "ssa", **t},
        "ssa-temps": {"attention": "ssa", "temperatures_only": True, **t},
        "ssa-official": {"attention": "ssa-official", **t},
        "const": {"attention": "const", **t},
    }
    if row not in rows:
        raise UserError(f"unknown row {row!r}; choose from {', '.join(ROWS)}")
    return rows[row]


def _lm_config(config: Config) -> lm.Config:
    """The LM study's evaluation settings for these runs (perplexity by length on the fine-tuning corpus)."""
    return lm.Config(
        budget=config.budget,
        size=config.size,
        vocab_size=config.vocab_size,
        seq_len=config.seq_len,
        batch_size=config.batch_size,
        lr=config.lr,
        max_tokens=config.max_tokens,
        eval_tokens=config.eval_tokens,
        corpora=(config.data,),
        methods=tuple(config.methods),
        length_corpus=config.data,
        length_multipliers=config.length_multipliers,
        length_windows=config.length_windows,
        entropy_windows=config.entropy_windows,
        passkey_trials=0,
        split_seed=config.split_seed,
    )


def base_dir(out: Path) -> Path:
    return out / "base"


def base_config(out: Path, config: Config) -> TrainConfig:
    """The vanilla base, pre-trained from scratch like an LM study run."""
    return common.study_train_config(
        config,
        data=config.base_data,
        out=base_dir(out),
        seed=config.base_seed,
        max_tokens=config.base_tokens,
        lr=config.base_lr,
        eval_every=config.base_eval_every,
        size=config.size,
        vocab_size=config.vocab_size,
        attention="vanilla",
    )


def finetune_config(run: lm.Run, out: Path, config: Config) -> TrainConfig:
    """One fine-tune of the base (its size and tokenizer come with ``init_from``)."""
    return common.study_train_config(
        config,
        data=config.data,
        out=run.path,
        seed=run.seed,
        max_tokens=config.max_tokens,
        lr=config.lr,
        eval_every=config.eval_every,
        init_from=str(base_dir(out) / "final"),
        **row_settings(run.method, config),
    )


def plan(out: Path, config: Config, seeds: list[int]) -> list[lm.Run]:
    """The fine-tunes in training order: seed by seed, every row (so a stopped study holds complete pairs)."""
    return [
        lm.Run(config.data, m, s, out / "runs" / lm.label(config.data) / f"{m}-seed{s}")
        for s in seeds
        for m in config.methods
    ]


def zero_shot_of(model_dir: Path, config: Config) -> dict[str, Any]:
    """Zero-shot accuracy of a saved model, {task: {acc, n, stderr}} (cached in the directory's parent)."""

    def measure() -> dict[str, Any]:
        if not config.zero_shot_tasks:
            return {"zero_shot": {}}
        from transformers import AutoTokenizer

        from selective_attention.methods import load_model

        model, tok = load_model(model_dir).eval(), AutoTokenizer.from_pretrained(str(model_dir))
        tasks, limit = config.zero_shot_tasks, config.zero_shot_limit
        return {"zero_shot": common.zero_shot_accuracy(model, tok, tasks, limit, max_length=config.seq_len)}

    return common.cached(model_dir.parent / ZERO_SHOT_FILE, _zero_shot_settings(config), measure)["zero_shot"]


def _zero_shot_settings(config: Config) -> dict[str, Any]:
    return {"tasks": list(config.zero_shot_tasks), "limit": config.zero_shot_limit}


def validate(config: Config, seeds: list[int]) -> None:
    if config.budget not in BUDGETS:
        raise UserError(f"unknown budget {config.budget!r}; choose from {', '.join(BUDGETS)}")
    if "vanilla" not in config.methods:
        raise UserError("keep vanilla in methods: every row is compared with vanilla fine-tuning")
    for m in config.methods:
        row_settings(m, config)


@dataclass(frozen=True)
class FinetuneStudy(lm.StudyPlan):
    """The fine-tunes for ``lm.train_all`` (the base is trained before them)."""

    config: Config
    name = "finetune study"

    def plan(self) -> list[lm.Run]:
        return plan(self.out, self.config, list(self.seeds))

    def train_config(self, study_run: lm.Run, progress: bool) -> TrainConfig:
        return finetune_config(study_run, self.out, self.config)

    def evaluate(self, study_run: lm.Run) -> None:
        lm.evaluate_run(study_run, _lm_config(self.config))
        zero_shot_of(study_run.path / "final", self.config)

    def is_evaluated(self, study_run: lm.Run) -> bool:
        zero_shot = common.saved_with(study_run.path / ZERO_SHOT_FILE, _zero_shot_settings(self.config))
        return lm.is_evaluated(study_run, _lm_config(self.config)) and zero_shot is not None


def run(
    out: Path, config: Config, seeds: list[int], progress: bool = True, jobs: int = 1, tables_only: bool = False
) -> dict[str, Any]:
    """Pre-train the base (once, in this process), then fine-tune and evaluate every row and seed (``jobs`` at
    once, as in the LM study), then rebuild the tables from disk."""
    from selective_attention.train import train

    validate(config, seeds)
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    if not tables_only:
        base = base_dir(out)
        if not lm.is_trained(lm.Run(config.base_data, "vanilla", config.base_seed, base)):
            if progress:
                print(f"finetune study ({config.budget}): pre-training the base", file=sys.stderr, flush=True)
            train(base_config(out, config))
        zero_shot_of(base / "final", config)
        lm.train_all(FinetuneStudy(out, config, tuple(seeds)), progress, jobs)
    return common.finish(out, collect(out, config, seeds), _figures, summary)


def _unigram_ppl(out: Path, config: Config) -> float | None:
    """The add-one unigram perplexity of the fine-tuning corpus under the base's tokenizer (the floor to beat)."""
    from selective_attention.data.tokens import prepare

    final = base_dir(out) / "final"
    if not (final / "config.json").is_file():
        return None
    data = prepare(
        config.data, "pretrained", config.vocab_size, str(final), config.split_seed, None, splits=("train", "val")
    )
    return lm.unigram_floor(data, config.eval_tokens)


def _saved_zero_shot(run_dir: Path) -> dict[str, Any] | None:
    """The zero-shot accuracy saved in a run directory (None before it is measured)."""
    path = run_dir / ZERO_SHOT_FILE
    return read_json(path, "a saved zero-shot evaluation")["zero_shot"] if path.is_file() else None


def collect(out: Path, config: Config, seeds: list[int]) -> dict[str, Any]:
    runs = plan(out, config, seeds)
    records = []
    for r in runs:
        rec = lm.run_record(r, config.seq_len)
        if rec is not None:
            rec["zero_shot"] = _saved_zero_shot(r.path)
            records.append(rec)
    methods = lm.aggregate(records, config.data) if records else {}
    for m, d in methods.items():
        d["zero_shot"] = common.pooled_zero_shot([r for r in records if r["method"] == m])
    base: dict[str, Any] = {}
    base_run = base_dir(out) / "run.json"
    if base_run.is_file():
        info = read_json(base_run, "the base's run.json")
        base = {
            "dir": str(base_dir(out)),
            "data": config.base_data,
            "tokens": info["tokens"],
            "val_ppl_own_corpus": info["final_val_ppl"],
            "zero_shot": _saved_zero_shot(base_dir(out)),
        }
    done = {(r["method"], r["seed"]) for r in records}
    pending = [f"{r.method}-seed{r.seed}" for r in runs if (r.method, r.seed) not in done]
    cfg = {**dataclasses.asdict(config), "length_corpus": config.data}
    corpora = {config.data: {"methods": methods, "unigram_ppl": _unigram_ppl(out, config)}} if methods else {}
    return {
        "experiment": "finetune-study",
        "config": cfg,
        "seeds": list(seeds),
        "base": base,
        "methods": methods,
        "corpora": corpora,
        "runs": records,
        "pending": pending,
        "complete": not pending and bool(base),
    }


# ------------------------------------------------------------------------------------------------- output


def _zero_shot_lines(results: dict[str, Any]) -> list[str]:
    tasks = list(results["config"]["zero_shot_tasks"])
    rows = [("base (before fine-tuning)", (results.get("base") or {}).get("zero_shot"))]
    rows += [(m, d.get("zero_shot")) for m, d in results["methods"].items()]
    if not tasks or not any(zs for _, zs in rows):
        return []
    lines = [
        "",
        "Zero-shot accuracy (lm-eval, the bundled sets; mean over seeds: acc ± binomial se over the n examples "
        "every seed answered):",
        "",
        "| model | " + " | ".join(tasks) + " |",
        "|---" * (1 + len(tasks)) + "|",
    ]
    for name, zs in rows:
        cells = [
            f"{zs[t]['acc']:.3f} ± {zs[t]['stderr']:.3f} ({zs[t]['n']})"
            if zs and t in zs and zs[t]["stderr"] is not None
            else "-"
            for t in tasks
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def summary(results: dict[str, Any]) -> str:
    cfg, base = results["config"], results.get("base") or {}
    lines = [
        f"# Fine-tuning study (budget {cfg['budget']}): a vanilla `{cfg['size']}` base pre-trained on "
        f"{cfg['base_data']} ({cfg['base_tokens']:,} tokens), fine-tuned on {cfg['data']} for "
        f"{cfg['max_tokens']:,} tokens at lr {cfg['lr']:g} (temperatures {cfg['temperature_lr']:g}), "
        f"seeds {results['seeds']}",
        "",
    ]
    if base:
        lines += [f"Base: val ppl {base['val_ppl_own_corpus']:.2f} on its own corpus ({base['data']}).", ""]
    body = lm.summary({**results, "config": {**cfg, "budget": cfg["budget"]}})
    lines += body.split("\n")[2:]  # the LM study's tables without its title line
    lines += _zero_shot_lines(results)
    return "\n".join(lines)


def _figures(out: Path, results: dict[str, Any]) -> None:
    lm.write_figures(out, results)
    for corpus, c in results["corpora"].items():
        lm.tokens_to_target_figure(c["methods"], corpus, out / f"finetune-{lm.label(corpus)}-tokens-to-target.png")
