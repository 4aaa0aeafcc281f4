"""``python -m fastssl.train.eval RUN``: evaluate a trained backbone on a data set of your choice.

Loads ``backbone.pt`` and ``preprocessing.json`` of a run directory (or a ``backbone.pt`` with
its ``preprocessing.json`` beside it), extracts frozen features of the train and held-out
splits of the chosen data set -- by default the run's own -- and reports weighted kNN top-1
and a linear probe (logistic regression on the standardized features), the same protocol as
the training driver's evaluation::

    python -m fastssl.train.eval runs/simclr                          # the run's own data
    python -m fastssl.train.eval runs/simclr --dataset folder --data-path ~/pets
    python -m fastssl.train.eval runs/simclr/backbone.pt --dataset cifar10 --data-path cifar-10-python.tar.gz

Images are resized to the backbone's training size and normalized with the training mean
and std stored in ``preprocessing.json``; the data set must have the same number of channels.
The result is printed and written as JSON (``--output``, default ``RUN/eval-<dataset>.json``).

In Python, :func:`load_backbone` gives the network and its preprocessing:

>>> net, pre = load_backbone("runs/simclr")                  # doctest: +SKIP
>>> x = (images_in_0_1 - torch.tensor(pre["mean"]).view(1, -1, 1, 1)) / torch.tensor(pre["std"]).view(1, -1, 1, 1)  # doctest: +SKIP
>>> features = net.eval()(x)                                 # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from fastssl.train.config import DATASETS, ConfigError
from fastssl.train.data import DataError, infer_dataset, load_dataset

BACKBONE = "backbone.pt"
PREPROCESSING = "preprocessing.json"


def _locate(path: str) -> Tuple[str, str]:
    """(backbone.pt, preprocessing.json) for a run directory or a backbone file."""
    if os.path.isdir(path):
        weights = os.path.join(path, BACKBONE)
    else:
        weights = path
    pre = os.path.join(os.path.dirname(os.path.abspath(weights)), PREPROCESSING)
    if not os.path.isfile(weights):
        raise ConfigError(f"{path}: no {BACKBONE} (a run writes it after its first epoch)")
    if not os.path.isfile(pre):
        raise ConfigError(f"{path}: no {PREPROCESSING} beside {weights}")
    return weights, pre


def load_backbone(path: str, device: str | torch.device = "cpu") -> Tuple[nn.Module, Dict[str, Any]]:
    """The trained backbone of a run (in eval mode) and its preprocessing settings.

    Args:
        path: a run directory, or a ``backbone.pt`` with ``preprocessing.json`` beside it.
    Returns:
        ``(network, preprocessing)``: the network maps (B, C, S, S) normalized images to
        (B, feature_dim) features; ``preprocessing`` holds ``mean``, ``std``, ``image_size``,
        ``channels``, ``backbone``, ``width``, ``feature_dim``.

    >>> net, pre = load_backbone("runs/simclr")      # doctest: +SKIP
    >>> net(torch.zeros(1, pre["channels"], pre["image_size"], pre["image_size"])).shape  # doctest: +SKIP
    torch.Size([1, 128])
    """
    from fastssl.train.models import build_backbone

    weights, pre_path = _locate(path)
    try:
        with open(pre_path, "r", encoding="utf-8") as f:
            pre = json.load(f)
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"{path}: cannot read the backbone files ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    try:
        net = build_backbone(pre["backbone"], int(pre["channels"]), pre.get("width"), int(pre["image_size"]))
        net.load_state_dict(state)
    except (ImportError, KeyError, RuntimeError, ValueError) as e:
        raise ConfigError(f"{path}: the weights do not fit backbone {pre.get('backbone')!r} ({str(e).splitlines()[0][:200]})") from None
    return net.to(device).eval(), pre


def _normalizer(pre: Dict[str, Any], device: torch.device):
    mean = torch.tensor(pre["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std = torch.tensor(pre["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return lambda images: (images.to(device).float().div(255.0) - mean) / std


def evaluate_backbone(
    path: str,
    dataset: Optional[str] = None,
    data_path: Optional[str] = None,
    knn_k: int = 20,
    knn_temperature: float = 0.1,
    probe_steps: int = 300,
    batch_size: int = 512,
    device: str = "cpu",
    test_fraction: float = 0.2,
    seed: int = 0,
    stream: bool = False,
    log=print,
) -> Dict[str, Any]:
    """kNN top-1 and linear-probe top-1 of a run's backbone on ``dataset`` (default: the
    run's own data set, from its ``config.json``). Returns the result dictionary."""
    from fastssl.train import evaluate as ev

    net, pre = load_backbone(path, device)
    run_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    run_cfg: Dict[str, Any] = {}
    cfg_path = os.path.join(run_dir, "config.json")
    if os.path.isfile(cfg_path):
        try:
            with open(cfg_path, "r", encoding="utf-8") as f:
                run_cfg = json.load(f)
        except ValueError:
            run_cfg = {}
    if dataset is None:
        if data_path is not None:
            dataset = infer_dataset(data_path)
        else:
            dataset = run_cfg.get("dataset", "shapes")
            data_path = run_cfg.get("data_path")
    log(f"evaluating {path} ({pre['backbone']}, {pre['feature_dim']} features) on {dataset} ...")
    t0 = time.perf_counter()
    data = load_dataset(
        dataset, data_path, int(pre["image_size"]), int(run_cfg.get("num_train", 4000)), int(run_cfg.get("num_test", 1000)),
        test_fraction, int(run_cfg.get("seed", seed)) if dataset == run_cfg.get("dataset") else seed, stream=stream,
    )
    if data.channels != int(pre["channels"]):
        raise ConfigError(f"the backbone takes {pre['channels']} channel(s), {dataset} has {data.channels}")
    to_input = _normalizer(pre, torch.device(device))
    with torch.no_grad():
        train_feat = ev.extract(net, data.train_images, to_input, batch_size)
        test_feat = ev.extract(net, data.test_images, to_input, batch_size)
    train_labels, test_labels = data.train_labels.to(device), data.test_labels.to(device)
    result: Dict[str, Any] = {
        "backbone": os.path.abspath(path),
        "dataset": dataset,
        "data_path": data_path,
        "num_train": int(train_feat.shape[0]),
        "num_test": int(test_feat.shape[0]),
        "num_classes": len(data.classes),
        "knn_k": knn_k,
        "knn_top1": ev.knn_top1(train_feat, train_labels, test_feat, test_labels, knn_k, knn_temperature),
    }
    if probe_steps > 0:
        train_acc, test_acc = ev.linear_probe(train_feat, train_labels, test_feat, test_labels, probe_steps)
        result.update(linear_probe_top1=test_acc, linear_probe_train_top1=train_acc)
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastssl.train.eval",
        description="kNN and linear-probe accuracy of a trained backbone (a run directory or backbone.pt) on a data set.",
        epilog="examples:\n  python -m fastssl.train.eval runs/simclr\n"
        "  python -m fastssl.train.eval runs/simclr --dataset folder --data-path ~/images --output pets.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("run", help="run directory, or a backbone.pt with preprocessing.json beside it")
    p.add_argument("--dataset", choices=DATASETS, help="data set (default: the run's own; inferred from --data-path)")
    p.add_argument("--data-path", help="folder or CIFAR archive for folder/cifar10/cifar100")
    p.add_argument("--stream", action="store_true", help="folder: decode images batch by batch")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out fraction where the data has no test split")
    p.add_argument("--knn-k", type=int, default=20)
    p.add_argument("--knn-temperature", type=float, default=0.1)
    p.add_argument("--probe-steps", type=int, default=300, help="L-BFGS steps of the linear probe (0: skip)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out split (data without a test split)")
    p.add_argument("--output", help="JSON file for the result (default RUN/eval-<dataset>.json)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = evaluate_backbone(
            args.run, args.dataset, args.data_path, args.knn_k, args.knn_temperature, args.probe_steps, args.batch_size,
            args.device, args.test_fraction, args.seed, args.stream,
        )
    except (ConfigError, DataError) as e:
        print(f"python -m fastssl.train.eval: error: {e}", file=sys.stderr)
        return 2
    run_dir = args.run if os.path.isdir(args.run) else os.path.dirname(os.path.abspath(args.run))
    output = args.output or os.path.join(run_dir, f"eval-{result['dataset']}.json")
    with open(output, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    probe = result.get("linear_probe_top1")
    print(
        f"{result['dataset']}: kNN top-1 {result['knn_top1']:.3f}"
        + (f", linear probe {probe:.3f}" if probe is not None else "")
        + f" ({result['num_train']} train / {result['num_test']} held-out images, {result['num_classes']} classes, "
        f"chance {1 / max(1, result['num_classes']):.2f}) -> {output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
