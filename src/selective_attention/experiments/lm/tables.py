"""The LM study's summary.md: per corpus the perplexity table with paired intervals, perplexity by length, where
the temperatures ended, vanilla's plateau check and the dilution / passkey table (the fine-tuning studies reuse
its parts)."""

from __future__ import annotations

from typing import Any

from selective_attention.train.temperatures import NOT_MOVED_FRACTION
from selective_attention.utils.stats import ratio_claim


def _fmt_interval(p: dict[str, Any] | None, unit: str = " %", digits: int = 2) -> str:
    if not p:
        return "-"
    if p["low"] is None:
        return f"{p['mean']:+.{digits}f}{unit} (1 seed)"
    return f"{p['mean']:+.{digits}f}{unit} [{p['low']:+.{digits}f}, {p['high']:+.{digits}f}]"


def tokens_to_target_cell(d: dict[str, Any]) -> str:
    """A row's tokens-to-target: vanilla's tokens / the row's, or how many seeds never reached vanilla's ppl."""
    sp = d.get("speedup")
    if sp is None:
        return f"not reached ({d['speedup_reached']} seeds)"
    return f"{sp:.2f}x ({ratio_claim(sp, d.get('paired_percent'))})"  # a tie is never called a speed-up


def _direction(p: dict[str, Any], below: str, above: str) -> str:
    """The paired interval's claim in words: ``below`` / ``above`` when it excludes zero on that side, else tie."""
    if p["low"] is None:
        return p["verdict"]
    return below if p["high"] < 0 else above if p["low"] > 0 else "tie"


