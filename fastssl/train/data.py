"""Data sets of the driver, all held in memory as uint8 image tensors.

* ``shapes``  -- generated on the fly, no download: ten shape classes (disk, ring, square, frame,
  triangle, diamond, plus, cross, horizontal bars, vertical bars) drawn at a random position
  and size, in a random colour on a random textured background. The class is the shape, which
  survives every augmentation of the driver (crops keep most of the shape, flips map each
  class onto itself, colour jitter and grayscale only touch the colours), while the colours --
  what an untrained network mostly sees -- carry no label information. That makes the gap
  between an untrained and a self-supervised network visible within minutes on a CPU.
* ``digits``  -- scikit-learn's bundled 8x8 handwritten digits (1797 images), upsampled.
* ``folder``  -- an ImageFolder layout ``root/<class>/<image>``, or ``root/train/<class>/...``
  plus ``root/val`` or ``root/test``; decoded once with Pillow and resized, or streamed from
  disk batch by batch (``--stream``, :class:`StreamingImages`) when it does not fit in memory.
* ``cifar10`` / ``cifar100`` -- the python-pickle archives (``data_batch_*``/``test_batch`` or
  ``train``/``test``), as an extracted folder or the ``.tar.gz`` itself.

Every loader returns a :class:`ImageData`: ``(N, C, H, W)`` uint8 images and ``(N,)`` int64
labels for a train and a held-out split.
"""

from __future__ import annotations

import math
import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp")
SHAPE_CLASSES = (
    "disk", "ring", "square", "frame", "triangle", "diamond", "plus", "cross", "hbars", "vbars",
)


class DataError(ValueError):
    """Missing or unreadable data."""


