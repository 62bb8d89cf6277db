"""``ssa experiment lm --budget quick|default|full|search|confirm|packed|confirm-packed``: does SSA make a better
language model? A resumable study. ``search`` is the pre-registered configuration search (``SEARCH``) and
``confirm`` trains its choice (``--set chosen=LABEL``) at the full budget on seeds it was not chosen on; ``packed``
and ``confirm-packed`` train the search's and the confirmation's wiki runs again with documents apart, paired with
them seed by seed (``--set stitched_from=OUT``).

Design (the ``full`` budget; ``default`` is its one-hour subset, ``quick`` a CI-sized check of the machinery):
- model ``study``: a Llama-style body-heavy model (d 192, 4 layers, 6 heads, ffn 512) with a 2,048-token BPE
  trained on the corpus, so the attention/MLP body holds ~82 % of the parameters (the ``tiny`` model of the old
  table was ~70 % embedding); sequence length 512;
- corpora: ``wiki`` (Wikipedia lead paragraphs) and ``sotu`` (State-of-the-Union speeches, long documents);
  vanilla vs SSA on both, every baseline on the first corpus;
- methods: vanilla; SSA (shared, query + value, the default); SSA mlp (~5 % parameters); SSA position-only (the
  official code's form: c log p on the query); Scalable-Softmax; Llama-4 attention temperature tuning; gated
  attention (a per-head sigmoid gate on the attention output). Same initial weights, same data order per seed;
- every final model is also evaluated at 1x, 2x and 4x its training length on long documents (``length_corpus``
  validation split, each window inside one document): perplexity by length, loss by position, and the
  attention entropy by position at 4x.

Runs live in ``OUT/runs/<corpus>/<method>-seed<S>/`` (ordinary ``ssa train`` run directories, checkpointed every
``checkpoint_every`` steps). Rerunning the same command skips finished runs, resumes unfinished ones exactly and
rebuilds every table from what is on disk, so the study can be run over several sittings.

Statistics: mean +- sample std over seeds; the paired difference to vanilla per seed (same seed = same initial
weights and data order) with a 95 % Student-t interval; a method wins (loses) only when that interval lies
entirely below (above) zero. Tokens-to-target: the tokens a method needs to reach vanilla's final validation
perplexity (same seed). Equal wall-clock: a method's validation perplexity after vanilla's training time,
interpolated on its own curve (its learning rate has then not decayed yet, which favours vanilla).

The package, by concern: ``config`` (Config, the budgets, the search grid, each row's TrainConfig fields),
``runs`` (Run, the plan, a run's TrainConfig), ``scheduler`` (training the plan, ``--jobs`` worker processes),
``evaluation`` (by length, entropy, passkey: EVAL_FILE), ``stats`` (aggregates, paired intervals, the choice rule),
``results`` (results.json from disk), ``tables`` (summary.md) and ``figures``; this module runs the study and
re-exports the names the fine-tuning studies and the tests use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from selective_attention.errors import UserError
from selective_attention.experiments import common
from selective_attention.experiments.lm.config import (
    BUDGET_SEEDS,
    BUDGETS,
    CHOSEN,
    CONFIRM_ROWS,
    DEFAULT_SEEDS,
    DEMO_SSA,
    METHODS,
    PAIRING_FIELDS,
    PRIMARY,
    SEARCH,
    SEARCH_CONTRASTS,
    SEARCH_LR_FACTORS,
    SEARCH_STARTS,
    TIE_MARGIN,
    Config,
    corpus_offset,
    corpus_rows,
    method_settings,
    validate,
)
from selective_attention.experiments.lm.evaluation import (
    EVAL_FILE,
    eval_settings,
    evaluate_run,
    is_evaluated,
    load_final,
    unigram_ppl,
)
from selective_attention.experiments.lm.figures import (
    layer_coefficients,
    log_binned,
    paired_figure,
    plot_validation_curves,
    temperatures_figure,
    tokens_to_target_figure,
    write_figures,
)
from selective_attention.experiments.lm.results import collect, run_record, validation_curve
from selective_attention.experiments.lm.runs import Run, is_trained, label, plan, train_config
from selective_attention.experiments.lm.scheduler import LMStudy, Study, StudyPlan, train_all, train_and_evaluate
from selective_attention.experiments.lm.stats import (
    across_packings,
    aggregate,
    choose,
    confirmation,
    contrasts,
    dilution,
    gap_along_training,
    late_improvement,
    ppl_at_tokens,
    temperature_row,
    tokens_to_reach,
    tokens_to_target,
    unigram_floor,
)
from selective_attention.experiments.lm.tables import summary, temperature_lines, tokens_to_target_cell

__all__ = [
    "BUDGETS",
    "BUDGET_SEEDS",
    "CHOSEN",
    "CONFIRM_ROWS",
    "DEFAULT_SEEDS",
    "EVAL_FILE",
    "METHODS",
    "PAIRING_FIELDS",
    "PRIMARY",
    "DEMO_SSA",
    "SEARCH",
    "SEARCH_CONTRASTS",
    "SEARCH_LR_FACTORS",
    "SEARCH_STARTS",
    "TIE_MARGIN",
    "Config",
    "Run",
    "across_packings",
    "aggregate",
    "choose",
    "collect",
    "confirmation",
    "contrasts",
    "corpus_offset",
    "corpus_rows",
    "dilution",
    "eval_settings",
    "gap_along_training",
    "evaluate_run",
    "is_evaluated",
    "is_trained",
    "label",
    "late_improvement",
    "layer_coefficients",
    "load_final",
    "log_binned",
    "method_settings",
    "paired_figure",
    "plan",
    "plot_validation_curves",
    "ppl_at_tokens",
    "run",
    "run_record",
    "summary",
    "temperature_lines",
    "temperature_row",
    "temperatures_figure",
    "tokens_to_reach",
    "tokens_to_target",
    "tokens_to_target_cell",
    "tokens_to_target_figure",
    "LMStudy",
    "Study",
    "StudyPlan",
    "train_all",
    "train_and_evaluate",
    "train_config",
    "unigram_floor",
    "unigram_ppl",
    "validate",
    "validation_curve",
    "write_figures",
]


def run(
    out: Path, config: Config, seeds: list[int], progress: bool = True, jobs: int = 1, tables_only: bool = False
) -> dict[str, Any]:
    """Train and evaluate every run of the plan, then rebuild the tables. ``jobs`` > 1 trains that many runs at
    once in separate processes, each with its share of the CPU threads (small models train faster as several
    single-threaded processes than as one multi-threaded one). Several invocations of the same command, on one
    machine or several sharing OUT, split the runs the same way: each run directory is locked by its trainer.
    ``tables_only`` trains and evaluates nothing: it rebuilds the tables from the runs finished so far (a study in
    progress can be read while its workers run)."""
    validate(config, seeds)
    if jobs < 1:
        raise UserError("--jobs must be at least 1")
    if not tables_only:
        train_all(LMStudy(out, config, tuple(seeds)), progress, jobs)
    return common.finish(out, collect(out, config, seeds), write_figures, summary)
