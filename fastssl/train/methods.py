"""The SSL methods: heads of each paper (scaled to the backbone), the loss, the EMA target.

A method is an ``nn.Module`` whose ``forward(views, epoch)`` returns the loss of one batch
(so DDP can wrap it), plus

* ``features(x)``  -- backbone features (kNN, linear probe);
* ``embed(x)``     -- the embeddings the loss sees (collapse metrics);
* ``after_backward(epoch)`` -- gradient surgery (SwAV/DINO freeze the prototypes first);
* ``after_step(progress)``  -- EMA update of the target/teacher, momentum on a cosine from
  ``ema_momentum`` to 1 over training (BYOL's schedule; ``progress`` in [0, 1]);
* ``local_state()`` / ``load_local_state()`` -- state a checkpoint must keep per process:
  MoCo's memory bank (a non-persistent buffer of the loss, absent from the ``state_dict``)
  and the SwAV queue (each process queues its own crops).

Head sizes, with F the backbone's feature dimension (paper values in brackets):

======================  =================================================================
simclr                  projector F-F-128, BN in the hidden layer [2048-2048-128]
moco (v2)               projector F-F-128, BN in the hidden layer, memory bank of keys, EMA
                        key encoder
byol                    projector F-2F-128 ending in BN, predictor 128-2F-128 [4096, 256],
                        EMA target
simsiam                 projector F-2F-2F-2F with BN on the output, predictor 2F-F/2-2F
                        [2048 with a 512 bottleneck]
barlow_twins, vicreg    projector F-4F-4F-4F [8192-8192-8192]
swav                    projector F-2F-128 ending in BN, L2-normalized; K = max(4d, min(3000,
                        N/2)) fixed random prototypes (normalized rows)
wmse                    projector F-2F-32 [1024-64]
dino                    head F-2F-2F-min(256,F) (Linear-BN-GELU), L2 norm, weight-normed K
                        prototypes [2048-2048-256, K = 65536], EMA teacher; no small crops by
                        default
center_penalty          projector F-F-128 ending in BN, Jha et al.'s invariance + center penalty
======================  =================================================================
"""

from __future__ import annotations

import copy
import inspect
import math
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastssl
from fastssl.train.config import ConfigError, TrainConfig
from fastssl.train.models import DINOHead, NormalizedLinear, build_backbone, mlp

# The loss class of every method and the constructor defaults the driver uses where they differ
# from the class's own (lightly's) defaults.
LOSS_CLASSES = {
    "simclr": fastssl.NTXentLoss,
    "moco": fastssl.NTXentLoss,
    "byol": fastssl.NegativeCosineSimilarity,
    "simsiam": fastssl.NegativeCosineSimilarity,
    "barlow_twins": fastssl.BarlowTwinsLoss,
    "vicreg": fastssl.VICRegLoss,
    "swav": fastssl.SwaVLoss,
    "wmse": fastssl.WMSELoss,
    "dino": fastssl.DINOLoss,
    "center_penalty": fastssl.CenterPenaltyLoss,
}
# Arguments the driver sets itself (from the world size and --backend).
_DRIVER_ARGS = ("gather_distributed", "sinkhorn_gather_distributed", "backend")


def loss_arguments(cfg: TrainConfig, extra_defaults: Dict[str, Any]) -> Dict[str, Any]:
    """The loss constructor's keyword arguments: driver defaults, overridden by ``--loss-arg``.

    Raises:
        ConfigError: a key the loss class does not take, or one the driver controls.
    """
    cls = LOSS_CLASSES[cfg.method]
    params = inspect.signature(cls.__init__).parameters
    valid = [name for name in params if name not in ("self",) + _DRIVER_ARGS]
    for key in cfg.loss_args:
        if key in _DRIVER_ARGS:
            raise ConfigError(f"--loss-arg {key} is set by the driver (distributed runs gather automatically; use --backend)")
        if key not in params:
            raise ConfigError(f"--loss-arg {key}: {cls.__name__} takes {', '.join(valid)}")
    args = dict(extra_defaults)
    args.update(cfg.loss_args)
    return args


