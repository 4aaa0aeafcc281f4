"""Configuration of a pretraining run: defaults, command line, config files, validation.

Precedence: the defaults of :class:`TrainConfig` < a ``--config`` file (YAML or JSON) < flags
given on the command line. With ``--resume DIR`` the run's own ``config.json`` takes the place
of the defaults, and only the flags given explicitly override it.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

METHODS = (
    "simclr",
    "moco",
    "byol",
    "simsiam",
    "barlow_twins",
    "vicreg",
    "swav",
    "wmse",
    "dino",
    "center_penalty",
)
DATASETS = ("shapes", "digits", "folder", "cifar10", "cifar100")
BACKBONES = ("tiny_cnn", "resnet18", "resnet10")
OPTIMIZERS = ("sgd", "lars", "adamw")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# Methods that keep an EMA copy of the network (target / key encoder / teacher).
EMA_METHODS = ("byol", "moco", "dino")
# Methods with a predictor head on the online branch.
PREDICTOR_METHODS = ("byol", "simsiam")


class ConfigError(ValueError):
    """A flag, a config file entry or a combination of them that the driver cannot run."""


@dataclass
class TrainConfig:
    """Every setting of a run. ``None`` means "the method's or data set's own default"."""

    # what to train
    method: str = "simclr"
    dataset: str = "shapes"
    data_path: Optional[str] = None
    backbone: str = "tiny_cnn"
    width: Optional[int] = None
    image_size: Optional[int] = None
    num_train: int = 4000
    num_test: int = 1000
    test_fraction: float = 0.2
    stream: bool = False
    # schedule and optimizer (None: the method's recipe, see METHOD_DEFAULTS)
    epochs: Optional[int] = None
    batch_size: int = 128
    optimizer: Optional[str] = None
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    momentum: float = 0.9
    warmup_epochs: Optional[float] = None
    min_lr_fraction: float = 0.0
    ema_momentum: Optional[float] = None
    predictor_lr_scale: Optional[float] = None
    predictor_constant_lr: Optional[bool] = None
    # heads and loss
    proj_dim: Optional[int] = None
    proj_hidden_dim: Optional[int] = None
    no_predictor: bool = False
    no_stop_gradient: bool = False
    no_centering: bool = False
    loss_args: Dict[str, Any] = field(default_factory=dict)
    prototypes: Optional[int] = None
    queue_size: Optional[int] = None
    freeze_prototypes_epochs: Optional[int] = None
    # augmentations
    num_local_crops: Optional[int] = None
    local_crop_size: Optional[int] = None
    crop_scale: Optional[Sequence[float]] = None
    local_crop_scale: Sequence[float] = (0.05, 0.25)
    jitter_strength: Optional[float] = None
    jitter_prob: Optional[float] = None
    grayscale_prob: Optional[float] = None
    blur_probs: Optional[Sequence[float]] = None
    solarize_probs: Sequence[float] = (0.0, 0.2)
    # evaluation
    knn_k: int = 20
    knn_temperature: float = 0.1
    probe_steps: int = 300
    eval_batch_size: int = 512
    # infrastructure
    output_dir: Optional[str] = None
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    backend: str = "auto"
    threads: Optional[int] = None
    resume: Optional[str] = None
    stop_after: Optional[int] = None
    progress: str = "auto"
    plots: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "fastssl"

    def __post_init__(self) -> None:
        apply_method_defaults(self)

    def to_dict(self) -> Dict[str, Any]:
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


# Each method's recipe: the settings it uses when neither the command line nor a config file
# sets them (``None`` in :class:`TrainConfig`). ``python -m fastssl.train --method M`` alone
# runs this recipe; docs/training.md tables what each one reaches. Entries are chosen for the
# default budget (a few hundred steps on a CPU) and explained where they depart from a paper.
GENERIC_DEFAULTS: Dict[str, Any] = {
    "epochs": 5,
    "optimizer": "adamw",
    "warmup_epochs": 1.0,
    "freeze_prototypes_epochs": 0,
    "queue_size": 0,
    "predictor_lr_scale": 1.0,
    "predictor_constant_lr": False,
    # SimCLR's augmentations (colour strength 0.5, as in its CIFAR recipe) with BYOL's
    # asymmetric blur.
    "crop_scale": (0.25, 1.0),
    "jitter_strength": 0.5,
    "jitter_prob": 0.8,
    "grayscale_prob": 0.2,
    "blur_probs": (1.0, 0.1),
}
# Augmentations of the methods without negatives or a variance term (BYOL, SimSiam, center
# penalty): they learn what the two views share, and with the generic augmentations that is
# the colour. An untrained network's features tell the images' mean colour (8 bins: each
# channel above or below half) at kNN 0.78 and their shape at 0.24; these methods amplified
# the colour and lost the shape (linear probe 0.45 -> 0.41 after BYOL's first epoch, kNN below
# the untrained network's). Here the colour is made unreliable (jitter on every view at
# strength 1, grayscale 0.4) and the shape reliable (crops of at least 60 % of the image, no
# blur: solo-learn's CIFAR recipes drop it too); docs/training.md has the measurements.
INVARIANCE_AUGMENTATIONS: Dict[str, Any] = {
    "crop_scale": (0.6, 1.0),
    "jitter_strength": 1.0,
    "jitter_prob": 1.0,
    "grayscale_prob": 0.4,
    "blur_probs": (0.0, 0.0),
}
METHOD_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "simclr": {},
    "moco": {"ema_momentum": 0.99},
    # Ten epochs: the EMA target moves slowly, and with five the run was still rising when the
    # learning rate reached zero (kNN 0.28, 0.30, 0.31 over epochs 3-5). A faster target (base
    # momentum 0.9) or a 10x predictor learning rate did not learn faster (0.25, 0.27 at epoch 3).
    "byol": {"ema_momentum": 0.99, "epochs": 10, **INVARIANCE_AUGMENTATIONS},
    # The predictor at 10x the learning rate, held at its peak: Jha et al. (2024, App. B.4)
    # find SimSiam's stability tied to a predictor that adapts fast (SimSiam's own recipe keeps
    # its lr constant). With AdamW at 1x the embeddings fell into 2 dimensions (kNN 0.21).
    "simsiam": {**INVARIANCE_AUGMENTATIONS, "predictor_lr_scale": 10.0, "predictor_constant_lr": True},
    "barlow_twins": {},
    "vicreg": {},
    # Fixed prototypes (frozen for any run shorter than a million epochs: learned from the start
    # they turned orthogonal to the embeddings and every score went flat; Caron et al. 2020 find
    # fixed random prototypes nearly as good), no small crops (crops of 5-25 % of a 32 px image
    # mostly miss the shape, and two of the three predictions of each code came from them:
    # kNN 0.19 after two epochs with them, 0.37 without), and the colour-unreliable
    # augmentations (with the generic ones the codes follow the colour: kNN 0.19).
    # The head (output BatchNorm, K >= 4 d prototypes) is in fastssl/train/methods.py.
    "swav": {**INVARIANCE_AUGMENTATIONS, "num_local_crops": 0, "freeze_prototypes_epochs": 1_000_000},
    "wmse": {},
    # No small crops: crops of 5-25 % of a 32 px image mostly miss the shape, and four of the
    # six teacher-student pairs came from them (kNN after three epochs 0.24 with them, 0.38
    # without). Colour-unreliable augmentations: with the generic ones the teacher's targets
    # follow the colour (0.27 after three epochs). Fifteen epochs: schedules of 5, 10 and 15
    # epochs end at 0.38, 0.52 and 0.67 (another seed: 0.36 after 10, 0.40 after 15).
    # Teacher momentum 0.99 and lr 2e-3 (0.996 and 4e-3 gave the same after three epochs).
    # The head's hidden BatchNorm is in fastssl/train/methods.py.
    "dino": {
        **INVARIANCE_AUGMENTATIONS, "num_local_crops": 0, "epochs": 15, "ema_momentum": 0.99, "lr": 2e-3,
        "freeze_prototypes_epochs": 1,
    },
    "center_penalty": {**INVARIANCE_AUGMENTATIONS},
}


def apply_method_defaults(cfg: "TrainConfig") -> None:
    """Fill every unset (``None``) setting from the method's recipe, then the generic defaults;
    the recipe's ``loss_args`` go under the user's. Idempotent (a stored config.json is already
    complete). Unknown methods are left for :func:`validate` to report."""
    recipe = METHOD_DEFAULTS.get(cfg.method, {})
    for key, value in recipe.items():
        if key == "loss_args":
            continue
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    for key, value in GENERIC_DEFAULTS.items():
        if getattr(cfg, key) is None:
            setattr(cfg, key, value)
    if isinstance(cfg.loss_args, dict) and recipe.get("loss_args"):
        merged = dict(recipe["loss_args"])
        merged.update(cfg.loss_args)
        cfg.loss_args = merged


FIELD_NAMES = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Settings that describe an invocation rather than the run itself: never taken from a stored
# config.json when resuming.
_INVOCATION_ONLY = ("resume", "stop_after")


# ---------------------------------------------------------------------------------------------
# Parsing helpers
# ---------------------------------------------------------------------------------------------


def parse_literal(text: str) -> Any:
    """A ``--loss-arg`` value: a Python literal (``0``, ``1e-3``, ``True``, ``(4096, 128)``), or
    the text itself when it is not one (``whitening=zca``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_loss_args(items: Sequence[str]) -> Dict[str, Any]:
    """``["mu_param=0", "temperature=0.2"]`` -> ``{"mu_param": 0, "temperature": 0.2}``."""
    out: Dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--loss-arg expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key.isidentifier():
            raise ConfigError(f"--loss-arg key must be an argument name, got {key!r}")
        out[key] = parse_literal(value.strip())
    return out


def load_config_file(path: str) -> Dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or JSON file of settings; keys use the flag names with
    underscores or dashes (``batch_size`` or ``batch-size``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, "r", encoding="utf-8") as f:
        text = f.read()
    if path.endswith((".yaml", ".yml")):
        try:
            import yaml
        except ImportError:
            raise ConfigError(
                f"{path} is YAML but PyYAML is not installed (pip install pyyaml), or use JSON"
            ) from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON ({e}); YAML files must end in .yaml or .yml") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of settings, got {type(data).__name__}")
    out: Dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name == "loss_arg":
            name = "loss_args"
        if name not in FIELD_NAMES or name == "resume":
            raise ConfigError(f"{path}: unknown setting {key!r}")
        out[name] = value
    if isinstance(out.get("loss_args"), list):
        out["loss_args"] = parse_loss_args(out["loss_args"])
    return out


