"""The mechanism experiments: each claim is checked from the numbers the experiment itself produces."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from selective_attention.cli import main as ssa_main  # noqa: E402
from selective_attention.errors import UserError  # noqa: E402
from selective_attention.experiments import (  # noqa: E402
    EXPERIMENTS,
    common,
    denoise,
    dilution,
    markov,
    passkey_synthetic,
    run_experiment,
    tinylm,
)
from selective_attention.train import loop  # noqa: E402
from selective_attention.train.loss import lm_loss  # noqa: E402
from selective_attention.utils.stats import row_statistics  # noqa: E402


def check_files(out, results: dict, pngs: list[str]) -> None:
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["experiment"] == results["experiment"]
    assert set(on_disk) >= {"experiment", "config", "seeds", "methods"}
    for method, vals in on_disk["methods"].items():
        for metric in [k for k in vals if not k.endswith("_std")]:
            assert metric + "_std" in vals, (method, metric)
    assert (out / "summary.md").read_text().startswith("# ")
    for png in pngs:
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------- common


def test_aggregate_mean_std_and_overrides():
    per_seed = [{"a": {"x": 1.0}}, {"a": {"x": 3.0}}]
    assert common.aggregate(per_seed)["a"] == pytest.approx({"x": 2.0, "x_std": 2.0**0.5})  # sample std
    assert common.mean_std([4.0]) == (4.0, 0.0)
    kw = common.parse_overrides(["steps=7", "lr=0.5", "out_degrees=1,2,3", "sharing=shared"], markov.Config)
    assert kw == {"steps": 7, "lr": 0.5, "out_degrees": (1, 2, 3), "sharing": "shared"}
    with pytest.raises(UserError):
        common.parse_overrides(["nope=1"], markov.Config)
    with pytest.raises(UserError):
        common.parse_overrides(["steps=abc"], markov.Config)
    assert set(EXPERIMENTS) >= {"markov", "denoise", "dilution", "passkey", "norm"}


def test_markdown_table_marks_metrics_a_method_did_not_measure():
    # the lm experiment mixes pre-training rows (no zero-shot) with fine-tuning rows (zero-shot accuracies)
    table = common.markdown_table(
        {"pre": {"ppl": 10.0, "ppl_std": 1.0}, "ft": {"ppl": 5.0, "acc": 0.5}}, ["ppl", "acc"], digits=2
    )
    lines = table.splitlines()
    assert lines[0] == "| method | ppl | acc |"
    assert lines[2].startswith("| pre | 10") and lines[2].endswith("| - |")
    assert "0.5" in lines[3] and "-" not in lines[3].split("|")[3]


# ---------------------------------------------------------------- markov


def test_markov_graph_rows_and_identity_init():
    cfg = markov.Config()
    P = markov.make_graph(cfg)
    assert torch.allclose(P.sum(1), torch.ones(cfg.vocab, dtype=P.dtype))
    assert [int((r > 0).sum()) for r in P] == list(cfg.out_degrees)
    assert float(P.diagonal().abs().sum()) == 0.0
    torch.manual_seed(0)
    van = markov.MarkovAttention(cfg, ssa=False)
    torch.manual_seed(0)
    ssa = markov.MarkovAttention(cfg, ssa=True)
    (Pv, _), (Ps, ts) = van(), ssa()
    assert torch.allclose(Pv.sum(1), torch.ones(cfg.vocab), atol=1e-5)
    assert torch.allclose(Pv, Ps, atol=1e-6) and torch.equal(ts, torch.ones(cfg.vocab))  # identity at init
    # the attention row is softmax(E W_q (E W_k)^T / sqrt(d)), computed here independently
    logits = (van.E @ van.W_q) @ (van.E @ van.W_k).T / math.sqrt(cfg.d)
    assert torch.allclose(Pv, torch.softmax(logits, -1), atol=1e-5)


def test_markov_claims_from_its_numbers(tmp_path):
    res = run_experiment("markov", tmp_path, seeds=[0], progress=False, steps=400)
    check_files(tmp_path, res, ["graph.png", "transitions.png", "temperature_vs_degree.png", "norm_histogram.png"])
    m = res["methods"]
    assert m["ssa"]["cross_entropy"] < m["vanilla"]["cross_entropy"]
    assert m["ssa"]["l1_error"] < m["vanilla"]["l1_error"]
    assert m["ssa"]["spikiness"] < m["vanilla"]["spikiness"]
    assert m["ssa"]["w_norm"] < m["vanilla"]["w_norm"]
    ex = res["extra"]
    taus = [ex["tau_by_degree"][k] for k in sorted(ex["tau_by_degree"], key=int)]
    assert taus == sorted(taus, reverse=True) and ex["tau_degree_correlation"] < 0  # fewer neighbours: larger tau
    assert ex["tau_gap_equal_degree"] < ex["tau_gap_different_degree"]
    assert all(res["claims"].values())


def test_markov_repeatable(tmp_path):
    a = run_experiment("markov", tmp_path / "a", seeds=[3], progress=False, steps=40)
    on_disk = json.loads((tmp_path / "a" / "results.json").read_text())
    cfg = markov.Config(steps=40)
    P = markov.make_graph(cfg)
    with common.single_thread():  # the same seed again, recomputed from scratch: the same numbers
        again = markov.evaluate(markov.train_one(cfg, P, True, 3)[0], P)
        other = markov.evaluate(markov.train_one(cfg, P, True, 4)[0], P)["metrics"]
    assert on_disk["per_seed"][0]["ssa"] == again["metrics"] and a["extra"]["tau_per_seed"][0] == again["tau"]
    assert other["w_norm"] != a["methods"]["ssa"]["w_norm"]  # another seed: another init


# ---------------------------------------------------------------- denoise


def test_denoise_bayes_estimator_matches_its_closed_form_risk():
    cfg = denoise.Config()
    g = torch.Generator().manual_seed(0)
    tokens, types, mu = denoise.sample(cfg, 20000, g)
    est = denoise.bayes_estimate(cfg, tokens, types)
    prec = torch.tensor([1 / s**2 for s in cfg.noise_sigmas] + [0.0])[types]
    analytic = float((1 / (1 / cfg.prior_sigma**2 + prec.sum(1))).mean())
    assert abs(denoise.mse(est, mu) - analytic) / analytic < 0.03
    # any other weighting is worse: e.g. ignoring the prior (no shrinkage) or averaging everything
    no_shrink = (prec[..., None] * tokens[..., : cfg.d]).sum(1) / prec.sum(1).clamp_min(1e-9)[:, None]
    assert denoise.mse(est, mu) < denoise.mse(no_shrink, mu)


def test_denoise_claims_from_its_numbers(tmp_path):
    res = run_experiment("denoise", tmp_path, seeds=[0], progress=False, steps=300, eval_samples=2048)
    check_files(tmp_path, res, ["denoise.png"])
    m = {k: v["mse"] for k, v in res["methods"].items()}
    assert m["bayes_optimal"] <= m["value_selective"] < m["vanilla"] < m["naive_average"]
    tau = res["extra"]["tau_v_by_type"]
    assert tau["pure noise"] < min(v for k, v in tau.items() if k != "pure noise")  # noise suppressed


# ---------------------------------------------------------------- norm


def test_norm_claims_from_its_numbers(tmp_path):
    res = run_experiment("norm", tmp_path, seeds=[0], progress=False, max_weights=(0.5, 0.9), steps=300)
    check_files(tmp_path, res, ["norm.png"])
    mv, ms = res["methods"]["vanilla"], res["methods"]["ssa"]
    assert max(mv["max_kl"], ms["max_kl"]) <= 2 * res["config"]["tol"]  # both realise the targets
    assert ms["w_norm@0.5"] < mv["w_norm@0.5"] and ms["w_norm@0.9"] < mv["w_norm@0.9"]
    assert mv["w_norm@0.5"] < mv["w_norm@0.9"]
    assert ms["tau_general@0.9"] < ms["tau_specific@0.9"]  # the general token is flattened by its temperature


# ---------------------------------------------------------------- tiny LMs (passkey, dilution)


def test_passkey_batch_format():
    cfg = passkey_synthetic.Config(decoy_rate=0.0)
    g = torch.Generator().manual_seed(0)
    idx, value = passkey_synthetic.make_batch(cfg, 50, 40, g, depth=0.5)
    KEY, QUERY = cfg.n_filler + cfg.n_values, cfg.n_filler + cfg.n_values + 1
    assert idx.shape == (50, 40) and bool((idx[:, -1] == QUERY).all())
    pos = (idx == KEY).float().argmax(1)
    assert bool((idx[torch.arange(50), pos + 1] == value).all()) and bool((pos == round(0.5 * 37)).all())
    assert bool(((value >= cfg.n_filler) & (value < KEY)).all())


def test_passkey_training_loss_is_the_query_position_only():
    """The (inputs, targets) pair fit trains on: the LM loss with -100 targets is the passkey's cross-entropy."""
    cfg = passkey_synthetic.Config(batch_size=8)
    idx, targets = passkey_synthetic.training_pair(cfg, torch.Generator().manual_seed(0))
    again, value = passkey_synthetic.make_batch(cfg, 8, cfg.train_length, torch.Generator().manual_seed(0))
    assert torch.equal(idx, again) and torch.equal(targets[:, -1], value)
    assert bool((targets[:, :-1] == -100).all())
    logits = torch.randn(8, cfg.train_length, passkey_synthetic.vocab_size(cfg), requires_grad=True)
    loss = lm_loss(logits, targets)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[:, -1], value))
    loss.backward()
    assert float(logits.grad[:, :-1].abs().max()) == 0.0  # no gradient from the filler positions


