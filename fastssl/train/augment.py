"""Batched image augmentations on the training device, with torch ops only.

Every transform acts on a whole (B, C, H, W) float batch in [0, 1] at once, each image with its
own random parameters drawn from one ``torch.Generator`` (so a run is reproducible and its
state can be checkpointed):

* random resized crop + horizontal flip: one affine sampling grid per image
  (``F.affine_grid`` + ``F.grid_sample``), the crop box drawn as torchvision's
  ``RandomResizedCrop`` does (area fraction in ``scale``, log-uniform aspect ratio in [3/4, 4/3]);
* colour jitter (brightness, contrast, saturation, hue) applied with probability ``p``;
* grayscale, Gaussian blur (per-image sigma, separable grouped convolution), solarization.

The recipe of a view is a :class:`ViewSpec`; :func:`make_views` builds the two global views
(BYOL's asymmetric blur/solarize probabilities by default) and the optional small crops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


@dataclass(frozen=True)
class ViewSpec:
    """Recipe of one augmented view."""

    size: int
    scale: Tuple[float, float] = (0.25, 1.0)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    jitter_strength: float = 0.5
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    solarize_prob: float = 0.0


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen, device=device)


def _bernoulli(n: int, p: float, gen: torch.Generator, device) -> Tensor:
    return torch.rand(n, generator=gen, device=device) < p


def random_resized_crop(
    x: Tensor, size: int, scale: Tuple[float, float], flip_prob: float, gen: torch.Generator
) -> Tensor:
    """Crop a box of area fraction ``U(scale)`` and aspect ratio ``exp(U(log 3/4, log 4/3))`` at a
    uniform position, flip it horizontally with probability ``flip_prob``, resample to
    ``size``x``size`` (bilinear). (B, C, H, W) -> (B, C, size, size)."""
    b, device = x.shape[0], x.device
    area = _uniform(b, scale[0], scale[1], gen, device)
    log_ratio = _uniform(b, math.log(3 / 4), math.log(4 / 3), gen, device)
    ratio = torch.exp(log_ratio)
    # Box sides as fractions of the image side; clamped to the image (torchvision retries
    # instead, which only matters for the few boxes that overflow).
    w = torch.sqrt(area * ratio).clamp(max=1.0)
    h = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = w / 2 + (1 - w) * torch.rand(b, generator=gen, device=device)
    cy = h / 2 + (1 - h) * torch.rand(b, generator=gen, device=device)
    flip = torch.where(_bernoulli(b, flip_prob, gen, device), -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device, dtype=x.dtype)
    # affine_grid maps output coordinates in [-1, 1] to input coordinates: x_in = w*flip*x_out + (2cx-1).
    theta[:, 0, 0] = w * flip
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * cy - 1
    grid = F.affine_grid(theta, [b, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _grayscale(x: Tensor) -> Tensor:
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _hue_rotation(angle: Tensor) -> Tensor:
    """(B, 3, 3) matrices rotating RGB colours by ``angle`` (radians) about the gray axis --
    a hue shift that keeps the luminance axis fixed (Rodrigues' formula, axis (1,1,1)/sqrt 3)."""
    c, s = torch.cos(angle), torch.sin(angle)
    k = 1.0 / 3.0
    sq = math.sqrt(k)
    a = c + (1 - c) * k
    bp = (1 - c) * k + sq * s
    bm = (1 - c) * k - sq * s
    rows = [
        torch.stack([a, bm, bp], dim=-1),
        torch.stack([bp, a, bm], dim=-1),
        torch.stack([bm, bp, a], dim=-1),
    ]
    return torch.stack(rows, dim=-2)


def color_jitter(x: Tensor, strength: float, prob: float, gen: torch.Generator) -> Tensor:
    """SimCLR's jitter of strength s: brightness, contrast, saturation factors in
    [1 - 0.8s, 1 + 0.8s], hue shift in [-0.2s, 0.2s] of a turn, applied with probability ``prob``
    in a fixed order. Single-channel images get brightness and contrast only."""
    b, device = x.shape[0], x.device
    apply = _bernoulli(b, prob, gen, device).view(b, 1, 1, 1)
    k = 0.8 * strength
    brightness = _uniform(b, max(0.0, 1 - k), 1 + k, gen, device).view(b, 1, 1, 1)
    contrast = _uniform(b, max(0.0, 1 - k), 1 + k, gen, device).view(b, 1, 1, 1)
    saturation = _uniform(b, max(0.0, 1 - k), 1 + k, gen, device).view(b, 1, 1, 1)
    hue = _uniform(b, -0.2 * strength, 0.2 * strength, gen, device)
    y = (x * brightness).clamp(0, 1)
    gray_mean = (_grayscale(y) if y.shape[1] == 3 else y).mean(dim=(1, 2, 3), keepdim=True)
    y = ((y - gray_mean) * contrast + gray_mean).clamp(0, 1)
    if y.shape[1] == 3:
        gray = _grayscale(y)
        y = ((y - gray) * saturation + gray).clamp(0, 1)
        rot = _hue_rotation(hue * 2 * math.pi).to(y.dtype)
        y = torch.bmm(rot, y.reshape(b, 3, -1)).view_as(y).clamp(0, 1)
    return torch.where(apply, y, x)


def random_grayscale(x: Tensor, prob: float, gen: torch.Generator) -> Tensor:
    if x.shape[1] != 3:
        return x
    b = x.shape[0]
    apply = _bernoulli(b, prob, gen, x.device).view(b, 1, 1, 1)
    return torch.where(apply, _grayscale(x).expand_as(x), x)


def gaussian_blur(x: Tensor, prob: float, gen: torch.Generator, sigma_range: Tuple[float, float] = (0.1, 2.0)) -> Tensor:
    """Blur with probability ``prob``; sigma ~ U(sigma_range) pixels at a 64-pixel side, scaled
    with the resolution (SimCLR's [0.1, 2] at 224 pixels all but vanishes at 32, where the
    recipe is usually dropped; this keeps a visible blur on small images). Separable, reflect
    padding, kernel radius 2 sigma_max."""
    b, c, h, w = x.shape
    device = x.device
    apply = _bernoulli(b, prob, gen, device).view(b, 1, 1, 1)
    pixels_per_unit = h / 64.0
    sigma = _uniform(b, sigma_range[0], sigma_range[1], gen, device) * pixels_per_unit
    radius = max(1, min(int(math.ceil(2 * sigma_range[1] * pixels_per_unit)), (min(h, w) - 1) // 2))
    offsets = torch.arange(-radius, radius + 1, device=device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (B, K)
    # One group per (image, channel): the batch is folded into the channels of a grouped conv.
    weight = kernel.repeat_interleave(c, dim=0)  # (B*C, K)
    y = x.reshape(1, b * c, h, w)
    y = F.pad(y, (radius, radius, 0, 0), mode="reflect")
    y = F.conv2d(y, weight.view(b * c, 1, 1, -1), groups=b * c)
    y = F.pad(y, (0, 0, radius, radius), mode="reflect")
    y = F.conv2d(y, weight.view(b * c, 1, -1, 1), groups=b * c)
    return torch.where(apply, y.view(b, c, h, w), x)


def random_solarize(x: Tensor, prob: float, gen: torch.Generator, threshold: float = 0.5) -> Tensor:
    b = x.shape[0]
    apply = _bernoulli(b, prob, gen, x.device).view(b, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1.0 - x, x)


def augment(x: Tensor, spec: ViewSpec, gen: torch.Generator) -> Tensor:
    """One view of a batch: (B, C, H, W) floats in [0, 1] -> (B, C, size, size) in [0, 1]."""
    y = random_resized_crop(x, spec.size, spec.scale, spec.flip_prob, gen)
    y = color_jitter(y, spec.jitter_strength, spec.jitter_prob, gen)
    y = random_grayscale(y, spec.grayscale_prob, gen)
    if spec.blur_prob > 0:
        y = gaussian_blur(y, spec.blur_prob, gen)
    if spec.solarize_prob > 0:
        y = random_solarize(y, spec.solarize_prob, gen)
    return y


def make_views(
    image_size: int,
    num_local_crops: int = 0,
    local_crop_size: int = 0,
    crop_scale: Sequence[float] = (0.25, 1.0),
    local_crop_scale: Sequence[float] = (0.05, 0.25),
    jitter_strength: float = 0.5,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_probs: Sequence[float] = (1.0, 0.1),
    solarize_probs: Sequence[float] = (0.0, 0.2),
) -> List[ViewSpec]:
    """Two global views and ``num_local_crops`` small ones. ``blur_probs``/``solarize_probs`` list
    the probabilities of view 1, view 2 and (third entry, if any) the small crops; a shorter
    list repeats its last entry (BYOL's asymmetric recipe by default)."""

    def pick(values: Sequence[float], i: int) -> float:
        return float(values[min(i, len(values) - 1)])

    common = dict(jitter_prob=jitter_prob, jitter_strength=jitter_strength, grayscale_prob=grayscale_prob)
    views = [
        ViewSpec(image_size, tuple(crop_scale), blur_prob=pick(blur_probs, i), solarize_prob=pick(solarize_probs, i), **common)
        for i in range(2)
    ]
    for _ in range(num_local_crops):
        views.append(
            ViewSpec(local_crop_size, tuple(local_crop_scale), blur_prob=pick(blur_probs, 2),
                     solarize_prob=pick(solarize_probs, 2) if len(solarize_probs) > 2 else 0.0, **common)
        )
    return views


class Augmenter:
    """Turns a uint8 batch into normalized float views on the training device."""

    def __init__(self, views: Sequence[ViewSpec], mean: Tensor, std: Tensor, device: torch.device) -> None:
        self.views = list(views)
        self.mean = mean.to(device).view(1, -1, 1, 1)
        self.std = std.to(device).view(1, -1, 1, 1)
        self.device = device

    def to_float(self, images_uint8: Tensor) -> Tensor:
        return images_uint8.to(self.device, non_blocking=True).float().div_(255.0)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def __call__(self, images_uint8: Tensor, gen: torch.Generator) -> List[Tensor]:
        x = self.to_float(images_uint8)
        return [self.normalize(augment(x, spec, gen)) for spec in self.views]
