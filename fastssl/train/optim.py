"""Optimizers (SGD, LARS, AdamW) and the warm-up + cosine learning-rate schedule.

Learning rates are given for a global batch of 256 and scaled linearly with the global batch
(Goyal et al.), the convention of the SimCLR/BYOL/SimSiam recipes. Biases and normalization
parameters get no weight decay and, under LARS, no trust-ratio adaptation (as in SimCLR/BYOL).
"""

from __future__ import annotations

import math
from typing import Dict, Iterable, List

import torch
from torch import nn

from fastssl.train.config import TrainConfig

DEFAULT_LR = {"sgd": 0.06, "lars": 0.3, "adamw": 4e-3}
DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "lars": 1e-6, "adamw": 1e-4}


class LARS(torch.optim.Optimizer):
    r"""Layer-wise Adaptive Rate Scaling (You et al. 2017) on top of SGD with momentum.

    For a parameter group with ``lars=True`` the update of each tensor ``w`` with gradient ``g``
    is scaled by the trust ratio :math:`\eta\,\|w\| / (\|g\| + \lambda\|w\|)` (1 when either norm
    is 0); weight decay :math:`\lambda` is added to the gradient first.
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust_coefficient: float = 1e-3) -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient, lars=True)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"] != 0:
                    g = g.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm = torch.linalg.vector_norm(p)
                    g_norm = torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["trust_coefficient"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    g = g * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(g).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _param_groups(model: nn.Module, weight_decay: float, special: Dict[int, Dict]) -> List[Dict]:
    """Decay / no-decay groups, split again for parameters with their own learning-rate rule
    (``special``: id(parameter) -> {"lr_scale": s, "constant_lr": bool}, e.g. a predictor)."""
    buckets: Dict[tuple, List] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        rule = special.get(id(p), {})
        # 1-d tensors are biases and normalization scales/shifts.
        key = (p.ndim <= 1, float(rule.get("lr_scale", 1.0)), bool(rule.get("constant_lr", False)))
        buckets.setdefault(key, []).append(p)
    groups = []
    for (no_decay, scale, constant), params in buckets.items():
        groups.append({
            "params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lars": not no_decay,
            "lr_scale": scale, "constant_lr": constant,
        })
    return groups


def peak_lr(cfg: TrainConfig, global_batch: int) -> float:
    base = cfg.lr if cfg.lr is not None else DEFAULT_LR[cfg.optimizer]
    return base * global_batch / 256.0


def build_optimizer(cfg: TrainConfig, model: nn.Module, global_batch: int) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optimizer`` over ``model``'s trainable parameters. A model with a
    ``lr_rules()`` method (see :class:`fastssl.train.methods.Method`) gives some parameters a
    learning rate of their own (SimSiam's constant-lr predictor)."""
    wd = cfg.weight_decay if cfg.weight_decay is not None else DEFAULT_WEIGHT_DECAY[cfg.optimizer]
    special = model.lr_rules() if hasattr(model, "lr_rules") else {}
    groups = _param_groups(model, wd, special)
    lr = peak_lr(cfg, global_batch)
    if cfg.optimizer == "sgd":
        for g in groups:
            g.pop("lars")
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=cfg.momentum)
    for g in groups:
        g.pop("lars")
    return torch.optim.AdamW(groups, lr=lr)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, min_fraction: float = 0.0) -> float:
    """Linear warm-up from ``peak / warmup_steps`` to ``peak``, then a half cosine down to
    ``min_fraction * peak`` at ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    floor = peak * min_fraction
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float, peak: float | None = None) -> None:
    """The scheduled ``lr`` on every group, times the group's ``lr_scale``; groups with
    ``constant_lr`` stay at ``peak`` (times their scale) throughout."""
    for group in optimizer.param_groups:
        base = peak if (group.get("constant_lr") and peak is not None) else lr
        group["lr"] = base * group.get("lr_scale", 1.0)
