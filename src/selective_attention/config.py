"""One dataclass configures every SSA temperature (docs/method.md); its flags are ``cli.ssa_flags``."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

Sharing = Literal["shared", "mlp"]
# Fields that older saved configs carry but that were never read: dropped on load.
RETIRED_FIELDS = frozenset({"temperature_lr"})
# The sigmoid parameterisation's fields (c = sigmoid(alpha) - sigmoid(identity_alpha)): mapped on load.
LEGACY_ALPHA_FIELDS = frozenset({"identity_alpha", "scratch_alpha"})
LEGACY_IDENTITY_ALPHA = -4.0
Init = Literal["identity", "scratch"]
SCRATCH_COEFFICIENT = 0.5  # c at the start under init="scratch" unless position_init says otherwise


@dataclass
class SSAConfig:
    """Which temperatures SSA learns and how.

    tau(x, p) = 1 + c * log p  [position_aware]  + tanh(f(x))  [token_aware],  c = position_scale * theta.

    - ``query`` / ``value`` / ``key``: which of q, v, k get a temperature (separate parameters each).
    - ``sharing="shared"``: f_h(x) = u_h . gelu(W^h x) on the layer's own per-head projection (pre-RoPE);
      adds about 2 * d_model + n_heads parameters per layer with the default targets (< 0.5 % of a GPT-2).
      ``sharing="mlp"``: f(x) = W2 gelu(W1 x), an independent MLP with ``mlp_hidden`` units
      (None: sized so that the whole model grows by ``mlp_growth``).
    - ``init="identity"``: exactly the vanilla function at initialisation (u = 0, mirrored MLP, c = 0) while
      every temperature parameter has a non-zero gradient. ``init="scratch"``: a sharper start, c = 0.5.
      ``position_init`` sets the starting c directly (it wins over ``init``'s; the token term starts at 0 always).
    - c is one unconstrained parameter per head, theta = c / ``position_scale``: under Adam a parameter moves by
      about its learning rate per step whatever its gradient, so c moves ``position_scale`` times the temperature
      learning rate per step (10 x 1e-3 x 500 steps: up to ~5), from any start. The older c = sigmoid(alpha) could
      not leave ~[0, 0.03] from the identity start in a whole run (docs/method.md).
    """

    query: bool = True
    value: bool = True
    key: bool = False
    token_aware: bool = True
    position_aware: bool = True
    value_position_aware: bool = False
    sharing: Sharing = "shared"
    init: Init = "identity"
    mlp_hidden: int | None = None
    mlp_growth: float = 0.05
    position_init: float | None = None  # c at the start; None: 0 under "identity", 0.5 under "scratch"
    position_scale: float = 10.0  # c = position_scale * theta: c's step is this many times the temperature lr

    def __post_init__(self) -> None:
        if self.sharing not in ("shared", "mlp"):
            raise ValueError(f"sharing must be 'shared' or 'mlp', got {self.sharing!r}")
        if self.init not in ("identity", "scratch"):
            raise ValueError(f"init must be 'identity' or 'scratch', got {self.init!r}")
        if not (self.query or self.value or self.key):
            raise ValueError("SSAConfig needs at least one of query, value, key")
        if not (self.token_aware or self.position_aware):
            raise ValueError("SSAConfig needs token_aware or position_aware (or both)")
        if self.value and not (self.token_aware or self.has_position_term("value")):
            raise ValueError(
                "the value temperature has no term: it takes the position term only with "
                "value_position_aware=True, so it needs token_aware or that"
            )
        if self.mlp_hidden is not None and (self.mlp_hidden < 2 or self.mlp_hidden % 2):
            raise ValueError(f"mlp_hidden must be an even integer >= 2, got {self.mlp_hidden}")
        if not (0.0 < self.mlp_growth < 1.0):
            raise ValueError(f"mlp_growth must be in (0, 1), got {self.mlp_growth}")
        if self.position_init is not None and not math.isfinite(self.position_init):
            raise ValueError(f"position_init must be finite, got {self.position_init}")
        if not (math.isfinite(self.position_scale) and self.position_scale > 0):
            raise ValueError(f"position_scale must be a positive number, got {self.position_scale}")

    @property
    def start_coefficient(self) -> float:
        """c at initialisation: ``position_init``, else 0 (identity) or 0.5 (scratch)."""
        if self.position_init is not None:
            return float(self.position_init)
        return 0.0 if self.init == "identity" else SCRATCH_COEFFICIENT

    @property
    def targets(self) -> tuple[str, ...]:
        """The projections that carry a temperature, in a fixed order."""
        return tuple(t for t in ("query", "key", "value") if getattr(self, t))

    def has_position_term(self, target: str) -> bool:
        """Whether ``target``'s temperature carries c log p: the value's only with ``value_position_aware``
        (dilution is a property of a query's row; on the value it would just grow later tokens' values)."""
        return self.position_aware and (target != "value" or self.value_position_aware)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SSAConfig:
        d = {k: v for k, v in d.items() if k not in RETIRED_FIELDS}
        d = _map_legacy_alpha(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown SSAConfig fields: {sorted(unknown)}")
        return cls(**d)


def _map_legacy_alpha(d: dict[str, Any]) -> dict[str, Any]:
    """A config of the sigmoid form (identity_alpha / scratch_alpha) as the same starting c in today's form.
    Its saved ``alpha`` tensors are mapped by ``temperature.legacy_alpha_to_coefficient``."""
    legacy = {k: d[k] for k in LEGACY_ALPHA_FIELDS if k in d}
    if not legacy:
        return d
    d = {k: v for k, v in d.items() if k not in LEGACY_ALPHA_FIELDS}
    if legacy.get("identity_alpha", LEGACY_IDENTITY_ALPHA) != LEGACY_IDENTITY_ALPHA:
        raise ValueError(
            f"identity_alpha {legacy['identity_alpha']} (the sigmoid form's offset) cannot be mapped: "
            f"only {LEGACY_IDENTITY_ALPHA} was ever used"
        )
    scratch_alpha = float(legacy.get("scratch_alpha", 0.0))
    if d.get("init", "identity") == "scratch" and scratch_alpha != 0.0 and d.get("position_init") is None:
        d["position_init"] = 1.0 / (1.0 + math.exp(-scratch_alpha))
    return d