def count_steps(monkeypatch) -> list[int]:
    """Make train.loop.train_step record the step of each call (and still do it)."""
    steps, real = [], loop.train_step

    def counting(*args, step, **kwargs):
        steps.append(step)
        return real(*args, step=step, **kwargs)

    monkeypatch.setattr(loop, "train_step", counting)
    return steps


def test_tinylm_experiments_train_with_the_shared_loop(monkeypatch):
    steps = count_steps(monkeypatch)
    data = torch.randint(0, 256, (5000,))
    cfg = dilution.Config(steps=3, seq_len=16, d=16, n_heads=2, batch_size=2)
    vanilla = dilution.train_one(cfg, "vanilla", 0, data)
    ssa = dilution.train_one(cfg, "ssa", 0, data)
    assert steps == [0, 1, 2] * 2
    # the frozen temperatures of vanilla stay at tau = 1 through fit's optimizer; SSA's move
    inits = []
    for method in ("vanilla", "ssa"):
        common.seed_everything(0)
        inits.append(tinylm.temperature_parameters(tinylm.TinyLM(256, 16, 2, 2, method)))
    trained = [tinylm.temperature_parameters(m) for m in (vanilla, ssa)]
    assert len(trained[0]) == len(inits[0]) > 0
    assert all(torch.equal(a, b) for a, b in zip(trained[0], inits[0]))
    assert any(not torch.equal(a, b) for a, b in zip(trained[1], inits[1]))
    steps.clear()
    passkey_synthetic.train_one(passkey_synthetic.Config(steps=2, batch_size=4, d=16), "ssa", 0)
    assert steps == [0, 1]