def _build_loss(cfg: TrainConfig, defaults: Dict[str, Any], distributed_run: bool) -> nn.Module:
    cls = LOSS_CLASSES[cfg.method]
    args = loss_arguments(cfg, defaults)
    params = inspect.signature(cls.__init__).parameters
    if "gather_distributed" in params:
        args["gather_distributed"] = distributed_run
    if "sinkhorn_gather_distributed" in params:
        args["sinkhorn_gather_distributed"] = distributed_run
    args["backend"] = cfg.backend
    try:
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cls.__name__}({', '.join(f'{k}={v!r}' for k, v in args.items())}): {e}") from None


def cosine_momentum(base: float, progress: float) -> float:
    """EMA momentum raised from ``base`` to 1 on a half cosine (BYOL): ``1 - (1-base)(cos(pi p)+1)/2``."""
    progress = min(max(progress, 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """``target <- momentum * target + (1 - momentum) * online`` on parameters; buffers (BN
    running statistics) are copied."""
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, [p.detach() for p in o_params], alpha=1.0 - momentum)
    for tb, ob in zip(target.buffers(), online.buffers()):
        tb.copy_(ob)


def full_precision_loss(reference: Tensor):
    """Context that switches autocast off around a loss call. The losses take half-precision
    inputs as they come and accumulate in float32 themselves; autocast would recast the
    products inside their custom autograd functions (and mix dtypes in their backward)."""
    return torch.autocast(device_type=reference.device.type, enabled=False)


def _frozen_copy(module: nn.Module) -> nn.Module:
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class Method(nn.Module):
    """Common parts: backbone, projector, loss; see the module docstring."""

    name = "method"
    ema_momentum: Optional[float] = None

    def __init__(self, cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> None:
        super().__init__()
        self.cfg = cfg
        self.world_size = world_size
        try:
            self.backbone = build_backbone(cfg.backbone, in_channels, cfg.width, image_size)
        except (ImportError, ValueError, RuntimeError) as e:
            raise ConfigError(f"--backbone {cfg.backbone}: {e}") from None
        self.feature_dim = self.backbone.out_dim

    # -- the interface used by the loop ------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        return self.backbone(x)

    def embed(self, x: Tensor) -> Tensor:
        return self.projector(self.backbone(x))

    def after_backward(self, epoch: int) -> None:
        pass

    def after_step(self, progress: float) -> None:
        pass

    def local_state(self) -> Dict[str, Any]:
        return {}

    def lr_rules(self) -> Dict[int, Dict[str, Any]]:
        """Parameters with a learning-rate rule of their own, by ``id``: the predictor (BYOL,
        SimSiam) gets ``--predictor-lr-scale`` times the lr, held at its peak with
        ``--predictor-constant-lr`` (SimSiam's recipe)."""
        predictor = getattr(self, "predictor", None)
        if not isinstance(predictor, nn.Module):
            return {}
        rule = {"lr_scale": self.cfg.predictor_lr_scale, "constant_lr": bool(self.cfg.predictor_constant_lr)}
        return {id(p): rule for p in predictor.parameters()}

    def load_local_state(self, state: Dict[str, Any]) -> None:
        pass

    def compile_networks(self) -> None:
        for module in self.trainable_networks():
            module.compile()

    def trainable_networks(self) -> List[nn.Module]:
        return [m for m in (self.backbone, getattr(self, "projector", None), getattr(self, "predictor", None)) if isinstance(m, nn.Module)]

    def _dim(self, value: Optional[int], default: int) -> int:
        return int(value) if value is not None else int(default)


class SimCLR(Method):
    name = "simclr"

    def __init__(self, cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> None:
        super().__init__(cfg, in_channels, num_train, world_size, image_size)
        f = self.feature_dim
        self.projector = mlp([f, self._dim(cfg.proj_hidden_dim, f), self._dim(cfg.proj_dim, 128)])
        self.criterion = _build_loss(cfg, {"temperature": 0.2}, world_size > 1)

    def forward(self, views: List[Tensor], epoch: int) -> Tensor:
        z0, z1 = self.embed(views[0]), self.embed(views[1])
        with full_precision_loss(z0):
            return self.criterion(z0, z1)


class MoCo(Method):
    """MoCo v2: query encoder, EMA key encoder, InfoNCE against a memory bank of keys."""

    name = "moco"

    def __init__(self, cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> None:
        super().__init__(cfg, in_channels, num_train, world_size, image_size)
        f = self.feature_dim
        dim = self._dim(cfg.proj_dim, 128)
        # BatchNorm in the hidden layer (MoCo v3's heads; MoCo v2's has none): it removes the
        # large common component of the untrained features (center-vector norm 0.999 here),
        # which without it left the default run at kNN 0.31.
        self.projector = mlp([f, self._dim(cfg.proj_hidden_dim, f), dim])
        self.key_backbone = _frozen_copy(self.backbone)
        self.key_projector = _frozen_copy(self.projector)
        # Four global batches of keys (at most half the data set, at most 4096): keys written
        # many steps ago come from an older key encoder and no longer match the queries. On
        # the default run a bank of half the data (2000 keys, 16 batches old) ended at kNN
        # 0.337, four batches (512) at 0.368; see docs/training.md.
        global_batch = cfg.batch_size * world_size
        bank = min(4096, max(global_batch, min(num_train // 2, 4 * global_batch)))
        self.criterion = _build_loss(cfg, {"temperature": 0.2, "memory_bank_size": (bank, dim)}, world_size > 1)
        self.ema_momentum = cfg.ema_momentum

    def forward(self, views: List[Tensor], epoch: int) -> Tensor:
        query = self.embed(views[0])
        with torch.no_grad():
            key = self.key_projector(self.key_backbone(views[1]))
        with full_precision_loss(query):
            return self.criterion(query, key)

    def after_step(self, progress: float) -> None:
        m = cosine_momentum(self.ema_momentum, progress)
        ema_update(self.key_backbone, self.backbone, m)
        ema_update(self.key_projector, self.projector, m)

    def local_state(self) -> Dict[str, Any]:
        # The bank is a non-persistent buffer of the loss module: saved here explicitly.
        return {"bank": self.criterion.bank.detach().cpu().clone(), "bank_ptr": self.criterion.bank_ptr.detach().cpu().clone()}

    def load_local_state(self, state: Dict[str, Any]) -> None:
        device = next(self.parameters()).device
        self.criterion.memory_bank.bank = state["bank"].to(device)
        self.criterion.memory_bank.bank_ptr = state["bank_ptr"].to(device)


class BYOL(Method):
    """BYOL: online projector + predictor regress the EMA target's projections (symmetrized).

    ``--no-predictor`` drops the predictor; ``--no-stop-gradient`` computes the targets with the
    online network itself, with gradient (an EMA copy has no gradient path to remove).
    """

    name = "byol"

    def __init__(self, cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> None:
        super().__init__(cfg, in_channels, num_train, world_size, image_size)
        f = self.feature_dim
        hidden, dim = self._dim(cfg.proj_hidden_dim, 2 * f), self._dim(cfg.proj_dim, 128)
        # BYOL's Linear-BN-ReLU-Linear plus a BatchNorm on the output: the untrained network's
        # embeddings share one large component (center-vector norm 0.997, from the positive
        # ReLU features), and the EMA target only keeps the center small when it starts near
        # zero (Jha et al. 2024, Sec. 2.4: batch normalization is needed when the initial
        # embeddings are not centred). Default run: kNN after one epoch 0.157 -> 0.199.
        self.projector = mlp([f, hidden, dim], last_batch_norm=True)
        self.predictor = nn.Identity() if cfg.no_predictor else mlp([dim, hidden, dim])
        self.target_backbone = _frozen_copy(self.backbone)
        self.target_projector = _frozen_copy(self.projector)
        self.criterion = _build_loss(cfg, {}, world_size > 1)
        self.ema_momentum = cfg.ema_momentum

    def _targets(self, views: List[Tensor]) -> List[Tensor]:
        if self.cfg.no_stop_gradient:
            return [self.embed(v) for v in views]
        with torch.no_grad():
            return [self.target_projector(self.target_backbone(v)) for v in views]

    def forward(self, views: List[Tensor], epoch: int) -> Tensor:
        p0, p1 = (self.predictor(self.embed(v)) for v in views[:2])
        t0, t1 = self._targets(views[:2])
        with full_precision_loss(p0):
            return 0.5 * (self.criterion(p0, t1) + self.criterion(p1, t0))

    def after_step(self, progress: float) -> None:
        m = cosine_momentum(self.ema_momentum, progress)
        ema_update(self.target_backbone, self.backbone, m)
        ema_update(self.target_projector, self.projector, m)


class SimSiam(Method):
    """SimSiam: a predictor on one branch, stop-gradient on the other, symmetrized; no EMA."""

    name = "simsiam"

    def __init__(self, cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> None:
        super().__init__(cfg, in_channels, num_train, world_size, image_size)
        f = self.feature_dim
        dim = self._dim(cfg.proj_dim, 2 * f)
        hidden = self._dim(cfg.proj_hidden_dim, dim)
        # SimSiam's projector ends in a BatchNorm without affine parameters (no ReLU).
        self.projector = mlp([f, hidden, hidden, dim], last_batch_norm=True, last_bn_affine=False)
        self.predictor = nn.Identity() if cfg.no_predictor else mlp([dim, max(1, dim // 4), dim])
        self.criterion = _build_loss(cfg, {}, world_size > 1)

    def forward(self, views: List[Tensor], epoch: int) -> Tensor:
        z0, z1 = self.embed(views[0]), self.embed(views[1])
        p0, p1 = self.predictor(z0), self.predictor(z1)
        if not self.cfg.no_stop_gradient:
            z0, z1 = z0.detach(), z1.detach()
        with full_precision_loss(p0):
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))


class Decorrelation(Method):
    """Barlow Twins and VICReg: a wide three-layer expander and a loss on the (N, d) pair."""

    def __init__(self, cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> None:
        super().__init__(cfg, in_channels, num_train, world_size, image_size)
        f = self.feature_dim
        dim = self._dim(cfg.proj_dim, 4 * f)
        hidden = self._dim(cfg.proj_hidden_dim, dim)
        self.projector = mlp([f, hidden, hidden, dim])
        self.criterion = _build_loss(cfg, self.loss_defaults(dim), world_size > 1)

    def loss_defaults(self, dim: int) -> Dict[str, Any]:
        return {}

    def forward(self, views: List[Tensor], epoch: int) -> Tensor:
        z_a, z_b = self.embed(views[0]), self.embed(views[1])
        with full_precision_loss(z_a):
            return self.criterion(z_a, z_b)


class BarlowTwins(Decorrelation):
    name = "barlow_twins"

    def loss_defaults(self, dim: int) -> Dict[str, Any]:
        # The weight of the redundancy term scaled with the embedding width: the paper's
        # 5e-3 at d = 8192 gives lambda * d = 41; at this driver's d = 4F = 512 the same 5e-3
        # gives 2.6, too weak to keep the features decorrelated, and the short default run
        # fell into a few dimensions (kNN 0.18 < 0.24 untrained). lambda = 10 / d (solo-learn's
        # CIFAR ratio, 5.1e-3 x 2048) keeps lambda * d at 10 for any width.
        return {"lambda_param": 10.0 / dim}


class VICReg(Decorrelation):
    name = "vicreg"


class SwAV(Method):
    """SwAV: swapped prediction of Sinkhorn codes (over multi-crop when ``--num-local-crops`` is
    set), with an optional queue of the global crops' embeddings (per process) and prototypes
    frozen for ``--freeze-prototypes-epochs`` (the recipe keeps them fixed for the whole run).

    Two collapses this head avoids, both measured on the default run (docs/training.md):

    * **K <= d.** The scores of an embedding are its products with the K prototypes, so an
      embedding in the (d - K)-dimensional complement of the prototypes' span scores 0 against
      every prototype: uniform predictions, uniform Sinkhorn codes, loss exactly log K, no
      gradient. With K = 100 < d = 128 the embeddings fell there (their component in the span
      0.15, against 0.88 for random directions) and kNN ended below the untrained network. K is
      therefore at least 4 d.
    * **Learned prototypes from the start.** With K > d the prototypes themselves turned
      orthogonal to the (still clustered) embeddings within an epoch: the scores' spread over
      the prototypes fell from 0.09 to 0.005, the same flat fixed point. The recipe keeps them
      fixed, as random unit vectors (Caron et al. 2020 report fixed random prototypes nearly as
      good as learned ones; Jha et al. 2024, Sec. 3.4: their mean is zero by construction, so
      the center vector stays small).
    """

    name = "swav"
    queue: Tensor

    def __init__(self, cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> None:
        super().__init__(cfg, in_channels, num_train, world_size, image_size)
        f = self.feature_dim
        dim = self._dim(cfg.proj_dim, 128)
        # SwAV's Linear-BN-ReLU-Linear plus a BatchNorm on the output (before the L2 norm): the
        # untrained embeddings share one large component (center-vector norm 0.997), which the
        # Sinkhorn codes cannot split but by colour; centred, the run learns the shape (kNN after
        # two epochs 0.268 without it, 0.370 with it; entropy rank 1.6 vs 4.0).
        self.projector = mlp([f, self._dim(cfg.proj_hidden_dim, 2 * f), dim], last_batch_norm=True)
        # One prototype per two training images up to SwAV's 3000, and at least 4 d (see the class
        # docstring: K <= d has a flat trivial solution). Many prototypes make the codes close to
        # instance labels, which learn fastest here: kNN after two epochs 0.22 with K = 100, 0.37
        # with 512, 0.47 with 2048, 0.44 with 3000.
        k = cfg.prototypes or int(max(4 * dim, min(3000, num_train // 2)))
        self.prototypes = NormalizedLinear(dim, k)
        self.criterion = _build_loss(cfg, {}, world_size > 1)
        self.register_buffer("queue", torch.zeros(2, cfg.queue_size, dim))
        self.register_buffer("queue_filled", torch.zeros((), dtype=torch.long))

    def embed(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def trainable_networks(self) -> List[nn.Module]:
        return super().trainable_networks() + [self.prototypes]

    def forward(self, views: List[Tensor], epoch: int) -> Tensor:
        embeddings = [self.embed(v) for v in views]
        scores = [self.prototypes(z) for z in embeddings]
        queue_scores = None
        size = self.queue.shape[1]
        if size > 0:
            if int(self.queue_filled) >= size:
                with torch.no_grad():
                    queue_scores = [self.prototypes(self.queue[i]) for i in range(2)]
            with torch.no_grad():
                # Newest first: this batch's global crops in front, the oldest rows drop out.
                current = torch.stack([z.detach() for z in embeddings[:2]]).to(self.queue.dtype)
                self.queue.copy_(torch.cat([current, self.queue], dim=1)[:, :size])
                self.queue_filled.add_(current.shape[1])
        with full_precision_loss(scores[0]):
            return self.criterion(scores[:2], scores[2:], queue_scores)

    def after_backward(self, epoch: int) -> None:
        if epoch < self.cfg.freeze_prototypes_epochs:
            self.prototypes.weight.grad = None

    def local_state(self) -> Dict[str, Any]:
        return {"queue": self.queue.detach().cpu().clone(), "queue_filled": self.queue_filled.detach().cpu().clone()}

    def load_local_state(self, state: Dict[str, Any]) -> None:
        self.queue.copy_(state["queue"])
        self.queue_filled.copy_(state["queue_filled"])


class WMSE(Method):
    """W-MSE: whitening of sub-batches of the stacked views, then normalized MSE."""

    name = "wmse"

    def __init__(self, cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> None:
        super().__init__(cfg, in_channels, num_train, world_size, image_size)
        f = self.feature_dim
        # 32 output dimensions whitened over sub-batches of 128: with the paper's 64 the
        # whitening matrix is estimated from only 2 samples per dimension and amplifies noise.
        dim = self._dim(cfg.proj_dim, 32)
        self.projector = mlp([f, self._dim(cfg.proj_hidden_dim, 2 * f), dim])
        w_size = int(cfg.loss_args.get("w_size", 128))
        self.criterion = _build_loss(cfg, {"embedding_dim": dim, "w_size": w_size}, world_size > 1)
        w_size = self.criterion.w_size
        if cfg.batch_size < w_size or cfg.batch_size % w_size != 0:
            raise ConfigError(
                f"W-MSE whitens sub-batches of w_size={w_size} images: --batch-size (per process) must be "
                f"a multiple of it and >= it, got {cfg.batch_size} (set e.g. --loss-arg w_size=N)"
            )

    def forward(self, views: List[Tensor], epoch: int) -> Tensor:
        z = torch.cat([self.embed(views[0]), self.embed(views[1])], dim=0)
        with full_precision_loss(z):
            return self.criterion(z)


class DINO(Method):
    """DINO: student on all crops, EMA teacher on the two global crops, centered and sharpened
    teacher targets. ``--no-centering`` keeps the center at zero (center_momentum = 1).

    The head has BatchNorm in its hidden layers (the official head's ``use_bn``, its option for
    convolutional backbones): the untrained tiny CNN's features share one large positive
    component (center-vector norm 0.96), so without it every image reaches nearly the same
    bottleneck direction and the teacher's targets differ between images mostly by colour.
    The rest of the recipe (no small crops, colour-unreliable augmentations, teacher momentum
    0.99, AdamW lr 2e-3) is in ``METHOD_DEFAULTS``; docs/training.md has the measurements.
    """

    name = "dino"

    def __init__(self, cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> None:
        super().__init__(cfg, in_channels, num_train, world_size, image_size)
        f = self.feature_dim
        k = cfg.prototypes or 1024
        self.head = DINOHead(
            f, self._dim(cfg.proj_hidden_dim, 2 * f), self._dim(cfg.proj_dim, min(256, f)), k, batch_norm=True
        )
        self.teacher_backbone = _frozen_copy(self.backbone)
        self.teacher_head = _frozen_copy(self.head)
        defaults: Dict[str, Any] = {"output_dim": k, "warmup_teacher_temp_epochs": max(1, min(30, cfg.epochs))}
        if cfg.no_centering:
            if "center_momentum" in cfg.loss_args:
                raise ConfigError("--no-centering and --loss-arg center_momentum contradict each other")
            # center = m c + (1 - m) mean with m = 1 keeps the initial zero center forever.
            defaults["center_momentum"] = 1.0
        self.criterion = _build_loss(cfg, defaults, world_size > 1)
        self.ema_momentum = cfg.ema_momentum

    def embed(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x))

    def trainable_networks(self) -> List[nn.Module]:
        return [self.backbone, self.head]

    def forward(self, views: List[Tensor], epoch: int) -> Tensor:
        with torch.no_grad():
            teacher = [self.teacher_head(self.teacher_backbone(v)) for v in views[:2]]
        student = [self.embed(v) for v in views]
        with full_precision_loss(student[0]):
            return self.criterion(teacher, student, epoch=epoch)

    def after_backward(self, epoch: int) -> None:
        if epoch < self.cfg.freeze_prototypes_epochs:
            self.head.last_layer.weight.grad = None

    def after_step(self, progress: float) -> None:
        m = cosine_momentum(self.ema_momentum, progress)
        ema_update(self.teacher_backbone, self.backbone, m)
        ema_update(self.teacher_head, self.head, m)


class CenterPenalty(Method):
    """Jha et al.'s simplified objective: invariance plus a penalty on the center vector (their Sec. 3.1, eq. 32)."""

    name = "center_penalty"

    def __init__(self, cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> None:
        super().__init__(cfg, in_channels, num_train, world_size, image_size)
        f = self.feature_dim
        # A BatchNorm on the projector's output centres the embeddings at initialization, the
        # premise of Jha et al.'s objective (their toy data start with a center vector near 0).
        # Without it the untrained embeddings all point one way (center-vector norm 0.997):
        # the gradient of ||s|| then points along each embedding, the direction that the
        # normalization removes, so the penalty cannot act and the run collapsed
        # (center-vector norm 0.999, kNN 0.195 after two epochs).
        self.projector = mlp([f, self._dim(cfg.proj_hidden_dim, f), self._dim(cfg.proj_dim, 128)], last_batch_norm=True)
        self.criterion = _build_loss(cfg, {}, world_size > 1)

    def forward(self, views: List[Tensor], epoch: int) -> Tensor:
        z_a, z_b = self.embed(views[0]), self.embed(views[1])
        with full_precision_loss(z_a):
            return self.criterion(z_a, z_b)


METHOD_CLASSES = {
    cls.name: cls
    for cls in (SimCLR, MoCo, BYOL, SimSiam, BarlowTwins, VICReg, SwAV, WMSE, DINO, CenterPenalty)
}
# Methods that use the small crops (the others ignore --num-local-crops beyond the two views).
MULTI_CROP_METHODS = ("swav", "dino")


def min_batch_size(method: str) -> int:
    """Smallest per-process batch the method's statistics allow (BatchNorm needs 2 samples;
    Barlow Twins / VICReg need 2 for their batch statistics)."""
    return 2


def build_method(cfg: TrainConfig, in_channels: int, num_train: int, world_size: int = 1, image_size: int = 32) -> Method:
    """Instantiate ``cfg.method``; raises :class:`ConfigError` for an unusable combination."""
    if cfg.batch_size < min_batch_size(cfg.method):
        raise ConfigError(
            f"{cfg.method} needs at least {min_batch_size(cfg.method)} images per batch and process "
            f"(batch statistics), got --batch-size {cfg.batch_size}"
        )
    return METHOD_CLASSES[cfg.method](cfg, in_channels, num_train, world_size, image_size)
