"""Backbones and heads.

* ``tiny_cnn``: four 3x3 conv-BN-ReLU stages (width w, 2w, 4w, 8w) with 2x2 max-pooling and a
  global average pool -- 0.1 M parameters, 128 features and 4 M multiply-adds per 32x32 image
  at the default w = 16: fast enough to pretrain on a CPU in minutes.
* ``resnet18`` / ``resnet10``: ResNet with the CIFAR stem (3x3 stride-1 convolution, no
  max-pool), BasicBlocks [2, 2, 2, 2] / [1, 1, 1, 1], widths w..8w (w = 64 is the standard one).
* ``timm:NAME`` / ``torchvision:NAME``: that package's model, randomly initialized, with its
  classifier removed (:class:`ExternalBackbone`), when the package is installed.

Heads follow the papers (projector/predictor MLPs with BatchNorm where the paper has it), with
their widths scaled to the backbone's feature dimension; see :mod:`fastssl.train.methods`.
"""

from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _conv_bn_relu(cin: int, cout: int) -> List[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class TinyCNN(nn.Module):
    """(B, C, H, W) -> (B, 8·width) features. Any H, W >= 8 (pooled 3 times, then globally)."""

    def __init__(self, in_channels: int = 3, width: int = 32) -> None:
        super().__init__()
        w = width
        layers: List[nn.Module] = []
        layers += _conv_bn_relu(in_channels, w) + [nn.MaxPool2d(2, ceil_mode=True)]
        layers += _conv_bn_relu(w, 2 * w) + [nn.MaxPool2d(2, ceil_mode=True)]
        layers += _conv_bn_relu(2 * w, 4 * w) + [nn.MaxPool2d(2, ceil_mode=True)]
        layers += _conv_bn_relu(4 * w, 8 * w)
        self.features = nn.Sequential(*layers)
        self.out_dim = 8 * w

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class ResNet(nn.Module):
    """ResNet with the CIFAR stem: (B, C, H, W) -> (B, 8·width) features."""

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), in_channels: int = 3, width: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn_relu(in_channels, width))
        stages: List[nn.Module] = []
        cin = width
        for i, n in enumerate(blocks):
            cout = width * 2**i
            for j in range(n):
                stages.append(BasicBlock(cin, cout, stride=2 if (j == 0 and i > 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*stages)
        self.out_dim = cin

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.stages(self.stem(x)), 1).flatten(1)


class ExternalBackbone(nn.Module):
    """A timm or torchvision network with its classifier removed: (B, C, H, W) -> (B, out_dim).

    ``out_dim`` is measured with one dummy forward at construction (the packages name the
    feature width differently), so any model whose classifier can be replaced works.
    """

    def __init__(self, net: nn.Module, in_channels: int, image_size: int) -> None:
        super().__init__()
        self.net = net
        was_training = net.training
        net.eval()
        with torch.no_grad():
            probe = net(torch.zeros(2, in_channels, image_size, image_size))
        net.train(was_training)
        if probe.dim() != 2:
            raise ValueError(f"the network returns {tuple(probe.shape)} features; expected (batch, features)")
        self.out_dim = int(probe.shape[1])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _timm_backbone(model_name: str, in_channels: int, image_size: int) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise ImportError(f"--backbone timm:{model_name} needs timm (pip install timm)") from None
    kwargs = {"pretrained": False, "num_classes": 0, "in_chans": in_channels}
    try:
        net = timm.create_model(model_name, img_size=image_size, **kwargs)
    except TypeError:  # convolutional models take no img_size
        net = timm.create_model(model_name, **kwargs)
    return ExternalBackbone(net, in_channels, image_size)


def _torchvision_backbone(model_name: str, in_channels: int, image_size: int) -> nn.Module:
    try:
        from torchvision import models as tv_models
    except Exception as e:  # ImportError, or a torchvision built for another torch
        raise ImportError(f"--backbone torchvision:{model_name} needs an importable torchvision ({e})") from None
    net = tv_models.get_model(model_name, weights=None)
    # Replace the classifier by an identity: resnets have .fc, most others .classifier / .heads.
    for attr in ("fc", "classifier", "heads", "head"):
        if isinstance(getattr(net, attr, None), nn.Module):
            setattr(net, attr, nn.Identity())
            break
    if in_channels != 3:
        raise ValueError(f"torchvision:{model_name} expects 3 input channels, the data has {in_channels}")
    return ExternalBackbone(net, in_channels, image_size)


def build_backbone(name: str, in_channels: int, width: int | None = None, image_size: int = 32) -> nn.Module:
    """A backbone with an ``out_dim`` attribute (its feature dimension).

    ``timm:NAME`` and ``torchvision:NAME`` build that package's model (random initialization,
    classifier removed) when the package is installed.
    """
    if name.startswith("timm:"):
        return _timm_backbone(name.split(":", 1)[1], in_channels, image_size)
    if name.startswith("torchvision:"):
        return _torchvision_backbone(name.split(":", 1)[1], in_channels, image_size)
    if name == "tiny_cnn":
        return TinyCNN(in_channels, width or 16)
    if name == "resnet18":
        return ResNet((2, 2, 2, 2), in_channels, width or 64)
    if name == "resnet10":
        return ResNet((1, 1, 1, 1), in_channels, width or 64)
    raise ValueError(f"unknown backbone {name!r}")


def mlp(dims: Sequence[int], batch_norm: bool = True, last_batch_norm: bool = False, last_bn_affine: bool = True) -> nn.Sequential:
    """Linear layers ``dims[0] -> ... -> dims[-1]``; hidden layers are Linear-BN-ReLU (Linear-ReLU
    without ``batch_norm``); the last is a Linear, followed by BN when ``last_batch_norm``
    (SimSiam's and Barlow Twins' projectors end differently, see methods)."""
    layers: List[nn.Module] = []
    for i in range(len(dims) - 1):
        last = i == len(dims) - 2
        use_bn = (batch_norm and not last) or (last and last_batch_norm)
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not use_bn))
        if use_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=(not last) or last_bn_affine))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class NormalizedLinear(nn.Module):
    """Linear map with L2-normalized weight rows and no bias: the SwAV prototypes and DINO's
    last layer (weight normalization with the gain fixed to 1, DINO's ``norm_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """MLP (GELU) -> L2-normalized bottleneck -> weight-normalized prototypes (DINO).

    (B, in_dim) -> (B, out_dim) logits, each a cosine in [-1, 1]. ``batch_norm`` puts a
    BatchNorm after each hidden Linear (Linear-BN-GELU, the official head's ``use_bn`` option,
    used for its convolutional backbones); without it the MLP has no BN (DINO's ViT head).

    Example::

        head = DINOHead(128, 256, 128, 1024, batch_norm=True)
        logits = head(torch.randn(8, 128))  # (8, 1024)
    """

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, out_dim: int, batch_norm: bool = False) -> None:
        super().__init__()

        def hidden(dim_in: int) -> List[nn.Module]:
            norm: List[nn.Module] = [nn.BatchNorm1d(hidden_dim)] if batch_norm else []
            return [nn.Linear(dim_in, hidden_dim), *norm, nn.GELU()]

        self.mlp = nn.Sequential(*hidden(in_dim), *hidden(hidden_dim), nn.Linear(hidden_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = NormalizedLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))