@pytest.mark.parametrize("method", ["vanilla", "ssa"])
def test_tinylm_attention_maps_match_the_fused_forward(method):
    torch.manual_seed(0)
    model = tinylm.TinyLM(50, 32, 2, 4, method, rope=True)
    for p in tinylm.temperature_parameters(model):  # non-trivial temperatures for ssa
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 24, 32)
    attn = model.blocks[0].attn
    with torch.no_grad():
        w = tinylm.layer_weights(attn, x)  # (B, H, T, T)
    assert torch.allclose(w.sum(-1), torch.ones(2, 4, 24), atol=1e-5)
    assert float(w.detach().triu(1).abs().max()) == 0.0  # causal
    v = attn._split(attn.v_proj(x), attn.n_kv_heads)
    y = (w @ v).transpose(1, 2).reshape(2, 24, 32)
    assert torch.allclose(attn.o_proj(y), attn(x), atol=1e-5)
    stats = row_statistics(w)
    assert float(stats["spikiness"][0]) == pytest.approx(1.0)  # one visible key: "uniform"
    # the last query sees 24 keys: its statistics are those of its own row (no averaging across positions)
    last = row_statistics(w[..., -1:, :])
    assert float(stats["spikiness"][-1]) == pytest.approx(float(last["spikiness"][0]))


def test_vanilla_tinylm_keeps_tau_one():
    torch.manual_seed(0)
    model = tinylm.TinyLM(50, 32, 1, 2, "vanilla")
    assert not any(p.requires_grad for p in tinylm.temperature_parameters(model))
    taus = model.blocks[0].attn.temperatures(torch.randn(1, 10, 32))
    assert torch.equal(taus["query"], torch.ones_like(taus["query"]))
    ssa = tinylm.TinyLM(50, 32, 1, 2, "ssa")
    assert all(p.requires_grad for p in tinylm.temperature_parameters(ssa))


