"""Passkey retrieval (Mohtashami & Jaggi, 2023): find a five-digit key hidden in a long run of filler text.

    <intro> <filler x n_before> <The pass key is 12345. Remember it. 12345 is the pass key.> <filler x n_after>
    <What is the pass key? The pass key is>

The prompt is sized to a target length in tokens; ``depth`` in [0, 1] is the fraction of the filler that
comes before the key (0 = right after the intro, 1 = right before the question). The model answers by greedy
decoding; a trial is correct when the first number it writes is the key.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from selective_attention.errors import UserError
from selective_attention.utils.stats import mean_std

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    text: str
    key: str
    n_tokens: int  # length of the tokenised prompt
    key_token: int  # index of the needle's first token in the prompt
    depth: float  # requested depth
    n_before: int  # filler repetitions before the needle
    n_filler: int  # filler repetitions in all


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_prompt(tokenizer, length: int, depth: float, key: str) -> PasskeyPrompt:
    """A prompt of at most ``length`` tokens with the key at ``depth``."""
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"passkey depth must be in [0, 1], got {depth}")
    needle = NEEDLE.format(key=key)
    fixed = _n_tokens(tokenizer, INTRO + needle + QUESTION)
    if length < fixed:
        raise UserError(f"passkey length {length} is too short: the prompt without filler takes {fixed} tokens")
    per_filler = _n_tokens(tokenizer, FILLER * 8) / 8  # BPE merges across repeats: measure on a run of them
    n_filler = max(0, int((length - fixed) / per_filler))

    def build(n: int) -> tuple[str, int]:
        before = round(depth * n)
        return INTRO + FILLER * before + needle + FILLER * (n - before) + QUESTION, before

    text, before = build(n_filler)
    while n_filler > 0 and _n_tokens(tokenizer, text) > length:  # the estimate may overshoot by a repeat or two
        n_filler -= 1
        text, before = build(n_filler)
    prefix = INTRO + FILLER * before
    return PasskeyPrompt(
        text=text,
        key=key,
        n_tokens=_n_tokens(tokenizer, text),
        key_token=_n_tokens(tokenizer, prefix),
        depth=depth,
        n_before=before,
        n_filler=n_filler,
    )


def check_lengths(tokenizer, lengths: Sequence[int]) -> None:
    """UserError unless every length fits the prompt's fixed part (checked before any model time is spent)."""
    for length in lengths:
        make_prompt(tokenizer, int(length), 0.5, "12345")


def extract_answer(generated: str) -> str | None:
    """The first run of digits the model wrote (None if it wrote none)."""
    m = re.search(r"\d+", generated)
    return m.group(0) if m else None


@torch.no_grad()
def _generate(model, tokenizer, text: str, max_new_tokens: int) -> str:
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    ids = ids.to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def passkey(
    model,
    tokenizer,
    lengths: Sequence[int] = (256, 512, 1024),
    depths: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    n_trials: int = 5,
    seed: int = 0,
    max_new_tokens: int = 8,
    progress: bool = False,
) -> dict:
    """Accuracy by context length (tokens) x depth.

    Returns {"table": [{"length", "depth", "accuracy", "n", "mean_tokens"}, ...], "accuracy": overall mean,
    "lengths", "depths", "trials": [{"length", "depth", "key", "answer", "output", "correct", "tokens"}, ...]}.
    """
    lengths = [int(x) for x in lengths]
    depths = [float(d) for d in depths]
    if not lengths or min(lengths) < 1:
        raise UserError(f"passkey lengths must be positive integers, got {lengths}")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise UserError(f"passkey depths must be in [0, 1], got {depths}")
    if n_trials < 1:
        raise UserError(f"passkey trials must be positive, got {n_trials}")

    rng = random.Random(seed)
    was_training = getattr(model, "training", False)
    if hasattr(model, "eval"):
        model.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(lengths) * len(depths) * n_trials, desc="passkey", unit="trial", leave=False)
    trials: list[dict[str, Any]] = []
    table: list[dict[str, Any]] = []
    for length in lengths:
        for depth in depths:
            correct, toks = 0, 0
            for _ in range(n_trials):
                key = str(rng.randint(10000, 99999))
                p = make_prompt(tokenizer, length, depth, key)
                output = _generate(model, tokenizer, p.text, max_new_tokens)
                answer = extract_answer(output)
                ok = answer == key
                correct += ok
                toks += p.n_tokens
                trials.append(
                    {
                        "length": length,
                        "depth": depth,
                        "key": key,
                        "answer": answer,
                        "output": output,
                        "correct": ok,
                        "tokens": p.n_tokens,
                    }
                )
                if bar is not None:
                    bar.update(1)
            table.append(
                {
                    "length": length,
                    "depth": depth,
                    "accuracy": correct / n_trials,
                    "n": n_trials,
                    "mean_tokens": toks / n_trials,
                }
            )
    if bar is not None:
        bar.close()
    if hasattr(model, "train"):
        model.train(was_training)
    return {
        "table": table,
        "accuracy": sum(t["correct"] for t in trials) / len(trials),
        "lengths": lengths,
        "depths": depths,
        "n_trials": n_trials,
        "seed": seed,
        "trials": trials,
    }


