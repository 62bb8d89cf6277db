"""The run directory's pieces: the metrics log read through the one JSON-lines reader (a torn last line skipped, a
bad line elsewhere refused), and refusals of ``ssa train`` that offer ``--overwrite`` only where it is accepted."""

from __future__ import annotations

from pathlib import Path

import pytest

from selective_attention.errors import UserError
from selective_attention.train import TrainConfig, train
from selective_attention.train.metrics_log import read_metrics, truncate_metrics

# ---- the metrics log


def test_read_metrics_skips_a_torn_last_line_and_keeps_only_records_with_a_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "train_loss": 2.5}\n'
        "[1, 2]\n"  # JSON, but not a record
        '{"tokens": 3}\n'  # no step
        '{"step": "2"}\n'  # not an integer step
        "\n"
        '{"step": 2, "val_loss": 1.5}\n'
        '{"step": 3, "tra'  # cut short by a kill
    )
    assert read_metrics(path) == [{"step": 1, "train_loss": 2.5}, {"step": 2, "val_loss": 1.5}]
    assert read_metrics(tmp_path / "missing.jsonl") == []


def test_a_bad_line_before_the_last_is_a_damaged_log(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n')
    with pytest.raises(UserError) as e:
        read_metrics(path)
    assert str(e.value) == f"{path}: line 2 is not JSON (the log is damaged): repair or delete that line, then rerun"
    with pytest.raises(UserError, match="line 2 is not JSON"):
        truncate_metrics(path, 3)
    assert path.read_text() == '{"step": 1}\n{"step": 2, "tr\n{"step": 3}\n'  # refused, not rewritten


def test_truncate_metrics_drops_the_lines_after_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a": 3}\n{"step": 4, "a')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n'


def test_read_metrics_is_still_importable_from_rundir():
    from selective_attention.train import rundir

    assert rundir.read_metrics is read_metrics


def test_a_resumed_run_drops_a_torn_metric_line(metrics, cfg, tmp_path):
    cfg.checkpoint_every = 1
    full = train(TrainConfig(**{**cfg.to_dict(), "out": str(tmp_path / "full")}))
    assert train(TrainConfig(**{**cfg.to_dict(), "stop_at_step": 2}))["stopped_at_step"] == 2
    with open(Path(cfg.out) / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "tokens": 3')  # a kill in the middle of a line
    assert train(cfg)["final_val_loss"] == full["final_val_loss"]
    ref = metrics(tmp_path / "full")
    assert [m["step"] for m in metrics(cfg.out)] == [m["step"] for m in ref]
    assert [m.get("val_loss") for m in metrics(cfg.out)] == [m.get("val_loss") for m in ref]


# ---- ssa train offers --overwrite only where it would be accepted


def _refusal(c: TrainConfig) -> str:
    with pytest.raises(UserError) as e:
        train(c)
    return str(e.value)


def _with(c: TrainConfig, **kw) -> TrainConfig:
    return TrainConfig(**{**c.to_dict(), **kw})


@pytest.mark.parametrize("case", ["other settings", "other settings and a file of mine", "no intact checkpoint"])
def test_following_the_overwrite_hint_works(cfg, case):
    out = Path(cfg.out)
    assert train(_with(cfg, stop_at_step=2))["stopped_at_step"] == 2
    mine = out / "notes.txt"
    if case != "other settings":
        mine.write_text("mine")
    if case == "no intact checkpoint":
        for p in (out / "checkpoints").glob("step-*"):
            p.write_bytes(b"garbage")
        again = cfg
    else:
        again = _with(cfg, lr=0.01)
    msg = _refusal(again)
    assert "pass --overwrite to " in msg and "\n" not in msg
    if mine.exists():  # --overwrite alone would be refused: the hint asks to move the file first, naming it
        assert "move away the files that ssa train did not write (notes.txt) and pass --overwrite" in msg
        assert "did not write (notes.txt)" in _refusal(_with(again, overwrite=True))
        mine.unlink()
    else:
        assert "move away" not in msg
    result = train(_with(again, overwrite=True))
    assert result["config"]["lr"] == again.lr and result["steps"] == 4


@pytest.mark.parametrize("content", ["a file of mine", "an unreadable manifest"])
def test_overwrite_is_not_offered_where_it_would_be_refused(cfg, content):
    out = Path(cfg.out)
    out.mkdir(parents=True)
    if content == "a file of mine":
        (out / "notes.txt").write_text("mine")
    else:
        (out / "ssa-run.json").write_text("{not json")
    msg = _refusal(cfg)
    assert "pass --overwrite" not in msg and "--overwrite only replaces a run of ssa train" in msg
    assert "holds no run of ours" in _refusal(_with(cfg, overwrite=True))
    # nothing was written there, nothing removed
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt" if content == "a file of mine" else "ssa-run.json"]