def test_dilution_and_passkey_run_small(tmp_path):
    res = run_experiment(
        "dilution",
        tmp_path / "d",
        seeds=[0],
        progress=False,
        steps=10,
        seq_len=16,
        d=32,
        n_heads=2,
        eval_sequences=2,
        max_bytes=50_000,
    )
    check_files(tmp_path / "d", res, ["dilution.png"])
    curves = res["extra"]["curves"]["vanilla"]
    assert len(curves["entropy"]) == 64 and curves["entropy"][0] == pytest.approx(0.0, abs=1e-6)
    for method in ("vanilla", "ssa"):
        vals = res["methods"][method]
        assert vals["entropy_beyond"] > vals["entropy_within"]  # more keys visible -> higher entropy
        assert vals["max_weight_beyond"] < vals["max_weight_within"]  # and flatter rows: lower max weight
    res = run_experiment(
        "passkey",
        tmp_path / "p",
        seeds=[0],
        progress=False,
        steps=5,
        n_trials=4,
        depths=(0.2, 0.8),
        length_multipliers=(1, 2),
    )
    check_files(tmp_path / "p", res, ["passkey_heatmap.png"])
    assert set(res["methods"]["ssa"]) >= {"acc@1L_d0.2", "acc@2L_d0.8", "acc@1L", "acc@2L", "accuracy"}
    cfg = passkey_synthetic.Config(steps=5, n_trials=4, depths=(0.2, 0.8), length_multipliers=(1, 2))
    with common.single_thread():  # the same seed again, from scratch: the table results.json reports
        again = passkey_synthetic.accuracy_table(cfg, passkey_synthetic.train_one(cfg, "ssa", 0).eval(), 0)
    assert {k: v for k, v in res["per_seed"][0]["ssa"].items() if k != "accuracy"} == again


# ---------------------------------------------------------------- CLI


def test_cli_runs_and_rejects_bad_settings(tmp_path, capsys):
    out = tmp_path / "n"
    rc = ssa_main(
        [
            "experiment",
            "norm",
            "--out",
            str(out),
            "--seeds",
            "1",
            "--set",
            "max_weights=0.5,0.8",
            "--set",
            "steps=30",
            "--no-progress",
        ]
    )
    assert rc == 0 and json.loads((out / "results.json").read_text())["config"]["max_weights"] == [0.5, 0.8]
    capsys.readouterr()
    assert ssa_main(["experiment", "norm", "--out", str(out), "--set", "bogus=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssa experiment: error: unknown setting") and len(err.splitlines()) == 1
    assert ssa_main(["experiment", "markov", "--out", str(out), "--seeds", "0"]) == 2


# ---------------------------------------------------------------- default-size claims (slow)


@pytest.mark.slow
def test_markov_default_size_all_claims(tmp_path):
    res = run_experiment("markov", tmp_path, progress=False)
    assert all(res["claims"].values()), res["claims"]


@pytest.mark.slow
def test_denoise_default_size_ordering(tmp_path):
    res = run_experiment("denoise", tmp_path, progress=False)
    assert all(res["claims"].values()), res["claims"]


@pytest.mark.slow
def test_norm_default_size(tmp_path):
    res = run_experiment("norm", tmp_path, progress=False)
    assert all(res["claims"].values()), res["claims"]


@pytest.mark.slow
def test_dilution_default_size_ssa_attention_less_diluted(tmp_path):
    res = run_experiment("dilution", tmp_path, progress=False)
    c = res["claims"]
    assert c["vanilla_entropy_grows_beyond_T"] and c["ssa_spikier_beyond_T"] and c["ssa_lower_entropy_beyond_T"]
    assert c["ssa_higher_max_weight_beyond_T"]
    # measured honestly: the sharper rows did NOT give a lower next-byte loss beyond T at this size (summary.md)


@pytest.mark.slow
def test_passkey_default_size_honest_outcome(tmp_path):
    res = run_experiment("passkey", tmp_path, progress=False)
    mv = res["methods"]["vanilla"]
    assert mv["acc@1L"] > 0.8 and res["claims"]["vanilla_degrades_with_length"]  # trained, then diluted
    # the paper's "SSA improves retrieval" did not reproduce reliably here (see summary.md): no assertion on it
    assert set(res["claims"]) == {"ssa_better_overall", "ssa_better_at_longest", "vanilla_degrades_with_length"}