@torch.no_grad()
def key_likelihood(
    model,
    tokenizer,
    lengths: Sequence[int],
    depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    n_trials: int = 8,
    seed: int = 0,
) -> dict:
    """Teacher-forced passkey retrieval: a graded measure for models too small to write the key themselves.

    For each trial, the answer " <key>" is scored after the question (mean negative log-likelihood per answer
    token) twice: once when the needle holds that key and once when it holds another key (the control, same depth
    and filler). ``gain`` = control NLL - NLL, in nats per answer token, is what the model takes from the needle:
    ~0 for a model that ignores it, large for one that copies it. Each prompt plus its answer fits in ``length``.

    Returns {"by_length": {str(length): {"gain", "gain_std", "nll", "nll_control", "n"}}, "depths", "n_trials",
    "seed"}.
    """
    lengths = [int(x) for x in lengths]
    if not lengths or min(lengths) < 1:
        raise UserError(f"passkey lengths must be positive integers, got {lengths}")
    if n_trials < 1:
        raise UserError(f"passkey trials must be positive, got {n_trials}")
    rng = random.Random(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def answer_nll(prompt: str, answer: list[int]) -> float:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + answer
        logits = model(input_ids=torch.tensor([ids], device=device)).logits[0, -len(answer) - 1 : -1].float()
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(answer, device=device)))

    by_length = {}
    try:
        for length in lengths:
            gains, nlls, controls = [], [], []
            for depth in depths:
                for _ in range(n_trials):
                    key, other = (str(k) for k in rng.sample(range(10000, 100000), 2))
                    answer = tokenizer(" " + key, add_special_tokens=False)["input_ids"]
                    room = length - len(answer)
                    nll = answer_nll(make_prompt(tokenizer, room, depth, key).text, answer)
                    control = answer_nll(make_prompt(tokenizer, room, depth, other).text, answer)
                    gains.append(control - nll)
                    nlls.append(nll)
                    controls.append(control)
            gain, gain_std = mean_std(gains)
            by_length[str(length)] = {
                "gain": gain,
                "gain_std": gain_std,
                "nll": mean_std(nlls)[0],
                "nll_control": mean_std(controls)[0],
                "n": len(gains),
            }
    finally:
        model.train(was_training)
    return {"by_length": by_length, "depths": [float(d) for d in depths], "n_trials": n_trials, "seed": seed}


def heatmap(result: dict, path, title: str = "Passkey retrieval accuracy"):
    """PNG heatmap: depth (rows) x context length (columns), accuracy in each cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from selective_attention.utils.io import atomic_write

    lengths, depths = result["lengths"], result["depths"]
    acc = np.zeros((len(depths), len(lengths)))
    for row in result["table"]:
        acc[depths.index(row["depth"]), lengths.index(row["length"])] = row["accuracy"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.0 + 0.6 * len(depths)))
    im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    for i in range(len(depths)):
        for j in range(len(lengths)):
            ax.text(j, i, f"{acc[i, j]:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(f"{title} (mean {result['accuracy']:.2f})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return path
