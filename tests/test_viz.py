"""``ssa viz temperatures`` on a tiny converted model: colours follow the model's own temperatures."""

from __future__ import annotations

import re

import pytest
import torch

from selective_attention.cli import main
from selective_attention.config import SSAConfig
from selective_attention.report.builder import is_png

TEXT = "The committee met in the old library. After a long debate the chair proposed a compromise."


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    import os

    os.environ["HF_HUB_OFFLINE"] = "1"
    from selective_attention.data.tokenizers import build_tokenizer
    from selective_attention.temperature import temperature_modules
    from selective_attention.train.models import build_model

    root = tmp_path_factory.mktemp("viz")
    tok = build_tokenizer(
        "bpe", documents=[TEXT * 3, "The quick brown fox jumps over the lazy dog. " * 4], vocab_size=300
    )
    dirs = {}
    for att in ("ssa", "vanilla"):
        m = build_model("tiny", len(tok), 64, att, SSAConfig(init="scratch"), seed=0)
        with torch.no_grad():  # a trained-looking token term: random read-outs
            for fn in temperature_modules(m):
                if hasattr(fn, "readout"):
                    fn.readout.normal_(std=2.0)
        m.save_pretrained(root / att)
        tok.save_pretrained(root / att)
        dirs[att] = root / att
    return dirs


TITLE = re.compile(r'title="token term=([-+0-9.]+), position term=([0-9.]+), tau=([0-9.]+)"')
BACKGROUND = re.compile(r"background:rgb\((\d+),(\d+),(\d+)\)")


def test_viz_html_colours_every_token_by_its_token_term(tiny_dirs, tmp_path, capsys):
    """The default colour is the token term tanh f(x) on the centred scale; tooltips give all three numbers and
    the two terms add up to the model's own tau."""
    from transformers import AutoTokenizer

    from selective_attention.evaluate.probe import token_temperatures
    from selective_attention.hf import from_pretrained, model_temperatures
    from selective_attention.report.viz import token_term_scale

    out = tmp_path / "t.html"
    assert main(["viz", "temperatures", "--model", str(tiny_dirs["ssa"]), "--text", TEXT, "--out", str(out)]) == 0
    html = out.read_text()
    titles = [tuple(map(float, m)) for m in TITLE.findall(html)]
    tok = AutoTokenizer.from_pretrained(tiny_dirs["ssa"])
    ids = tok(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model = from_pretrained(str(tiny_dirs["ssa"])).eval()
    expect = model_temperatures(model, ids)["query"][:, 0].mean(1).mean(0)  # (T,) mean over layers and heads
    assert len(titles) == ids.shape[1]
    token, position, tau = zip(*titles)
    assert tau == pytest.approx(expect.tolist(), abs=1e-4)
    assert [k + p for k, p in zip(token, position)] == pytest.approx(tau, abs=2e-4)
    assert max(token) - min(token) > 0.1  # the colours actually vary
    probe = token_temperatures(model, tok, TEXT)["temperatures"]["query"]["token"]["mean"]
    scale = token_term_scale(probe)
    assert scale.lo == -scale.hi and scale.diverging
    assert [tuple(map(int, m)) for m in BACKGROUND.findall(html)] == [scale.rgb(v) for v in probe]
    assert "query token term" in capsys.readouterr().out


@pytest.mark.parametrize("term", ["position", "total"])
def test_viz_other_terms_span_their_own_values(tiny_dirs, tmp_path, term):
    """--term position / total colour that row on a scale spanning it (the position term rises along the text)."""
    from transformers import AutoTokenizer

    from selective_attention.evaluate.probe import token_temperatures
    from selective_attention.hf import from_pretrained
    from selective_attention.report.viz import ColourScale

    out = tmp_path / "t.html"
    args = ["viz", "temperatures", "--model", str(tiny_dirs["ssa"]), "--text", TEXT, "--out", str(out)]
    assert main([*args, "--term", term]) == 0
    model = from_pretrained(str(tiny_dirs["ssa"])).eval()
    temps = token_temperatures(model, AutoTokenizer.from_pretrained(tiny_dirs["ssa"]), TEXT)["temperatures"]
    values = temps["query"]["mean"] if term == "total" else temps["query"][term]["mean"]
    scale = ColourScale.spanning(values)
    assert [tuple(map(int, m)) for m in BACKGROUND.findall(out.read_text())] == [scale.rgb(v) for v in values]
    if term == "position":
        assert values == sorted(values) and values[-1] > values[0]  # 1 + c log p, c > 0 from the scratch start


def test_viz_png_per_layer_and_value(tiny_dirs, tmp_path):
    out = tmp_path / "t.png"
    assert (
        main(
            [
                "viz",
                "temperatures",
                "--model",
                str(tiny_dirs["ssa"]),
                "--text",
                TEXT,
                "--out",
                str(out),
                "--layer",
                "-1",
                "--target",
                "value",
            ]
        )
        == 0
    )
    assert is_png(out) and out.stat().st_size > 5000


def test_viz_errors(tiny_dirs, tmp_path):
    ssa, van = str(tiny_dirs["ssa"]), str(tiny_dirs["vanilla"])
    assert main(["viz", "temperatures", "--model", ssa, "--out", str(tmp_path / "x.jpg")]) == 2
    assert main(["viz", "temperatures", "--model", ssa, "--out", str(tmp_path / "x.png"), "--layer", "7"]) == 2
    assert main(["viz", "temperatures", "--model", ssa, "--out", str(tmp_path / "x.png"), "--layer", "top"]) == 2
    assert main(["viz", "temperatures", "--model", van, "--out", str(tmp_path / "x.png")]) == 2
    assert main(["viz", "temperatures", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "x.png")]) == 2
    assert not list(tmp_path.glob("x.*"))


