"""The report on synthetic run directories that follow the trainer's contract (metrics.jsonl + run.json)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

import selective_attention
from selective_attention.cli import main
from selective_attention.errors import UserError
from selective_attention.report.builder import (
    broken_images,
    build_report,
    group_runs,
    is_png,
    load_run,
    mean_curve,
    summarise,
)
from selective_attention.utils.stats import first_crossing as tokens_to_reach  # the report's tokens-to-target


def write_run(
    d: Path,
    attention: str,
    seed: int,
    ppls: list[float],
    tokens_per_s: float = 1000.0,
    sharing: str = "shared",
    every: int = 1000,
) -> Path:
    d.mkdir(parents=True)
    lines = []
    for i, p in enumerate(ppls):
        t = (i + 1) * every
        lines.append(
            {
                "step": i + 1,
                "tokens": t,
                "lr": 1e-3,
                "train_loss": math.log(p) + 0.05,
                "tokens_per_s": tokens_per_s,
                "elapsed_s": t / tokens_per_s,
            }
        )
        lines.append({"step": i + 1, "tokens": t, "val_loss": math.log(p), "val_ppl": p})
    (d / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    new = 0 if attention == "vanilla" else 4
    params = {"base": 1000, "new": new, "total": 1000 + new, "percent": new / 10}
    info = {
        "attention": attention,
        "size": "tiny",
        "seed": seed,
        "config": {"attention": attention, "sharing": sharing, "seed": seed},
        "parameters": params,
        "tokens_per_s": tokens_per_s,
        "final_val_loss": math.log(ppls[-1]),
        "final_val_ppl": ppls[-1],
        "tokens": len(ppls) * every,
    }
    (d / "run.json").write_text(json.dumps(info))
    return d


def png_ok(path: Path) -> bool:
    return is_png(path) and path.stat().st_size > 1000


def test_tokens_to_reach_interpolates_and_reports_not_reached():
    t = [1.0, 2.0, 3.0, 4.0]
    p = [100.0, 50.0, 30.0, 20.0]
    import numpy as np

    assert tokens_to_reach(np.array(t), np.array(p), 40.0) == pytest.approx(2.5)
    assert tokens_to_reach(np.array(t), np.array(p), 20.0) == pytest.approx(4.0)
    assert tokens_to_reach(np.array(t), np.array(p), 200.0) == pytest.approx(1.0)
    assert tokens_to_reach(np.array(t), np.array(p), 19.9) is None


def test_mean_curve_interpolates_on_common_range():
    import numpy as np

    a = (np.array([1.0, 2.0, 3.0]), np.array([10.0, 8.0, 6.0]))
    b = (np.array([1.0, 3.0]), np.array([12.0, 8.0]))
    t, p = mean_curve([a, b])
    assert t.tolist() == [1.0, 2.0, 3.0]
    assert p.tolist() == pytest.approx([11.0, 9.0, 7.0])


def test_summary_speedup_mean_std(tmp_path):
    runs = [
        write_run(tmp_path / "v0", "vanilla", 0, [100, 60, 40, 30]),
        write_run(tmp_path / "v1", "vanilla", 1, [100, 60, 40, 32]),
        write_run(tmp_path / "s0", "ssa", 0, [90, 45, 30, 25]),
        write_run(tmp_path / "s1", "ssa", 1, [90, 45, 32, 27]),
        write_run(tmp_path / "m0", "ssa", 0, [120, 100, 80, 70], sharing="mlp"),
    ]
    s = summarise(group_runs([load_run(r) for r in runs]))
    assert s["baseline"] == "vanilla"
    assert set(s["methods"]) == {"vanilla", "ssa", "ssa-mlp"}
    assert s["target_val_ppl"] == pytest.approx(31.0)
    assert s["baseline_tokens_to_target"] == pytest.approx(4000.0)
    ssa = s["methods"]["ssa"]
    assert ssa["final_val_ppl"] == pytest.approx(26.0)
    assert ssa["final_val_ppl_std"] == pytest.approx(math.sqrt(2.0))  # sample std of 25, 27
    # ssa mean curve: 90, 45, 31, 26 -> reaches 31 exactly at 3000 tokens
    assert ssa["tokens_to_target"] == pytest.approx(3000.0)
    assert ssa["speedup"] == pytest.approx(4000.0 / 3000.0)
    assert s["methods"]["ssa-mlp"]["tokens_to_target"] is None
    assert s["methods"]["ssa-mlp"]["speedup"] is None


def test_build_report_writes_html_md_json_and_valid_pngs(tmp_path):
    dirs = [
        write_run(tmp_path / "runs" / f"{a}{i}", a, i, [80 - 10 * k - (5 if a == "ssa" else 0) for k in range(5)])
        for a in ("vanilla", "ssa")
        for i in range(2)
    ]
    out = tmp_path / "rep"
    summary = build_report(dirs, out, title="test report")
    for name in ("report.html", "report.md", "report.json"):
        assert (out / name).is_file()
    html = (out / "report.html").read_text()
    # vanilla reaches its final 40 at 5000 tokens; ssa (45 -> 35 between 4000 and 5000) at 4500: 1.11x
    assert "not reached" not in html and "1.11x" in html
    assert "ssa" in json.loads((out / "report.json").read_text())["methods"]
    srcs, bad = broken_images(out / "report.html")
    assert "figures/val_ppl.png" in srcs and "figures/parameters.png" in srcs and bad == []
    (out / "figures" / "parameters.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    assert broken_images(out / "report.html")[1] == ["figures/parameters.png"]
    # no final/ model: the report says so instead of failing
    assert any("no final/" in n for n in summary["notes"])
    assert summary["methods"]["ssa"]["speedup"] > 1.0


def test_report_cli_and_errors(tmp_path, capsys):
    d0 = write_run(tmp_path / "a", "vanilla", 0, [50, 40, 30])
    d1 = write_run(tmp_path / "b", "ssa", 0, [50, 45, 40])
    assert main(["report", str(d0), str(d1), "--out", str(tmp_path / "r"), "--no-probe"]) == 0
    out = capsys.readouterr().out
    assert "not reached" in out and "vanilla" in out
    assert main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError):
        load_run(tmp_path / "empty")
    bad = write_run(tmp_path / "bad", "ssa", 0, [5.0, 4.0])
    (bad / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UserError, match="line 2"):
        load_run(bad)
    (bad / "metrics.jsonl").write_text('{"step": 1, "tokens": 5, "val_ppl": 3.0}\n{"step": 2, "tok')  # in progress
    assert len(load_run(bad).metrics) == 1


def test_token_axis_labels_are_short():
    from selective_attention.utils.stats import short_count

    assert [short_count(x) for x in (0, 300, 50_000, 125_000, 1.5e6, 2e9)] == ["0", "300", "50k", "125k", "1.5M", "2B"]


# ------------------------------------------------------------------------------------------------ reads JSON only

ALLOWED = {"numpy", "matplotlib"}


def test_report_imports_only_utils_errors_stdlib_numpy_matplotlib(file_imports):
    import sys

    files = sorted((Path(selective_attention.__file__).parent / "report").glob("*.py"))
    assert {f.name for f in files} >= {"builder.py", "viz.py", "load.py", "stats.py", "render.py", "markdown.py"}
    for f in files:
        for m in file_imports(f):
            top = m.split(".")[0]
            if top == "selective_attention":
                assert m.split(".")[1] in ("utils", "errors", "report"), f"report/{f.name} imports {m}"
            else:
                assert top in sys.stdlib_module_names or top in ALLOWED or top == "__future__", (
                    f"report/{f.name} imports {m}"
                )


def probe_json(run: Path, tokens: list[str], tau: list[float], T: int = 8, entropy_scale: float = 1.0) -> dict:
    probe = {
        "format": 1,
        "settings": {},
        "tokens": tokens,
        "n_layers": 2,
        "temperatures": {
            "query": {"mean": tau, "per_layer": [tau, tau]},
            "value": {"mean": [1.0] * len(tau), "per_layer": [[1.0] * len(tau)] * 2},
        },
        "dilution": {
            "position": list(range(1, T + 1)),
            "entropy": [entropy_scale * math.log(p) for p in range(1, T + 1)],
            "max_weight": [1 / p for p in range(1, T + 1)],
            "uniform_entropy": [math.log(p) for p in range(1, T + 1)],
        },
        "notes": [],
    }
    (run / "probe.json").write_text(json.dumps(probe))
    return probe


def test_report_renders_probes_from_probe_json_without_model_code(tmp_path):
    """probe.json -> dilution figure and temperature pictures; the report process never imports model code
    (transformers, hf, data, evaluate, ...)."""
    import subprocess
    import sys

    v = write_run(tmp_path / "v", "vanilla", 0, [50, 40, 30])
    s = write_run(tmp_path / "s", "ssa", 0, [50, 35, 25])
    probe_json(v, [], [], entropy_scale=1.0)
    pv = json.loads((v / "probe.json").read_text())
    pv["temperatures"], pv["tokens"] = None, None
    (v / "probe.json").write_text(json.dumps(pv))
    ps = probe_json(s, ["The", " cat", " sat"], [0.9, 1.7, 1.2], entropy_scale=0.5)
    (s / "probe.json").write_text(json.dumps({**ps, "notes": ["dilution probe failed (X: y)."]}))
    out = tmp_path / "rep"
    code = (
        "import sys, json; from selective_attention.report.builder import build_report; "
        f"s = build_report([{str(v)!r}, {str(s)!r}], {str(out)!r}, title='t'); "
        "bad = [m for m in sys.modules if m.split('.')[0] == 'transformers' or m.split('.')[:2] in "
        "[['selective_attention', x] for x in ('hf', 'data', 'evaluate', 'train', 'experiments')]]; "
        "assert not bad, bad; "
        "print(json.dumps(s['figures']))"
    )
    src = str(Path(selective_attention.__file__).parents[1])
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}, timeout=120
    )
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout)
    assert figures["dilution"] == "figures/dilution.png"
    assert figures["temperatures_ssa"] == "figures/temperatures_ssa.png"
    assert "temperatures_vanilla" not in figures
    html = (out / "report.html").read_text()
    assert [t for t in ("tau=0.9000", "tau=1.7000", "tau=1.2000") if t in html] == [
        "tau=0.9000",
        "tau=1.7000",
        "tau=1.2000",
    ]
    assert "ssa: dilution probe failed (X: y)." in html
    assert "predates the split" in html  # a format-1 probe: the caption says the colours are the total tau
    rep = json.loads((out / "report.json").read_text())
    assert rep["dilution"]["ssa"]["entropy"] == ps["dilution"]["entropy"]
    assert rep["temperatures"]["ssa"] == {
        "tokens": ["The", " cat", " sat"],
        "values": [0.9, 1.7, 1.2],
        "target": "query",
        "layer": "mean",
        "position_term": None,  # a format-1 probe: tau only
        "token_term": None,
    }
    assert broken_images(out / "report.html")[1] == []


def test_report_notes_runs_without_a_probe(tmp_path):
    a = write_run(tmp_path / "a", "vanilla", 0, [50, 40, 30])
    b = write_run(tmp_path / "b", "ssa", 0, [50, 45, 40])
    (b / "final").mkdir()
    s = build_report([a, b], tmp_path / "r")
    assert s["notes"] == [
        "vanilla: no final/ model directory, so no dilution or temperature figure.",
        "ssa: its final/ model has not been probed (no probe.json; `ssa report` probes it), "
        "so no dilution or temperature figure.",
    ]
    assert "dilution" not in s["figures"]
    probe_json(b, ["x"], [1.0])
    assert "dilution" not in build_report([a, b], tmp_path / "r2", probe=False)["figures"]
    (b / "probe.json").write_text("{broken")
    with pytest.raises(UserError, match="probe.json .*not valid JSON.*delete it and run `ssa report`"):
        build_report([a, b], tmp_path / "r3")


# ------------------------------------------------------------------------------------------------ what a newcomer reads

SUMMARY_MD = """# Language-model study (budget demo)

