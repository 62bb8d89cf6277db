"""The `ssa` entry point: usage errors are one line with exit 2, never a traceback."""

import pytest

from selective_attention.cli import COMMANDS, main


@pytest.mark.parametrize("argv", [["nope"], ["train", "--frobnicate"], ["bench", "attention", "--repeats", "x"]])
def test_usage_errors_are_one_line(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and "error:" in err and "Traceback" not in err


def test_every_command_has_help(capsys):
    for name in COMMANDS:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: ssa" in capsys.readouterr().out