def _mechanism_lines(methods: dict[str, Any], train_length: int) -> list[str]:
    """Dilution (attention entropy / max weight within and beyond the training length) and passkey retrieval."""
    if not any("dilution" in d or "passkey_gain" in d for d in methods.values()):
        return []
    lengths = next((list(d["passkey_gain"]) for d in methods.values() if "passkey_gain" in d), [])
    caption = f"Dilution (attention over positions <= {train_length} vs beyond)"
    if lengths:  # the passkey columns, and their explanation, only where passkey retrieval was measured
        caption = (
            f"Dilution and passkey retrieval (attention over positions <= {train_length} vs beyond; passkey gain = "
            "how much more likely the key is after the question when the needle holds it than when it holds "
            "another key, nats per answer token, 5 depths)"
        )
    lines = [
        caption + ":",
        "",
        "| "
        + " | ".join(
            [
                "method",
                "entropy within / beyond",
                "max weight within / beyond",
                "entropy beyond vs vanilla, paired",
                *(f"passkey gain @{L}" for L in lengths),
                *([f"passkey gain @{lengths[-1]} vs vanilla, paired"] if lengths else []),
            ]
        )
        + " |",
        "|---" * (4 + len(lengths) + bool(lengths)) + "|",
    ]
    for m, d in methods.items():
        dil = d.get("dilution")
        cells = [m] + [
            f"{dil[f'{k}_within']:.3f} / " + (f"{dil[f'{k}_beyond']:.3f}" if f"{k}_beyond" in dil else "-")
            if dil
            else "-"
            for k in ("entropy", "max_weight")
        ]
        pe = d.get("paired_entropy_beyond")
        cells.append(f"{_fmt_interval(pe, ' nats', 3)}: {_direction(pe, 'sharper', 'flatter')}" if pe else "-")
        gains = d.get("passkey_gain", {})
        cells += [f"{gains[L]:+.3f}" if L in gains else "-" for L in lengths]
        if lengths:
            pg = d.get("paired_passkey_gain", {}).get(lengths[-1])
            cells.append(f"{_fmt_interval(pg, '', 3)}: {_direction(pg, 'less', 'more')}" if pg else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _length_basis(results: dict[str, Any], corpus: str) -> str:
    """What the by-length columns were measured on: the documents' length distribution and windows per length."""
    rec = next((r for r in results["runs"] if r["corpus"] == corpus), None)
    if rec is None:
        return ""
    docs = rec["length_documents"]
    wins = rec.get("windows_by_length") or {}
    return (
        f"Perplexity by length: windows inside one document of {results['config']['length_corpus']} val "
        f"({docs['documents']} documents of {docs['min']:,.0f} / {docs['median']:,.0f} / {docs['max']:,.0f} "
        "tokens min / median / max)"
        + ("; windows per length: " + ", ".join(f"{L}: {n}" for L, n in wins.items()) if wins else "")
        + "."
    )


def _along_lines(methods: dict[str, Any]) -> list[str]:
    """The paired difference to vanilla part-way through training (``stats.gap_along_training``) and at the end."""
    rows = [(m, d) for m, d in methods.items() if d.get("paired_percent_along")]
    if not rows:
        return []
    fractions = list(rows[0][1]["paired_percent_along"])
    lines = [
        "",
        "Paired change of validation perplexity vs vanilla along training (at a fraction of the training tokens, "
        "both curves interpolated there; mean over seeds [95 % CI]):",
        "",
        "| row | " + " | ".join(f"at {float(f):.0%}" for f in fractions) + " | at the end |",
        "|---" * (2 + len(fractions)) + "|",
    ]
    for m, d in rows:
        along = d["paired_percent_along"]
        cells = [_fmt_interval(along.get(f)) for f in fractions] + [_fmt_interval(d.get("paired_percent"))]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def _flip_cell(flip: dict[str, Any] | None) -> str:
    return f" {flip['heads']} of {flip['of']} |" if flip else " - |"


def temperature_lines(methods: dict[str, Any]) -> list[str]:
    """The table of where each row's temperatures ended (``stats.temperature_row``); [] when no row has any."""
    rows = [(m, d["temperatures"]) for m, d in methods.items() if d.get("temperatures")]
    if not rows:
        return []
    flip_length = next((t["c_sign_flipped"]["length"] for _, t in rows if t.get("c_sign_flipped")), None)
    lines = [
        "",
        "Where the temperatures ended (c over seeds, layers and heads; reach = how far c could move under "
        "the schedule, position_scale x the sum of the temperature learning rates (the official form: the farthest "
        "exp(-exp(beta)) with beta moved by that sum); token spread = std over "
        "tokens of the token term at a position, mean over layers; moved = some temperature parameter changed by at "
        f"least {NOT_MOVED_FRACTION:.0%} of the sum of its learning rates, about the most AdamW lets it move"
        + (
            f"; 1 + c log {flip_length} < 0: heads (over seeds and layers) whose position term alone turns the "
            "query's sign before the window ends - their rows flatten to uniform at p = exp(1 / |c|), then invert"
            if flip_length
            else ""
        )
        + "):",
        "",
        "| row | temperature lr | c start | c reach | c at end: mean [min, max] | token spread q / v | moved |"
        + (f" heads with 1 + c log {flip_length} < 0 |" if flip_length else ""),
        "|---" * (7 + bool(flip_length)) + "|",
    ]
    for m, t in rows:
        c = t["c_end"]
        sp = t["token_spread"]
        lines.append(
            f"| {m} | {t['lr']:.3g} | "
            + ("-" if t["c_start"] is None else f"{t['c_start']:.3g}")
            + " | "
            + ("-" if t["c_reach"] is None else f"{t['c_reach']:.3g}")
            + " | "
            + (f"{c['mean']:.3f} [{c['min']:.3f}, {c['max']:.3f}]" if c else "-")
            + " | "
            + (f"{sp.get('query', 0):.3f} / {sp.get('value', 0):.3f}" if sp else "-")
            + " | "
            + ("yes" if t["moved"] else f"**no: every parameter moved < {NOT_MOVED_FRACTION:.0%} of its reach**")
            + " |"
            + (_flip_cell(t.get("c_sign_flipped")) if flip_length else "")
        )
    return lines


def summary(results: dict[str, Any]) -> str:
    """summary.md of the results (``results.collect``)."""
    cfg = results["config"]
    lines = [
        f"# Language-model study (budget {cfg['budget']}: {cfg['size']}, seq {cfg['seq_len']}, "
        f"{cfg['max_tokens']:,} tokens per run, seeds {results['seeds']})",
        "",
    ]
    if cfg.get("packing") == "documents":
        lines += [
            "Packed documents: every window is trained and validated with attention and positions (RoPE, SSA's p, "
            "every position-dependent rule) restarting at each document; no context crosses a document boundary.",
            "",
        ]
    if results["pending"]:
        lines += [
            f"**Incomplete**: {len(results['pending'])} run(s) still to train or evaluate "
            f"(rerun the same command): {', '.join(results['pending'])}",
            "",
        ]
    if results.get("choice"):
        ch = results["choice"]
        lines += [
            f"**Choice** ({ch['rule']}; {'final' if results['complete'] else 'provisional: runs pending'}): "
            f"`{ch['method']}`, {_fmt_interval(ch['paired_percent'])} vs vanilla"
            + (f", tied with {', '.join(ch['tied_with'])}" if ch["tied_with"] else ""),
            "",
        ]
    lines += _confirmation_lines(results.get("confirmation"), not results["pending"])
    for corpus, c in results["corpora"].items():
        methods = c["methods"]
        lengths = list(next(iter(methods.values()))["ppl_by_length"])
        lines += [
            f"## {corpus} (unigram perplexity floor {c['unigram_ppl']:.1f})",
            "",
            "| method | new params | val ppl | per seed | vs vanilla, paired [95 % CI] | verdict | "
            "tokens to vanilla's ppl, vanilla / method | equal wall-clock vs vanilla | tokens/s | "
            + " | ".join(f"ppl @{L}" for L in lengths)
            + " |",
            "|---" * (9 + len(lengths)) + "|",
        ]
        for m, d in methods.items():
            pp = d.get("paired_percent")
            cells = [
                m,
                f"{d['new_parameters']:,} ({d['parameter_percent']:.2f} %)",
                f"{d['val_ppl']:.2f} ± {d['val_ppl_std']:.2f}",
                " / ".join(f"{v:.2f}" for v in d["val_ppl_per_seed"]),
                _fmt_interval(pp),
                pp["verdict"] if pp else "-",
                "-" if m == "vanilla" else tokens_to_target_cell(d),
                _fmt_interval(d.get("paired_percent_equal_time")),
                f"{d['tokens_per_s']:,.0f}",
            ]
            cells += [f"{d['ppl_by_length'][L]:.2f}" for L in lengths]
            lines.append("| " + " | ".join(cells) + " |")
        rates = [d["tokens_per_s"] for d in methods.values()]
        if max(rates) > 1.25 * min(rates):  # beyond what SSA's overhead explains: the machine's load changed
            lines += [
                "",
                f"Tokens/s ranged {min(rates):,.0f}-{max(rates):,.0f} over the rows: the runs shared the machine "
                "with other jobs, so the tokens/s and equal wall-clock columns measure the load, not the methods' "
                "cost (`ssa bench train` prints SSA / vanilla step time measured in one process).",
            ]
        lines += ["", _length_basis(results, corpus)]
        lines += ["", "Paired change of perplexity vs vanilla by evaluation length (95 % CI):", ""]
        for m, d in methods.items():
            if m != "vanilla" and "paired_percent_by_length" in d:
                lines.append(
                    f"- {m}: "
                    + "; ".join(
                        f"@{L}: {_fmt_interval(p)} ({p['verdict']})" for L, p in d["paired_percent_by_length"].items()
                    )
                )
        lines += _along_lines(methods)
        lines += temperature_lines(methods)
        late = methods.get("vanilla", {}).get("late_improvement_percent")
        if late is not None:
            lines += [
                "",
                f"Vanilla's validation perplexity fell {late:.1f} % over its last 20 % of tokens (mean over "
                f"seeds; a plateau would be < 2 %{': it has not plateaued' if late >= 2 else ''}).",
            ]
        lines.append("")
        lines += _mechanism_lines(methods, cfg["seq_len"])
    lines += _contrast_lines(results.get("contrasts"))
    lines += _across_packing_lines(results.get("across_packings"))
    return "\n".join(lines)


def _confirmation_lines(conf: dict[str, Any] | None, complete: bool) -> list[str]:
    """The confirmation's pre-registered reading (``stats.confirmation``): pooled and per-corpus paired intervals."""
    if not conf or not conf["rows"]:
        return []
    chosen = conf["rows"].get(conf["chosen"])
    verdict = {
        "confirmed": "**confirmed**",
        "tie": "**not confirmed: a tie**",
        "loses": "**not confirmed: it loses**",
        "incomplete": "no verdict yet (a corpus has no pair)",
    }[conf["verdict"]]
    lines = [
        f"**Confirmation** (pre-registered: the paired difference of val ppl to vanilla pooled over every corpus's "
        f"seeds; confirmed when its 95 % interval lies below zero and the mean is below zero on each corpus; "
        f"{'final' if complete else 'provisional: runs pending'}): `{conf['chosen']}` "
        + (f"{_fmt_interval(chosen['pooled_percent'])} pooled: " if chosen else "")
        + verdict,
        "",
    ]
    corpora = list(dict.fromkeys(c for row in conf["rows"].values() for c in row["per_corpus_percent"]))
    lines += [
        "| row | pooled vs vanilla [95 % CI] | " + " | ".join(corpora) + " |",
        "|---" * (2 + len(corpora)) + "|",
    ]
    for m, row in conf["rows"].items():
        per = row["per_corpus_percent"]
        cells = [m, _fmt_interval(row["pooled_percent"])] + [_fmt_interval(per.get(c)) for c in corpora]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _contrast_lines(contrasts: list[dict[str, Any]] | None) -> list[str]:
    """What each part of SSA does: rows of the search that differ in one part, paired by seed."""
    if not contrasts:
        return []
    lines = [
        "",
        "## What each part does (rows that differ in one part, paired by seed; descriptive, not the choice rule)",
        "",
        "The change of val ppl from the row without the part to the row with it (same initial weights and data "
        "order; below zero, the part helps).",
        "",
        "| part | with | without | seeds | change of val ppl [95 % CI] | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for c in contrasts:
        p = c["percent"]
        lines.append(
            f"| {c['part']} | {c['with']} | {c['without']} | {', '.join(str(k) for k in c['seeds'])} | "
            f"{_fmt_interval(p)} | {_direction(p, 'helps', 'costs')} |"
        )
    return lines


def _across_packing_lines(across: dict[str, Any] | None) -> list[str]:
    """The packed runs against the stitched study's runs of the same row and seed."""
    if not across or not across["rows"]:
        return []
    lines = [
        "",
        f"## Across packings: these packed runs vs the stitched runs of `{across['stitched_from']}` "
        f"({across['corpus']}, same row and seed)",
        "",
        "Each run is validated in its own packing, so a row's own change mixes training and validation; the change "
        "of its gap to vanilla (packed gap minus stitched gap, percentage points, paired by seed) cancels what the "
        "two validations share: below zero, the row gains more than vanilla from documents apart.",
        "",
        "| row | seeds | val ppl, packed vs stitched [95 % CI] | its gap to vanilla, packed minus stitched [95 % CI] |",
        "|---|---|---|---|",
    ]
    for m, row in across["rows"].items():
        own, gap = row["packed_vs_stitched_percent"], row.get("vs_vanilla_change_pp")
        gap_cell = f"{_fmt_interval(gap, ' pp')} ({_direction(gap, 'gains more', 'gains less')})" if gap else "-"
        lines.append(
            f"| {m} | {', '.join(str(k) for k in row['seeds'])} | {_fmt_interval(own)} "
            f"({_direction(own, 'lower packed', 'higher packed')}) | {gap_cell} |"
        )
    return lines