class StreamingImages:
    """Image files decoded on demand, batch by batch: a folder that does not fit in memory.

    Behaves like the ``(N, C, S, S)`` uint8 tensor of an in-memory split where the driver reads
    it (``len``, ``shape``, :func:`take`): each request decodes its files with Pillow (resized
    and centre-cropped as :func:`load_image_folder` does) in a pool of threads -- Pillow
    releases the GIL while decoding, so the threads decode in parallel.

    >>> images = StreamingImages(["a.png", "b.png"], image_size=64)   # doctest: +SKIP
    >>> take(images, torch.tensor([1, 0])).shape                      # doctest: +SKIP
    torch.Size([2, 3, 64, 64])
    """

    def __init__(self, paths: Sequence[str], image_size: int, channels: int = 3, workers: int = 4) -> None:
        self.paths = list(paths)
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.workers = max(1, int(workers))
        self._pool = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> Tuple[int, int, int, int]:
        return (len(self.paths), self.channels, self.image_size, self.image_size)

    def _decode(self, index: int):
        path = self.paths[index]
        try:
            return _read_image(path, self.image_size, self.channels)
        except Exception as e:
            raise DataError(f"cannot decode image {path}: {e}") from None

    def gather(self, indices: Sequence[int]) -> Tensor:
        """uint8 (len(indices), C, S, S) images, decoded now."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers)
        arrays = list(self._pool.map(self._decode, [int(i) for i in indices]))
        if not arrays:
            return torch.empty(0, self.channels, self.image_size, self.image_size, dtype=torch.uint8)
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()

    def __getstate__(self):  # the thread pool does not pickle
        state = dict(self.__dict__)
        state["_pool"] = None
        return state


def take(images, indices: Tensor, device: Optional[torch.device] = None) -> Tensor:
    """``images[indices]`` on ``device`` for an in-memory uint8 tensor or a
    :class:`StreamingImages` (decoded on the CPU, then moved)."""
    if isinstance(images, StreamingImages):
        out = images.gather(indices.tolist())
        return out if device is None else out.to(device, non_blocking=True)
    out = images[indices.to(images.device)]
    return out if device is None else out.to(device, non_blocking=True)


def num_images(images) -> int:
    return int(images.shape[0])


@dataclass
class ImageData:
    """Train and held-out splits, uint8 (N, C, H, W) images with int64 labels. The image
    splits are tensors, or :class:`StreamingImages` for a streamed folder."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: List[str]

    @property
    def channels(self) -> int:
        return int(self.train_images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def streaming(self) -> bool:
        return isinstance(self.train_images, StreamingImages)

    def channel_stats(self, max_images: int = 2048) -> Tuple[Tensor, Tensor]:
        """Per-channel mean and std of the training images in [0, 1] (for normalization); from
        an evenly spaced sample of ``max_images`` images when streaming."""
        if self.streaming:
            n = len(self.train_images)
            picks = torch.linspace(0, n - 1, min(n, max_images)).round().long().unique()
            x = take(self.train_images, picks).float().div_(255.0)
        else:
            x = self.train_images.float().div_(255.0)
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return mean, std


# ---------------------------------------------------------------------------------------------
# Generated shapes
# ---------------------------------------------------------------------------------------------


def _inside(cls: int, u: Tensor, v: Tensor) -> Tensor:
    """Signed "inside-ness" of shape ``cls`` (positive inside) at coordinates ``u, v`` measured from
    the shape's centre in units of its half-size. Every shape is symmetric under u -> -u, so a
    horizontal flip keeps the class."""
    au, av = u.abs(), v.abs()
    cheb = torch.maximum(au, av)
    thick = 0.4
    if cls in (0, 1):
        rad = torch.sqrt(u * u + v * v)
        return 1 - rad if cls == 0 else torch.minimum(1 - rad, rad - (1 - thick))
    if cls == 2:
        return 0.85 - cheb
    if cls == 3:
        return torch.minimum(0.85 - cheb, cheb - (0.85 - thick))
    if cls == 4:
        # Upward triangle, apex at v = -0.9, base at v = +0.9: below the base and within the
        # slanted edges |u| <= (v + 0.9) / 2.
        return torch.minimum(0.9 - v, (v + 0.9) * 0.5 - au)
    if cls == 5:
        return 1 - (au + av)
    if cls == 6:
        return torch.minimum(1 - cheb, torch.maximum(thick * 0.6 - au, thick * 0.6 - av))
    if cls == 7:
        return torch.minimum(1 - cheb, thick * 0.5 - (au - av).abs() / math.sqrt(2.0))
    if cls == 8:
        return torch.minimum(0.9 - cheb, 0.5 * torch.cos(v * math.pi * 2.0))
    return torch.minimum(0.9 - cheb, 0.5 * torch.cos(u * math.pi * 2.0))


def generate_shapes(
    num_train: int, num_test: int, image_size: int = 32, seed: int = 0, chunk: int = 2048
) -> ImageData:
    """The ``shapes`` data set: RGB uint8 images (N, 3, S, S), balanced labels in [0, 10).

    Deterministic in ``seed`` (its own generator; the global RNG is left untouched).
    """
    gen = torch.Generator().manual_seed(10_007 + seed)
    total = num_train + num_test
    labels = torch.arange(total) % len(SHAPE_CLASSES)
    labels = labels[torch.randperm(total, generator=gen)]
    images = torch.empty(total, 3, image_size, image_size, dtype=torch.uint8)
    for start in range(0, total, chunk):
        lab = labels[start : start + chunk]
        n = lab.shape[0]
        mask = _shape_masks(lab, image_size, gen).unsqueeze(1)
        # Background: a random colour plus smooth random texture (low-resolution noise upsampled).
        bg = torch.rand(n, 3, 1, 1, generator=gen) * 0.6
        low = torch.rand(n, 3, 4, 4, generator=gen) - 0.5
        texture = F.interpolate(low, size=(image_size, image_size), mode="bilinear", align_corners=False)
        bg = (bg + 0.35 * texture).clamp(0, 1)
        # Foreground colour at a distance from the mean background so the shape stays visible.
        fg = torch.rand(n, 3, 1, 1, generator=gen)
        too_close = (fg - bg.mean(dim=(2, 3), keepdim=True)).abs().mean(dim=1, keepdim=True) < 0.25
        fg = torch.where(too_close, 1.0 - fg, fg)
        img = mask * fg + (1 - mask) * bg
        img = img + 0.03 * torch.randn(img.shape, generator=gen)
        images[start : start + n] = (img.clamp(0, 1) * 255).round().to(torch.uint8)
    return ImageData(
        images[:num_train], labels[:num_train].clone(), images[num_train:], labels[num_train:].clone(),
        list(SHAPE_CLASSES),
    )


def _shape_masks(labels: Tensor, size: int, gen: torch.Generator) -> Tensor:
    """Soft (anti-aliased) masks (N, size, size) in [0, 1] of each label's shape, at a random
    centre and half-size (a fraction of the image side)."""
    n = labels.shape[0]
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    radius = 0.2 + 0.12 * torch.rand(n, generator=gen)
    cx = radius + (1 - 2 * radius) * torch.rand(n, generator=gen)
    cy = radius + (1 - 2 * radius) * torch.rand(n, generator=gen)
    r = radius.view(n, 1, 1)
    u = (xx.unsqueeze(0) - cx.view(n, 1, 1)) / r
    v = (yy.unsqueeze(0) - cy.view(n, 1, 1)) / r
    sdf = torch.empty_like(u)
    for cls in range(len(SHAPE_CLASSES)):
        sel = (labels == cls).nonzero().squeeze(1)
        if sel.numel():
            sdf[sel] = _inside(cls, u[sel], v[sel])
    pixel = (1.0 / size) / r
    return (sdf / pixel + 0.5).clamp(0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------------------------


def _split(images: Tensor, labels: Tensor, test_fraction: float, seed: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(20_011 + seed)
    perm = torch.randperm(images.shape[0], generator=gen)
    n_test = max(1, int(round(images.shape[0] * test_fraction)))
    if n_test >= images.shape[0]:
        raise DataError(f"cannot hold out {n_test} of {images.shape[0]} images for evaluation")
    test, train = perm[:n_test], perm[n_test:]
    return images[train], labels[train], images[test], labels[test]


def _resize_uint8(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x.round().clamp(0, 255).to(torch.uint8)


def load_digits(image_size: int = 16, test_fraction: float = 0.2, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits (values 0..16) as 1-channel uint8 images, resized."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise DataError("--dataset digits needs scikit-learn (pip install scikit-learn)") from None
    bunch = sk_load_digits()
    images = torch.from_numpy(np.asarray(bunch.images, dtype=np.float32) * (255.0 / 16.0)).round()
    images = images.to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    images = _resize_uint8(images, image_size)
    tr, trl, te, tel = _split(images, labels, test_fraction, seed)
    return ImageData(tr, trl, te, tel, [str(i) for i in range(10)])


# ---------------------------------------------------------------------------------------------
# ImageFolder
# ---------------------------------------------------------------------------------------------


def _list_class_dirs(root: str) -> List[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


def _read_image(path: str, size: int, channels: int):
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        w, h = im.size
        # Resize the shorter side to `size`, then centre-crop to a square.
        scale = size / min(w, h)
        nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
        im = im.resize((nw, nh), Image.BILINEAR)
        left, top = (nw - size) // 2, (nh - size) // 2
        im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def _list_folder_split(root: str, classes: Sequence[str]) -> Tuple[List[str], List[int]]:
    paths, labels = [], []
    for index, name in enumerate(classes):
        folder = os.path.join(root, name)
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_file() and entry.name.lower().endswith(IMAGE_EXTENSIONS):
                paths.append(entry.path)
                labels.append(index)
    if not paths:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}/<class>/")
    return paths, labels


def _load_folder_split(root: str, classes: Sequence[str], size: int, channels: int, stream: bool = False):
    paths, labels = _list_folder_split(root, classes)
    images = StreamingImages(paths, size, channels)
    if not stream:
        images = images.gather(range(len(paths)))
    return images, torch.tensor(labels, dtype=torch.int64)


def _split_streaming(images: StreamingImages, labels: Tensor, test_fraction: float, seed: int):
    index = torch.arange(len(images))
    tr, trl, te, tel = _split(index, labels, test_fraction, seed)
    pick = lambda idx: StreamingImages([images.paths[i] for i in idx.tolist()], images.image_size, images.channels, images.workers)
    return pick(tr), trl, pick(te), tel


def load_image_folder(
    root: str, image_size: int = 64, test_fraction: float = 0.2, seed: int = 0, channels: int = 3, stream: bool = False
) -> ImageData:
    """Images under ``root/<class>/`` (held-out split drawn at random), or under
    ``root/train/<class>/`` with ``root/val/`` or ``root/test/`` as the held-out split.

    Every image is decoded once, resized (shorter side) and centre-cropped to ``image_size``;
    with ``stream`` only the file list is read now and images are decoded batch by batch
    (:class:`StreamingImages`).
    """
    if not os.path.isdir(root):
        raise DataError(f"--data-path {root!r} is not a directory")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("--dataset folder decodes images with Pillow, which is not installed (pip install pillow)") from None
    held_out = next((s for s in ("val", "test") if os.path.isdir(os.path.join(root, s))), None)
    if os.path.isdir(os.path.join(root, "train")) and held_out is not None:
        train_root, test_root = os.path.join(root, "train"), os.path.join(root, held_out)
        classes = _list_class_dirs(train_root)
        if not classes:
            raise DataError(f"no class folders under {train_root}")
        tr, trl = _load_folder_split(train_root, classes, image_size, channels, stream)
        te, tel = _load_folder_split(test_root, classes, image_size, channels, stream)
        return ImageData(tr, trl, te, tel, classes)
    classes = _list_class_dirs(root)
    if not classes:
        raise DataError(f"no class folders under {root} (expected {root}/<class>/<image>)")
    images, labels = _load_folder_split(root, classes, image_size, channels, stream)
    if stream:
        tr, trl, te, tel = _split_streaming(images, labels, test_fraction, seed)
    else:
        tr, trl, te, tel = _split(images, labels, test_fraction, seed)
    return ImageData(tr, trl, te, tel, classes)


# ---------------------------------------------------------------------------------------------
# CIFAR archives (python pickle format)
# ---------------------------------------------------------------------------------------------


def _unpickle(blob: bytes, name: str) -> Dict:
    try:
        return pickle.loads(blob, encoding="bytes")
    except Exception as e:
        raise DataError(f"{name} is not a CIFAR python-pickle batch: {e}") from None


def _cifar_files(path: str) -> Dict[str, bytes]:
    """Basename -> bytes of every regular file of a CIFAR folder (searched two levels deep) or
    .tar.gz archive. Only files with CIFAR batch names are read."""
    wanted = lambda name: name.startswith("data_batch_") or name in ("test_batch", "train", "test", "meta", "batches.meta")
    out: Dict[str, bytes] = {}
    if os.path.isdir(path):
        for dirpath, dirnames, filenames in os.walk(path):
            if dirpath[len(path):].count(os.sep) > 2:
                dirnames[:] = []
                continue
            for name in filenames:
                if wanted(name) and name not in out:
                    with open(os.path.join(dirpath, name), "rb") as f:
                        out[name] = f.read()
        return out
    if os.path.isfile(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                for member in tar.getmembers():
                    name = os.path.basename(member.name)
                    if member.isfile() and wanted(name) and name not in out:
                        fobj = tar.extractfile(member)
                        if fobj is not None:
                            out[name] = fobj.read()
        except tarfile.TarError as e:
            raise DataError(f"{path} is neither a folder nor a readable tar archive: {e}") from None
        return out
    raise DataError(f"--data-path {path!r} does not exist")


def _cifar_arrays(batches: Sequence[Tuple[str, Dict]], label_key: bytes) -> Tuple[Tensor, Tensor]:
    data, labels = [], []
    for name, batch in batches:
        if b"data" not in batch or label_key not in batch:
            raise DataError(f"{name} has no {label_key.decode()!r} entry: wrong CIFAR variant?")
        data.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(data)), torch.from_numpy(np.concatenate(labels))


def load_cifar(path: str, variant: str = "cifar10", image_size: int = 32) -> ImageData:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``; fine labels)
    from an extracted folder or the original ``.tar.gz``."""
    files = _cifar_files(path)
    if variant == "cifar10":
        train_names = sorted(n for n in files if n.startswith("data_batch_"))
        test_names = ["test_batch"] if "test_batch" in files else []
        label_key, meta_name, meta_key = b"labels", "batches.meta", b"label_names"
    else:
        train_names = ["train"] if "train" in files else []
        test_names = ["test"] if "test" in files else []
        label_key, meta_name, meta_key = b"fine_labels", "meta", b"fine_label_names"
    if not train_names or not test_names:
        expected = "data_batch_* and test_batch" if variant == "cifar10" else "train and test"
        raise DataError(f"{path}: no {variant} batches found (expected python-pickle files {expected})")
    tr, trl = _cifar_arrays([(n, _unpickle(files[n], n)) for n in train_names], label_key)
    te, tel = _cifar_arrays([(n, _unpickle(files[n], n)) for n in test_names], label_key)
    num_classes = int(max(trl.max(), tel.max())) + 1
    classes = [str(i) for i in range(num_classes)]
    if meta_name in files:
        meta = _unpickle(files[meta_name], meta_name)
        names = meta.get(meta_key)
        if names and len(names) >= num_classes:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return ImageData(_resize_uint8(tr, image_size), trl, _resize_uint8(te, image_size), tel, classes)


# ---------------------------------------------------------------------------------------------
# Entry point and batching
# ---------------------------------------------------------------------------------------------

DEFAULT_IMAGE_SIZE = {"shapes": 32, "digits": 16, "folder": 64, "cifar10": 32, "cifar100": 32}
_CIFAR10_NAMES = ("data_batch_1", "test_batch")
_CIFAR100_NAMES = ("train", "test")


def infer_dataset(path: str) -> str:
    """What ``--data-path`` holds when no ``--dataset`` is given: ``cifar10`` / ``cifar100`` for
    python-pickle CIFAR batches (folder or tar archive), ``folder`` for class subfolders.

    Raises:
        DataError: the path does not exist or holds neither.
    """
    if not os.path.exists(path):
        raise DataError(f"--data-path {path!r} does not exist")
    names: List[str] = []
    if os.path.isfile(path):
        try:
            with tarfile.open(path, "r:*") as tar:
                names = [os.path.basename(m.name) for m in tar.getmembers() if m.isfile()]
        except tarfile.TarError:
            raise DataError(f"--data-path {path!r} is a file but not a tar archive: pass --dataset") from None
    else:
        for dirpath, dirnames, filenames in os.walk(path):
            if dirpath[len(path):].count(os.sep) >= 2:
                dirnames[:] = []
            names += filenames
            if len(names) > 10_000:
                break
    if all(n in names for n in _CIFAR10_NAMES):
        return "cifar10"
    if all(n in names for n in _CIFAR100_NAMES) and "meta" in names:
        return "cifar100"
    if os.path.isdir(path) and _list_class_dirs(path):
        return "folder"
    raise DataError(
        f"cannot tell what --data-path {path!r} holds (no CIFAR batches, no class folders): pass --dataset"
    )


def load_dataset(
    name: str,
    data_path: Optional[str] = None,
    image_size: Optional[int] = None,
    num_train: int = 4000,
    num_test: int = 1000,
    test_fraction: float = 0.2,
    seed: int = 0,
    stream: bool = False,
) -> ImageData:
    """Load (or generate) the named data set; see the module docstring. ``stream`` (folder
    only) decodes images batch by batch instead of holding them in memory."""
    size = image_size or DEFAULT_IMAGE_SIZE[name]
    if name == "shapes":
        return generate_shapes(num_train, num_test, size, seed)
    if name == "digits":
        return load_digits(size, test_fraction, seed)
    if data_path is None:
        raise DataError(f"--dataset {name} needs --data-path")
    if not os.path.exists(data_path):
        raise DataError(f"--data-path {data_path!r} does not exist")
    if name == "folder":
        return load_image_folder(data_path, size, test_fraction, seed, stream=stream)
    if name in ("cifar10", "cifar100"):
        return load_cifar(data_path, name, size)
    raise DataError(f"unknown dataset {name!r}")


def steps_per_epoch(num_images: int, batch_size: int, world_size: int = 1) -> int:
    """Full global batches per epoch (the incomplete last one is dropped, as every rank must
    see the same number of equal-sized batches)."""
    return num_images // (batch_size * world_size)


def epoch_batches(
    num_images: int, batch_size: int, generator: torch.Generator, rank: int = 0, world_size: int = 1
) -> Iterator[Tensor]:
    """Indices of this rank's batches for one epoch.

    One permutation per epoch, drawn from ``generator`` (seeded identically on every rank), is
    cut into global batches of ``batch_size * world_size``; rank r takes the r-th slice of each,
    so the ranks' batches are disjoint and together cover every used image once (the
    DistributedSampler scheme, with drop_last).
    """
    perm = torch.randperm(num_images, generator=generator)
    global_batch = batch_size * world_size
    for step in range(steps_per_epoch(num_images, batch_size, world_size)):
        start = step * global_batch + rank * batch_size
        yield perm[start : start + batch_size]