def test_viz_renders_a_probe_json_without_the_model(tiny_dirs, tmp_path, capsys):
    """`ssa viz --probe` draws the probe's numbers: the same titles as `--model` on the same text."""
    import json
    import shutil

    from selective_attention.evaluate.probe import probe_run

    run = tmp_path / "run"
    shutil.copytree(tiny_dirs["ssa"], run / "final")
    probe = probe_run(run, text=TEXT)
    a, b = tmp_path / "a.html", tmp_path / "b.html"
    assert main(["viz", "temperatures", "--probe", str(run), "--out", str(a), "--layer", "1"]) == 0
    assert (
        main(["viz", "temperatures", "--model", str(run / "final"), "--text", TEXT, "--out", str(b), "--layer", "1"])
        == 0
    )
    titles = [float(m[2]) for m in TITLE.findall(a.read_text())]
    assert titles == pytest.approx(probe["temperatures"]["query"]["per_layer"][1], abs=1e-4)
    assert re.findall(r'title="[^"]+"', a.read_text()) == re.findall(r'title="[^"]+"', b.read_text())
    capsys.readouterr()
    assert (
        main(
            [
                "viz",
                "temperatures",
                "--probe",
                str(run / "probe.json"),
                "--text",
                "x",
                "--out",
                str(tmp_path / "c.html"),
            ]
        )
        == 2
    )
    assert "--text and --text-file need --model" in capsys.readouterr().err
    # a format-1 probe (tau only): the token term is refused with a hint, the total still renders
    old = {"query": {k: v for k, v in probe["temperatures"]["query"].items() if k in ("mean", "per_layer")}}
    (run / "probe.json").write_text(json.dumps({**probe, "temperatures": old}))
    capsys.readouterr()
    assert main(["viz", "temperatures", "--probe", str(run), "--out", str(tmp_path / "c.html")]) == 2
    assert "use --term total" in capsys.readouterr().err
    assert main(["viz", "temperatures", "--probe", str(run), "--out", str(a), "--term", "total"]) == 0
    assert re.findall(r'title="tau=([0-9.]+)"', a.read_text())
    (run / "probe.json").write_text(json.dumps({**probe, "temperatures": None}))
    assert main(["viz", "temperatures", "--probe", str(run), "--out", str(tmp_path / "c.html")]) == 2
    assert main(["viz", "temperatures", "--probe", str(tmp_path / "nope"), "--out", str(tmp_path / "c.html")]) == 2
    assert not (tmp_path / "c.html").exists()
