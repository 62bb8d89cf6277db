"""The temperature functions tau(x, p) (see docs/method.md), and the optimizer-group helper.

    tau(x, p) = 1 + c * log p + tanh(f(x)),    c = position_scale * theta  (one theta per head, ``coefficient``)

theta is unconstrained and starts at ``config.start_coefficient / position_scale`` (0 from the identity start: c is
exactly 0 and dL/dtheta = position_scale * sum(log p * dL/dtau) is not). Models saved with the older sigmoid form
(``alpha``, c = sigmoid(alpha) - sigmoid(-4) from the identity start, sigmoid(alpha) from scratch) load mapped to
the same c (``legacy_alpha_to_coefficient``).

tau is always computed in float32 (float64 for float64 inputs), autocast or not, and returned in that dtype;
``apply_temperature`` multiplies in float32 and casts the product back to the activation dtype once.
Temperature parameters are always fp32 / bf16 / fp16 / fp64: ``.to()`` / ``.type()`` with any other dtype
(integer, quantised, float8 base weights) moves them to the device but keeps their floating dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from selective_attention.config import LEGACY_IDENTITY_ALPHA, SSAConfig
from selective_attention.functional import compute_dtype, no_autocast, recomputation_enabled


def default_mlp_hidden(d_model: int, n_heads: int, n_targets: int, growth: float) -> int:
    """Hidden width of the ``sharing="mlp"`` term so that a transformer block (~12 d^2 parameters) grows by
    ``growth``: n_targets MLPs of d_model*r + r + r*n_heads parameters each. Rounded to an even number."""
    r = growth * 12 * d_model * d_model / (n_targets * (d_model + 1 + n_heads))
    return max(2, 2 * round(r / 2))


def log_positions(positions: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """log p (float32 by default) for 1-indexed positions p >= 1, shape preserved."""
    return torch.log(positions.to(dtype).clamp_min(1.0))


PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _compute_dtype(*xs: Tensor) -> torch.dtype:
    return functools.reduce(torch.promote_types, (compute_dtype(x) for x in xs))


def _shared_token_logit(projection: Tensor, readout: Tensor) -> Tensor:
    """f_h(x) = u_h . gelu(W^h x): (B, H, T, D), (H, D) -> (B, H, T)."""
    dt = _compute_dtype(projection, readout)
    return torch.einsum("bhtd,hd->bht", F.gelu(projection.to(dt)), readout.to(dt))


class _SharedTokenLogit(torch.autograd.Function):
    """``_shared_token_logit`` that keeps only its inputs for backward: gelu(P) is recomputed there, as under
    ``checkpoint``, but the backward is written out instead of re-running the forward under autograd. That skips
    what checkpoint's replay spends for nothing: the read-out's forward bmm and a bmm with a contraction of
    length 1 (grad f times u: one product per element, exactly an elementwise multiply). Every other op is the
    one autograd derives from ``torch.einsum``'s decomposition (permute, reshape, bmm), on operands of the same
    values and layout, so the gradients are bit-identical to autograd's (tests/test_temperature.py). The layouts
    matter too: gelu_backward's vectorised and scalar loops round differently, so its inputs keep autograd's."""

    @staticmethod
    def forward(ctx, projection: Tensor, readout: Tensor) -> Tensor:
        ctx.save_for_backward(projection, readout)
        return _shared_token_logit(projection, readout)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        projection, readout = ctx.saved_tensors
        dt = _compute_dtype(projection, readout)
        p, u = projection.to(dt), readout.to(dt)
        B, H, T, D = p.shape
        # einsum("bhtd,hd->bht") runs bmm((H, B*T, D), (H, D, 1)); its grad arrives as (H, B*T, 1)
        grad3 = grad.to(dt).reshape(B, H, T, 1).permute(1, 0, 2, 3).reshape(H, B * T, 1)
        g_proj = g_read = None
        if ctx.needs_input_grad[1]:
            g3 = F.gelu(p).permute(1, 0, 2, 3).reshape(H, B * T, D)
            g_read = torch.bmm(g3.transpose(1, 2), grad3).view(H, D).to(readout.dtype)
        if ctx.needs_input_grad[0]:
            g_gelu = torch.mul(grad3, u.view(H, 1, D)).view(H, B, T, D).permute(1, 0, 2, 3)
            g_proj = torch.ops.aten.gelu_backward(g_gelu, p).to(projection.dtype)
        return g_proj, g_read


def _shared_token_term(projection: Tensor, readout: Tensor) -> Tensor:
    """f = ``_shared_token_logit`` without keeping its (B, H, T, D) intermediates for backward."""
    if not (torch.is_grad_enabled() and (projection.requires_grad or readout.requires_grad)):
        return _shared_token_logit(projection, readout)
    if not recomputation_enabled():  # plain autograd through the formula (a memory benchmark's reference)
        return _shared_token_logit(projection, readout)
    B, _, T, D = projection.shape
    if torch.compiler.is_compiling() or min(B, T, D) < 2:
        # compiled: a checkpointed region that the partitioner recomputes. A batch, length or head dim of 1:
        # einsum squeezes that dimension and orders its bmm differently (or multiplies and sums for D = 1), which
        # the written-out backward does not reproduce
        return _recomputed(_shared_token_logit, projection, readout)
    return _SharedTokenLogit.apply(projection, readout)


def _recomputed(fn, *args: Tensor) -> Tensor:
    """Run ``fn`` without keeping its (B, H, T, D)-sized intermediates for backward: they are recomputed there.
    The token term then saves nothing beyond what the attention already keeps (its inputs). torch.compile traces
    the checkpoint into the graph (fullgraph) and its partitioner recomputes the region likewise."""
    if torch.is_grad_enabled() and any(a.requires_grad for a in args) and recomputation_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


class _FloatParameters(nn.Module):
    """Keeps every parameter in one of ``PARAM_DTYPES`` whatever dtype the enclosing model is cast to."""

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, memory_format = torch._C._nn._parse_to(*args, **kwargs)
        if dtype is not None and dtype not in PARAM_DTYPES:
            dtype = None  # integer / quantised / float8 base weights: move only
        kw = {} if memory_format is None else {"memory_format": memory_format}
        return super().to(device=device, dtype=dtype, non_blocking=non_blocking, **kw)

    def _apply(self, fn, recurse=True):
        def guarded(t: Tensor) -> Tensor:
            out = fn(t)
            if t.is_floating_point() and out.dtype not in PARAM_DTYPES:
                return t.to(device=out.device)
            return out

        return super()._apply(guarded, recurse)


class TemperatureFunction(_FloatParameters):
    """tau for one target (query, key or value) over ``n_heads`` heads.

    Returns (B, n_heads, T) in float32 (float64 for float64 inputs)."""

    def __init__(
        self,
        n_heads: int,
        head_dim: int,
        d_model: int,
        config: SSAConfig,
        mlp_hidden: int | None = None,
        target: str = "query",
    ) -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.d_model = n_heads, head_dim, d_model
        self.token_aware = config.token_aware
        self.position_aware = config.has_position_term(target)
        self.sharing = config.sharing
        self.position_scale = float(config.position_scale)
        self.start_coefficient = config.start_coefficient
        self.legacy_identity = config.init == "identity"  # how an older model's saved alpha maps to c
        if self.position_aware:
            self.coefficient = nn.Parameter(torch.empty(n_heads))  # theta = c / position_scale
        if self.token_aware:
            if self.sharing == "shared":
                self.readout = nn.Parameter(torch.zeros(n_heads, head_dim))  # u_h: zero -> tanh(0) = 0
            else:
                r = mlp_hidden or config.mlp_hidden
                if r is None:
                    r = default_mlp_hidden(d_model, n_heads, len(config.targets), config.mlp_growth)
                self.fc_in = nn.Linear(d_model, r)
                self.fc_out = nn.Linear(r, n_heads, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Identity-preserving initialisation (also called again after Hugging Face's own weight init)."""
        if self.position_aware:
            self.coefficient.fill_(self.start_coefficient / self.position_scale)
        if self.token_aware and self.sharing == "shared":
            self.readout.zero_()
        elif self.token_aware:
            # Mirrored halves: hidden units 2i and r/2 + 2i... are copies with opposite read-out weights, so
            # f(x) = 0 for every x while each weight still has a non-zero gradient (no dead zero-init layer).
            r = self.fc_in.out_features
            h = r // 2
            nn.init.normal_(self.fc_in.weight[:h], std=1.0 / math.sqrt(self.d_model))
            self.fc_in.weight[h:].copy_(self.fc_in.weight[:h])
            self.fc_in.bias.zero_()
            nn.init.normal_(self.fc_out.weight[:, :h], std=1.0 / math.sqrt(r))
            self.fc_out.weight[:, h:].copy_(-self.fc_out.weight[:, :h])

    def position_coefficient(self) -> Tensor:
        """c per head, shape (n_heads,), in float32 (float64 if the parameters are float64)."""
        return self.coefficient.to(compute_dtype(self.coefficient)) * self.position_scale

    def coefficient_reach(self, start: Mapping[str, Tensor], step_bound: float) -> tuple[float, float]:
        """(c at the start, how far c could move) when theta moves at most ``step_bound`` (AdamW's bound: the sum of
        its learning rates): c = position_scale x theta. ``start`` (the parameters at the start, by local name) is
        not needed: the start c is the configuration's."""
        return self.start_coefficient, self.position_scale * step_bound

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        legacy_alpha_to_coefficient(state_dict, self.legacy_identity, self.position_scale, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _mlp_token_logit(self, hidden: Tensor) -> Tensor:
        # The two halves go through identical, separate matmuls: at the mirrored init they are then exact
        # negatives of each other and f is exactly 0 (one matmul over all r units may round them differently).
        h = self.fc_in.out_features // 2
        dt = _compute_dtype(hidden, self.fc_in.weight)
        x, w1, b1, w2 = (t.to(dt) for t in (hidden, self.fc_in.weight, self.fc_in.bias, self.fc_out.weight))
        f = F.linear(F.gelu(F.linear(x, w1[:h], b1[:h])), w2[:, :h]) + F.linear(
            F.gelu(F.linear(x, w1[h:], b1[h:])), w2[:, h:]
        )  # (B, T, H)
        return f.transpose(1, 2)  # (B, H, T)

    def forward(
        self, *, projection: Tensor | None = None, hidden: Tensor | None = None, positions: Tensor | None = None
    ) -> Tensor:
        """projection (B, n_heads, T, D) pre-RoPE [shared]; hidden (B, T, d_model) [mlp];
        positions (T,) or (B, T), 1-indexed absolute [position-aware]. Returns tau (B|1, n_heads, T) in float32
        (float64 for float64 inputs), also under autocast."""
        if self.position_aware and positions is None:
            raise ValueError("a position-aware temperature needs positions")
        if self.token_aware and self.sharing == "shared":
            if projection is None:
                raise ValueError("the shared token term needs the per-head projection (B, H, T, D)")
            if projection.shape[1] != self.n_heads or projection.shape[-1] != self.head_dim:
                raise ValueError(
                    f"projection shape {tuple(projection.shape)} does not match (B, {self.n_heads}, T, {self.head_dim})"
                )
        if self.token_aware and self.sharing == "mlp" and hidden is None:
            raise ValueError("the mlp token term needs the hidden state (B, T, d_model)")
        device = next(t for t in (projection, hidden, positions) if t is not None).device
        with no_autocast(device):
            return self._tau(projection, hidden, positions)

    def _tau(self, projection: Tensor | None, hidden: Tensor | None, positions: Tensor | None) -> Tensor:
        tau: Tensor | None = None
        if self.position_aware:
            assert positions is not None
            logp = log_positions(positions, compute_dtype(self.coefficient))
            logp = logp[None] if logp.dim() == 1 else logp  # (B, T)
            tau = self.position_coefficient()[None, :, None] * logp[:, None, :]  # (B, H, T)
        if self.token_aware:
            if self.sharing == "shared":
                assert projection is not None  # forward checked it
                f = _shared_token_term(projection, self.readout)  # (B, H, T)
            else:
                assert hidden is not None
                f = _recomputed(self._mlp_token_logit, hidden)  # (B, H, T)
            tok = torch.tanh(f)
            tau = tok if tau is None else tau + tok
        assert tau is not None
        return 1.0 + tau


def legacy_alpha_to_coefficient(
    state: dict[str, Tensor], identity: bool, position_scale: float, prefix: str = ""
) -> None:
    """In place: every ``<prefix>...alpha`` of the older sigmoid form becomes the ``coefficient`` giving the same c
    (c = sigmoid(alpha) - sigmoid(-4) if the model was built with init="identity", else sigmoid(alpha))."""
    for key in [k for k in state if k.startswith(prefix) and k.endswith("alpha")]:
        if not (key == prefix + "alpha" or key.endswith(".alpha")) or key[:-5] + "coefficient" in state:
            continue
        alpha = state.pop(key)
        c = torch.sigmoid(alpha.double())
        if identity:  # the offset rounded through alpha's dtype, as the sigmoid form computed it
            c = c - torch.sigmoid(torch.tensor(LEGACY_IDENTITY_ALPHA, dtype=alpha.dtype).double())
        state[key[:-5] + "coefficient"] = (c / position_scale).to(alpha.dtype)


class SSATemperatures(_FloatParameters):
    """The temperature functions of one attention layer, one per target in ``config.targets``."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        config: SSAConfig,
        mlp_hidden: int | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        heads = {"query": n_heads, "key": n_kv_heads, "value": n_kv_heads}
        self.fns = nn.ModuleDict(
            {t: TemperatureFunction(heads[t], head_dim, d_model, config, mlp_hidden, target=t) for t in config.targets}
        )

    def __contains__(self, target: str) -> bool:
        return target in self.fns

    def forward(self, target: str, **kwargs: Tensor | None) -> Tensor | None:
        """tau for ``target`` ("query" / "key" / "value"), or None when that target has no temperature."""
        if target not in self.fns:
            return None
        return cast(TemperatureFunction, self.fns[target])(**kwargs)

    def reset_parameters(self) -> None:
        for fn in self.fns.values():
            cast(TemperatureFunction, fn).reset_parameters()


def temperature_modules(model: nn.Module) -> list[TemperatureFunction]:
    """The temperature functions that run: a PEFT ``modules_to_save`` wrapper keeps a frozen ``original_module``
    copy beside the trained one, which must be neither trained nor counted."""
    return [
        m
        for name, m in model.named_modules()
        if isinstance(m, TemperatureFunction) and "original_module" not in name.split(".")
    ]


def temperature_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter of every temperature function in ``model`` (no duplicates)."""
    seen: set[int] = set()
    out = []
    for m in temperature_modules(model):
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def param_groups(
    model: nn.Module,
    lr: float,
    temperature_lr: float | None = None,
    weight_decay: float = 0.0,
    temperatures_only: bool = False,
) -> list[dict]:
    """Optimizer parameter groups: base weights (decay on matrices only) and temperature parameters with
    their own learning rate (default: ``lr`` itself) and no weight decay. ``temperatures_only`` freezes the base.

    From scratch the same rate as the weights trained best here (tiny Llama, 100 steps, 3 seeds: query+value
    temperatures at 1x lr tie vanilla, at 10x they lose 5 %); the official fine-tuning recipe instead gives the
    temperatures 1e-2 against 1e-5 for the weights - pass ``temperature_lr`` for that."""
    temps = temperature_parameters(model)
    temp_ids = {id(p) for p in temps}
    t_lr = lr if temperature_lr is None else temperature_lr
    groups: list[dict] = []
    if temps:
        groups.append({"params": temps, "lr": t_lr, "weight_decay": 0.0, "name": "temperature"})
    if temperatures_only:
        if not temps:
            raise ValueError("temperatures_only: the model has no SSA temperature parameters")
        for p in model.parameters():
            if id(p) not in temp_ids:
                p.requires_grad_(False)
        return groups
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in model.parameters():
        if id(p) in temp_ids or not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups.append({"params": decay, "lr": lr, "weight_decay": weight_decay, "name": "decay"})
    groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0, "name": "no_decay"})
    return [g for g in groups if g["params"]]
