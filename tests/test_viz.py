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


def test_viz_html_colours_every_token_by_its_temperature(tiny_dirs, tmp_path, capsys):
    from transformers import AutoTokenizer

    from selective_attention.hf import from_pretrained, model_temperatures

    out = tmp_path / "t.html"
    assert main(["viz", "temperatures", "--model", str(tiny_dirs["ssa"]), "--text", TEXT, "--out", str(out)]) == 0
    html = out.read_text()
    titles = [float(x) for x in re.findall(r'title="tau=([0-9.]+)"', html)]
    tok = AutoTokenizer.from_pretrained(tiny_dirs["ssa"])
    ids = tok(TEXT, return_tensors="pt", add_special_tokens=False)["input_ids"]
    model = from_pretrained(str(tiny_dirs["ssa"])).eval()
    expect = model_temperatures(model, ids)["query"][:, 0].mean(1).mean(0)  # (T,) mean over layers and heads
    assert len(titles) == ids.shape[1]
    assert titles == pytest.approx(expect.tolist(), abs=1e-4)
    assert max(titles) - min(titles) > 0.1  # the colours actually vary
    assert "tau_query" in capsys.readouterr().out


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
    titles = [float(x) for x in re.findall(r'title="tau=([0-9.]+)"', a.read_text())]
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
    (run / "probe.json").write_text(json.dumps({**probe, "temperatures": None}))
    assert main(["viz", "temperatures", "--probe", str(run), "--out", str(tmp_path / "c.html")]) == 2
    assert main(["viz", "temperatures", "--probe", str(tmp_path / "nope"), "--out", str(tmp_path / "c.html")]) == 2
    assert not (tmp_path / "c.html").exists()
