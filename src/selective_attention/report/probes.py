"""The runs' ``probe.json`` (written by ``selective_attention.evaluate.probe.probe_run``) as report data: dilution
curves and the query temperatures of the sample text, mean over layers and heads.

Probe format 2 records tau's two terms apart, the position term 1 + c log p and the token term tanh f(x); format 1
has only their sum, which the report then shows as it is (and says so).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from selective_attention.errors import UserError
from selective_attention.report.load import RunRecord
from selective_attention.utils.io import read_json

PROBE_FILE = "probe.json"


@dataclass
class Temperatures:
    """One method's query temperatures over the sample text (mean over layers and heads)."""

    tokens: list[str]
    values: list[float]  # tau = position term + token term
    position_term: list[float] | None = None  # 1 + c log p; None for a probe without the split
    token_term: list[float] | None = None  # tanh f(x)

    @property
    def split(self) -> bool:
        return self.position_term is not None and self.token_term is not None

    def as_json(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "values": self.values,
            "target": "query",
            "layer": "mean",
            "position_term": self.position_term,
            "token_term": self.token_term,
        }


@dataclass
class Probes:
    dilution: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    temperatures: dict[str, Temperatures] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def read_probe(run: RunRecord) -> dict[str, Any] | None:
    """RUN/probe.json, or None when there is none; a damaged one is a UserError that says how to redo it."""
    path = run.path / PROBE_FILE
    if not path.is_file():
        return None
    try:
        obj = read_json(path, "a model probe")
    except UserError as e:
        raise UserError(f"{e}; delete it and run `ssa report` to probe again") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: expected a JSON object")
    return obj


def _term(temps: dict[str, Any], name: str) -> list[float] | None:
    term = temps.get("query", {}).get(name)
    return list(term["mean"]) if isinstance(term, dict) and term.get("mean") is not None else None


def collect_probes(groups: dict[str, list[RunRecord]]) -> Probes:
    """Each method's first ``probe.json``: dilution curves and the query temperatures. Runs without one become
    notes (``ssa report`` probes them first)."""
    out = Probes()
    for m, rs in groups.items():
        found = next(((r, p) for r in rs if (p := read_probe(r)) is not None), None)
        if found is None:
            if any((r.path / "final").is_dir() for r in rs):
                out.notes.append(
                    f"{m}: its final/ model has not been probed (no {PROBE_FILE}; `ssa report` "
                    "probes it), so no dilution or temperature figure."
                )
            else:
                out.notes.append(f"{m}: no final/ model directory, so no dilution or temperature figure.")
            continue
        _, probe = found
        out.notes += [f"{m}: {n}" for n in probe.get("notes", [])]
        if probe.get("dilution"):
            out.dilution[m] = probe["dilution"]
        temps = probe.get("temperatures")
        if temps and probe.get("tokens"):
            out.temperatures[m] = Temperatures(
                tokens=list(probe["tokens"]),
                values=list(temps["query"]["mean"]),
                position_term=_term(temps, "position"),
                token_term=_term(temps, "token"),
            )
    return out