def _probability_list(text: str) -> List[float]:
    return [float(v) for v in text.split(",")]


RECIPES = """recipes:
  python -m fastssl.train                                    SimCLR on generated shapes, CPU, minutes
  python -m fastssl.train --method vicreg                    any method, with its recipe (docs/training.md: what each reaches)
  python -m fastssl.train --data-path ~/images               your ImageFolder (root/<class>/<image>)
  python -m fastssl.train --data-path cifar-10-python.tar.gz --backbone resnet18 --epochs 200
  python -m fastssl.train --data-path /big/folder --stream   decode from disk batch by batch
  python -m fastssl.train --backbone timm:vit_tiny_patch16_224 --image-size 32
  python -m fastssl.train --method vicreg --loss-arg mu_param=0   a collapse ablation
  python -m fastssl.train --resume runs/simclr-...           continue an interrupted run
  torchrun --nproc_per_node 8 -m fastssl.train --method dino --backbone resnet18 ...
afterwards:
  python -m fastssl.train.eval RUN_DIR --data-path OTHER     kNN + linear probe of the backbone
  python -m fastssl.train.experiments collapse               the collapse experiments, report + plots
  tensorboard --logdir runs                                  when tensorboard is installed
"""


def build_parser() -> argparse.ArgumentParser:
    """The command line. Every default is ``SUPPRESS`` so that explicitly given flags can be told
    apart from defaults (they override a config file and a resumed run's settings)."""
    p = argparse.ArgumentParser(
        prog="python -m fastssl.train",
        description="Self-supervised pretraining with fastssl's losses: kNN accuracy and collapse "
        "metrics after every epoch, checkpoints, plots. See docs/training.md.",
        argument_default=argparse.SUPPRESS,
        epilog=RECIPES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = TrainConfig()
    g = p.add_argument_group("what to train")
    g.add_argument("--method", choices=METHODS, help=f"SSL method (default {d.method})")
    g.add_argument("--dataset", choices=DATASETS, help=f"data set (default {d.dataset}: generated, no download)")
    g.add_argument("--data-path", help="image folder (ImageFolder layout) or CIFAR archive/folder; without --dataset the "
                   "kind is inferred (CIFAR batches -> cifar10/cifar100, else folder)")
    g.add_argument("--backbone", help=f"encoder: {', '.join(BACKBONES)} (default {d.backbone}), or timm:NAME / "
                   "torchvision:NAME when timm / torchvision is installed (e.g. timm:vit_tiny_patch16_224)")
    g.add_argument("--width", type=int, help="base channel width of the backbone (default: 16 tiny_cnn, 64 resnets)")
    g.add_argument("--image-size", type=int, help="side of the training images (default: the data set's)")
    g.add_argument("--num-train", type=int, help=f"images generated for training (shapes; default {d.num_train})")
    g.add_argument("--num-test", type=int, help=f"held-out images generated (shapes; default {d.num_test})")
    g.add_argument("--test-fraction", type=float, help="held-out fraction where the data has no test split")
    g.add_argument("--stream", action="store_true", help="folder: decode images from disk batch by batch instead of "
                   "holding them in memory (for folders larger than memory)")
    g = p.add_argument_group("optimization")
    g.add_argument("--epochs", type=int, help="training epochs (default per method, 5 for most)")
    g.add_argument("--batch-size", type=int, help=f"images per step and process (default {d.batch_size})")
    g.add_argument("--optimizer", choices=OPTIMIZERS, help="default per method (adamw for most)")
    g.add_argument("--lr", type=float, help="peak learning rate for a global batch of 256, scaled linearly (default per optimizer)")
    g.add_argument("--weight-decay", type=float, help="default per optimizer")
    g.add_argument("--momentum", type=float, help="SGD/LARS momentum (default 0.9)")
    g.add_argument("--warmup-epochs", type=float, help="linear warm-up before the cosine decay (default per method, 1 for most)")
    g.add_argument("--min-lr-fraction", type=float, help="final lr as a fraction of the peak (default 0)")
    g.add_argument("--ema-momentum", type=float, help="base EMA momentum of the target/teacher (BYOL/MoCo/DINO), raised to 1 on a cosine")
    g.add_argument("--predictor-lr-scale", type=float, help="learning rate of the predictor (BYOL/SimSiam) relative to the rest")
    g.add_argument("--predictor-constant-lr", action="store_true", default=argparse.SUPPRESS,
                   help="keep the predictor's learning rate at its peak (SimSiam's recipe: no warm-up, no decay)")
    g = p.add_argument_group("heads, loss, ablations")
    g.add_argument("--proj-dim", type=int, help="projector output dimension (default per method)")
    g.add_argument("--proj-hidden-dim", type=int, help="projector hidden dimension (default per method)")
    g.add_argument("--no-predictor", action="store_true", help="SimSiam/BYOL without the predictor head (collapse ablation)")
    g.add_argument("--no-stop-gradient", action="store_true", help="SimSiam/BYOL without the stop-gradient on the targets (collapse ablation)")
    g.add_argument("--no-centering", action="store_true", help="DINO without the teacher centering (collapse ablation)")
    g.add_argument("--loss-arg", dest="loss_arg", action="append", metavar="KEY=VALUE",
                   help="any loss constructor argument, value parsed as a Python literal; repeatable (e.g. --loss-arg mu_param=0)")
    g.add_argument("--prototypes", type=int, help="SwAV prototypes / DINO output dimension (default scaled to the data)")
    g.add_argument("--queue-size", type=int, help="SwAV queue length (0: no queue)")
    g.add_argument("--freeze-prototypes-epochs", type=int, help="SwAV/DINO: epochs with frozen prototypes / last layer (default per method)")
    g = p.add_argument_group("augmentations")
    g.add_argument("--num-local-crops", type=int, help="small crops besides the two global views (default: the method's recipe, 0 in every recipe; "
                   "2 for dino/swav when a recipe leaves it unset)")
    g.add_argument("--local-crop-size", type=int, help="side of the small crops (default 3/7 of the image)")
    g.add_argument("--crop-scale", type=_probability_list, help="area range of the global crops, e.g. 0.25,1")
    g.add_argument("--local-crop-scale", type=_probability_list, help="area range of the small crops, e.g. 0.05,0.25")
    g.add_argument("--jitter-strength", type=float, help="color-jitter strength s (brightness/contrast/saturation 0.8s, hue 0.2s)")
    g.add_argument("--jitter-prob", type=float, help="probability of color jitter")
    g.add_argument("--grayscale-prob", type=float, help="probability of grayscale")
    g.add_argument("--blur-probs", type=_probability_list, help="blur probability of view 1, view 2 (and the small crops), e.g. 1,0.1")
    g.add_argument("--solarize-probs", type=_probability_list, help="solarization probability per view, e.g. 0,0.2")
    g = p.add_argument_group("evaluation")
    g.add_argument("--knn-k", type=int, help="neighbours of the weighted kNN (default 20, capped by the bank)")
    g.add_argument("--knn-temperature", type=float, help="temperature of the kNN vote weights (default 0.1)")
    g.add_argument("--probe-steps", type=int, help="full-batch steps of the final linear probe (0: skip)")
    g.add_argument("--eval-batch-size", type=int, help="batch for feature extraction")
    g = p.add_argument_group("run")
    g.add_argument("--config", help="YAML or JSON file of settings; flags given here override it")
    g.add_argument("--output-dir", help="where to write (default runs/<method>-<timestamp>)")
    g.add_argument("--seed", type=int, help="seed of the data generation, initialization, order and augmentations")
    g.add_argument("--device", choices=DEVICES, help="default auto (cuda when available)")
    g.add_argument("--precision", choices=PRECISIONS, help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    g.add_argument("--backend", choices=("auto", "triton", "torch", "reference"), help="fastssl loss backend")
    g.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's)")
    g.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    g.add_argument("--stop-after", type=int, metavar="N", help="stop after N epochs of this invocation (continue later with --resume)")
    g.add_argument("--progress", choices=("auto", "bar", "epochs", "none"), help="progress bar (auto: when the terminal is a TTY)")
    g.add_argument("--no-plots", dest="plots", action="store_false", help="write no PNG plots")
    g.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="write no TensorBoard scalars (written to DIR/tensorboard when tensorboard is installed)")
    g.add_argument("--wandb", action="store_true", help="log the same records to Weights & Biases (needs wandb; WANDB_MODE=offline works)")
    g.add_argument("--wandb-project", help="wandb project (default fastssl)")
    return p


def _namespace_to_overrides(ns: argparse.Namespace) -> Dict[str, Any]:
    out = {k: v for k, v in vars(ns).items() if k not in ("config", "loss_arg")}
    if "loss_arg" in vars(ns):
        out["loss_args"] = parse_loss_args(ns.loss_arg)
    return out


def read_run_config(run_dir: str) -> Dict[str, Any]:
    """The settings stored in ``run_dir/config.json`` (for ``--resume``), without the
    invocation-only ones.

    Raises:
        ConfigError: no such file, or one that is truncated, not JSON or not a mapping.
    """
    stored = os.path.join(run_dir, "config.json")
    if not os.path.isfile(stored):
        raise ConfigError(f"--resume {run_dir}: no config.json there (is it a run directory?)")
    try:
        with open(stored, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume {run_dir}: config.json is unreadable or truncated ({e}); "
                          "restore it or start a new run") from None
    if not isinstance(data, dict) or "method" not in data:
        raise ConfigError(f"--resume {run_dir}: config.json does not hold a run's settings")
    return {k: v for k, v in data.items() if k in FIELD_NAMES and k not in _INVOCATION_ONLY}


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Command line (and ``--config`` file, and a resumed run's ``config.json``) -> config.

    Raises:
        ConfigError: unknown keys in a file, bad values, inconsistent settings.
    """
    ns = build_parser().parse_args(argv)
    overrides = _namespace_to_overrides(ns)
    values: Dict[str, Any] = {}
    resume = overrides.get("resume")
    if resume is not None:
        values.update(read_run_config(resume))
        values["output_dir"] = resume
    if getattr(ns, "config", None):
        file_values = load_config_file(ns.config)
        if resume is not None:
            raise ConfigError("--config and --resume cannot be combined: a resumed run keeps its own config.json")
        values.update(file_values)
    loss_args = dict(values.get("loss_args") or {})
    loss_args.update(overrides.pop("loss_args", {}))
    values.update(overrides)
    values["loss_args"] = loss_args
    if resume is not None:
        values["output_dir"] = resume
    elif values.get("data_path") and "dataset" not in values:
        # A path without --dataset: say what it holds rather than silently train on shapes.
        from fastssl.train.data import DataError, infer_dataset

        try:
            values["dataset"] = infer_dataset(values["data_path"])
        except DataError as e:
            raise ConfigError(str(e)) from None
    try:
        cfg = TrainConfig(**values)
        validate(cfg)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        # A setting of the wrong type (a hand-edited or foreign config file).
        raise ConfigError(f"invalid settings: {e}") from None
    return cfg


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def validate(cfg: TrainConfig) -> None:
    """Checks that need no data: choices, ranges, flag combinations."""
    _require(cfg.method in METHODS, f"method must be one of {METHODS}, got {cfg.method!r}")
    _require(cfg.dataset in DATASETS, f"dataset must be one of {DATASETS}, got {cfg.dataset!r}")
    _require(
        cfg.backbone in BACKBONES or cfg.backbone.startswith(("timm:", "torchvision:")),
        f"backbone must be one of {BACKBONES} or timm:NAME / torchvision:NAME, got {cfg.backbone!r}",
    )
    _require(cfg.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")
    _require(cfg.device in DEVICES, f"device must be one of {DEVICES}, got {cfg.device!r}")
    _require(cfg.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {cfg.precision!r}")
    _require(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    _require(cfg.batch_size >= 1, f"--batch-size must be >= 1, got {cfg.batch_size}")
    _require(cfg.num_train >= 2 and cfg.num_test >= 1, "--num-train must be >= 2 and --num-test >= 1")
    _require(0.0 < cfg.test_fraction < 1.0, f"--test-fraction must be in (0, 1), got {cfg.test_fraction}")
    _require(cfg.lr is None or cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    _require(cfg.weight_decay is None or cfg.weight_decay >= 0, "--weight-decay must be >= 0")
    _require(cfg.warmup_epochs >= 0, "--warmup-epochs must be >= 0")
    _require(0.0 <= cfg.min_lr_fraction <= 1.0, "--min-lr-fraction must be in [0, 1]")
    _require(cfg.width is None or cfg.width >= 1, "--width must be >= 1")
    _require(cfg.image_size is None or cfg.image_size >= 4, "--image-size must be >= 4")
    _require(cfg.knn_k >= 1 and cfg.knn_temperature > 0, "--knn-k must be >= 1 and --knn-temperature > 0")
    _require(cfg.probe_steps >= 0 and cfg.eval_batch_size >= 1, "--probe-steps must be >= 0, --eval-batch-size >= 1")
    _require(cfg.queue_size >= 0, "--queue-size must be >= 0")
    _require(cfg.freeze_prototypes_epochs >= 0, "--freeze-prototypes-epochs must be >= 0")
    _require(cfg.predictor_lr_scale > 0, "--predictor-lr-scale must be > 0")
    _require(cfg.stop_after is None or cfg.stop_after >= 1, "--stop-after must be >= 1")
    _require(cfg.threads is None or cfg.threads >= 1, "--threads must be >= 1")
    _require(cfg.num_local_crops is None or cfg.num_local_crops >= 0, "--num-local-crops must be >= 0")
    _require(cfg.proj_dim is None or cfg.proj_dim >= 1, "--proj-dim must be >= 1")
    _require(cfg.proj_hidden_dim is None or cfg.proj_hidden_dim >= 1, "--proj-hidden-dim must be >= 1")
    _require(cfg.prototypes is None or cfg.prototypes >= 2, "--prototypes must be >= 2")
    if cfg.ema_momentum is not None:
        _require(0.0 <= cfg.ema_momentum <= 1.0, f"--ema-momentum must be in [0, 1], got {cfg.ema_momentum}")
        _require(cfg.method in EMA_METHODS, f"--ema-momentum applies to {EMA_METHODS}, not {cfg.method}")
    for name, value in (("crop_scale", cfg.crop_scale), ("local_crop_scale", cfg.local_crop_scale)):
        _require(
            len(value) == 2 and 0.0 < value[0] <= value[1] <= 1.0,
            f"--{name.replace('_', '-')} must be two numbers 0 < lo <= hi <= 1, got {list(value)}",
        )
    for name, values in (
        ("blur_probs", cfg.blur_probs),
        ("solarize_probs", cfg.solarize_probs),
        ("jitter_prob", [cfg.jitter_prob]),
        ("grayscale_prob", [cfg.grayscale_prob]),
    ):
        _require(
            len(values) >= 1 and all(0.0 <= float(v) <= 1.0 for v in values),
            f"--{name.replace('_', '-')} must be probabilities in [0, 1], got {list(values)}",
        )
    _require(cfg.jitter_strength >= 0, "--jitter-strength must be >= 0")
    if cfg.no_predictor or cfg.no_stop_gradient:
        _require(
            cfg.method in PREDICTOR_METHODS,
            f"--no-predictor/--no-stop-gradient apply to {PREDICTOR_METHODS}, not {cfg.method}",
        )
    if cfg.no_centering:
        _require(cfg.method == "dino", f"--no-centering applies to dino, not {cfg.method}")
    if cfg.queue_size:
        _require(cfg.method == "swav", "--queue-size applies to swav (MoCo's queue is --loss-arg memory_bank_size=N)")
    if cfg.stream:
        _require(cfg.dataset == "folder", f"--stream applies to --dataset folder, not {cfg.dataset}")
    if cfg.dataset in ("folder", "cifar10", "cifar100"):
        _require(cfg.data_path is not None, f"--dataset {cfg.dataset} needs --data-path")
    _require(isinstance(cfg.loss_args, dict), "loss_args must be a mapping of loss constructor arguments")
    _require(cfg.progress in ("auto", "bar", "epochs", "none"), f"unknown --progress {cfg.progress!r}")