| method | val ppl | vs vanilla, paired [95 % CI] | verdict |
|---|---|---|---|
| vanilla | 235.13 ± 10.65 | - | - |
| ssa | 227.92 ± 3.58 | -3.00 % [-28.77, +22.76] | tie |

- ssa: @512: -3.10 % [-22.72, +16.52] (tie)
"""


def test_a_markdown_section_is_rendered_as_html_not_pasted_raw(tmp_path):
    """An experiment's summary.md in the HTML report: a real table and heading, not Markdown text in a <pre> that
    runs off the page; report.md keeps it verbatim."""
    dirs = [write_run(tmp_path / a, a, 0, [50, 40, 30]) for a in ("vanilla", "ssa")]
    build_report(dirs, tmp_path / "r", markdown_section=SUMMARY_MD)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "<h2>Language-model study (budget demo)</h2>" in html
    assert "<td>-3.00 % [-28.77, +22.76]</td>" in html and "<th>vs vanilla, paired [95 % CI]</th>" in html
    assert "|---" not in html and "| ssa |" not in html and "<pre" not in html
    assert "<li>ssa: @512: -3.10 % [-22.72, +16.52] (tie)</li>" in html
    assert SUMMARY_MD in (tmp_path / "r" / "report.md").read_text()


def probe_json_split(run: Path, tokens: list[str], position: list[float], token: list[float]) -> dict:
    """A format-2 probe.json: tau with its position and token terms apart."""
    tau = [p + k for p, k in zip(position, token)]
    probe = probe_json(run, tokens, tau)
    probe["format"] = 2
    probe["temperatures"]["query"]["position"] = {"mean": position, "per_layer": [position, position]}
    probe["temperatures"]["query"]["token"] = {"mean": token, "per_layer": [token, token]}
    (run / "probe.json").write_text(json.dumps(probe))
    return probe


def _token_colours(fragment: str) -> list[str]:
    return re.findall(r'class="tok" style="background:(rgb\([0-9,]+\))', fragment)


def test_temperatures_shown_once_token_term_on_one_shared_scale_position_term_apart(tmp_path):
    from selective_attention.report.viz import ColourScale

    v = write_run(tmp_path / "v", "vanilla", 0, [50, 40, 30])
    s = write_run(tmp_path / "s", "ssa", 0, [50, 35, 25])
    m = write_run(tmp_path / "m", "ssa", 0, [50, 36, 26], sharing="mlp")
    tokens = ["The", " cat", " sat", " down"]
    # the position term rises along the text; the token term is what the words do (two tokens share a value)
    pos = [1.0, 1.35, 1.55, 1.7]
    probe_json_split(s, tokens, pos, [0.0, 0.3, 0.0, -0.1])
    probe_json_split(m, tokens, [1.0, 1.2, 1.3, 1.4], [0.05, -0.6, 0.05, 0.2])
    summary = build_report([v, s, m], tmp_path / "r", title="t")
    html = (tmp_path / "r" / "report.html").read_text()
    frags = re.findall(r'<div class="temps">.*?</div><div class="legend">.*?</div>', html)
    assert len(frags) == 2  # once per SSA method: no PNG copy beside the inline picture
    assert not re.search(r'<img src="figures/temperatures_', html)
    legends = {re.search(r'<div class="legend">.*?</div>', f).group(0) for f in frags}  # type: ignore[union-attr]
    assert len(legends) == 1 and "token term tanh f(x) -0.600" in legends.pop()  # one scale: |-0.6| the largest
    scale = ColourScale.centred([0.0, 0.3, 0.0, -0.1, 0.05, -0.6, 0.05, 0.2])
    expect = [
        [f"rgb{scale.rgb(x)}".replace(" ", "") for x in row] for row in ([0.0, 0.3, 0.0, -0.1], [0.05, -0.6, 0.05, 0.2])
    ]
    assert [_token_colours(f) for f in frags] == expect
    c = _token_colours(frags[0])
    assert c[0] == c[2]  # equal token terms, equal colours, wherever they sit: the position term is not in them
    assert 'title="token term=+0.3000, position term=1.3500, tau=1.6500"' in html
    assert summary["temperatures"]["ssa"]["position_term"] == pos
    assert summary["figures"]["temperature_position"] == "figures/temperature_position.png"
    assert '<img src="figures/temperature_position.png"' in html and "predates the split" not in html
    assert broken_images(tmp_path / "r" / "report.html")[1] == []
    md = (tmp_path / "r" / "report.md").read_text()
    assert md.count("(figures/temperatures_ssa.png)") == 1 and md.count("(figures/temperatures_ssa-mlp.png)") == 1
    assert png_ok(tmp_path / "r" / "figures" / "temperatures_ssa-mlp.png")


def test_an_old_probe_without_the_split_renders_tau_and_says_so(tmp_path):
    v = write_run(tmp_path / "v", "vanilla", 0, [50, 40, 30])
    s = write_run(tmp_path / "s", "ssa", 0, [50, 35, 25])
    probe_json(s, ["The", " cat", " sat"], [0.9, 1.7, 1.2])  # format 1: tau only
    summary = build_report([v, s], tmp_path / "r")
    html = (tmp_path / "r" / "report.html").read_text()
    assert html.count('<div class="temps">') == 1 and 'title="tau=1.7000"' in html
    assert "ssa: Colours: the total tau = 1 + c log p + tanh f(x)" in html and "predates the split" in html
    assert "temperature_position" not in summary["figures"]


def test_a_tie_is_never_called_a_speed_up(tmp_path):
    """SSA reaches vanilla's final perplexity sooner on the mean curve (ratio 1.07x), but its seeds disagree
    (-16.7 % and +6.3 %): the paired interval holds 0, so the ratio is within noise, not a speed-up."""
    runs = [
        write_run(tmp_path / "v0", "vanilla", 0, [100, 60, 40, 30]),
        write_run(tmp_path / "v1", "vanilla", 1, [100, 60, 40, 32]),
        write_run(tmp_path / "s0", "ssa", 0, [90, 45, 30, 25]),
        write_run(tmp_path / "s1", "ssa", 1, [100, 60, 40, 34]),
    ]
    s = build_report(runs, tmp_path / "r")
    ssa = s["methods"]["ssa"]
    assert ssa["speedup"] == pytest.approx(4000 / (3000 + 4 / 5.5 * 1000))  # mean curve 35 -> 29.5 crosses 31
    p = ssa["paired_val_ppl_percent"]
    assert p["n"] == 2 and p["mean"] == pytest.approx((100 * (25 - 30) / 30 + 100 * (34 - 32) / 32) / 2)
    assert p["verdict"] == "tie" and s["methods"]["vanilla"]["paired_val_ppl_percent"] is None
    from selective_attention.report.render import speedup_sentences, table_rows

    sentence = next(x for x in speedup_sentences(s) if x.startswith("ssa:"))
    assert "tokens-to-target ratio 1.07x" in sentence and "within noise (tie), so not a speed-up" in sentence
    assert "x tokens-to-target speed-up" not in sentence
    assert [r[6] for r in table_rows(s)] == ["1.00x (baseline)", "1.07x (within noise: tie)"]
    html = (tmp_path / "r" / "report.html").read_text()
    assert "1.07x tokens-to-target speed-up" not in html and "1.07x (within noise: tie)" in html


def test_a_speed_up_needs_the_paired_comparison_to_say_better(tmp_path):
    runs = [
        write_run(tmp_path / "v0", "vanilla", 0, [100, 60, 40, 30]),
        write_run(tmp_path / "v1", "vanilla", 1, [100, 60, 40, 32]),
        write_run(tmp_path / "s0", "ssa", 0, [90, 45, 30, 25]),
        write_run(tmp_path / "s1", "ssa", 1, [90, 45, 32, 27]),
        write_run(tmp_path / "o0", "ssa", 0, [90, 45, 30, 25], sharing="mlp"),  # one seed
    ]
    from selective_attention.report.render import speedup_sentences, table_rows

    s = summarise(group_runs([load_run(r) for r in runs]))
    assert s["methods"]["ssa"]["paired_val_ppl_percent"]["verdict"] == "wins"
    sentences = speedup_sentences(s)
    assert sentences[1].endswith(": better, a 1.33x tokens-to-target speed-up.")
    assert "final val ppl -16.67 % vs vanilla (one seed: no interval): not evidence of a speed-up." in sentences[2]
    assert [r[6] for r in table_rows(s)][1:] == ["1.33x (speed-up)", "1.36x (one seed: no interval)"]


def test_an_untrained_token_term_is_not_stretched_into_full_colour(tmp_path):
    """A token term of +-0.001 (a few steps of training) on a scale of at least +-0.05: near white, not the
    darkest red and blue that a scale fitted to the values would give."""
    from selective_attention.report.viz import TOKEN_TERM_FLOOR

    v = write_run(tmp_path / "v", "vanilla", 0, [50, 40, 30])
    s = write_run(tmp_path / "s", "ssa", 0, [50, 35, 25])
    probe_json_split(s, ["a", "b", "c"], [1.0, 1.3, 1.5], [-0.001, 0.0, 0.001])
    build_report([v, s], tmp_path / "r")
    html = (tmp_path / "r" / "report.html").read_text()
    assert f"token term tanh f(x) {-TOKEN_TERM_FLOOR:+.3f}" in html and f"{TOKEN_TERM_FLOOR:+.3f}" in html
    for colour in _token_colours(html):
        r, g, b = (int(x) for x in colour[4:-1].split(","))
        assert min(r, g, b) > 200  # all three tokens close to the white middle
