"""The training loop: set-up (device, DDP, data, method, optimizer), epochs, evaluation,
checkpoints and resume, logs, plots and the final summary.

Reproducibility contract of ``--resume``: a checkpoint is written at the end of every epoch,
after that epoch's evaluation, with everything the next epoch reads -- model and EMA/teacher
weights, loss buffers (DINO center, MoCo bank, SwAV queue), optimizer state, step counter,
and every random state (python, numpy, torch CPU/CUDA, the data-order generator and each
process's augmentation generator). A resumed run therefore continues bit for bit where the
uninterrupted one would have gone (same device and world size; on CPU with one thread --
PyTorch's multi-threaded reductions may change the last bits from run to run).
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastssl.train import evaluate as ev
from fastssl.train.augment import Augmenter, make_views
from fastssl.train.config import ConfigError, TrainConfig
from fastssl.train.data import ImageData, StreamingImages, epoch_batches, load_dataset, steps_per_epoch, take
from fastssl.train.methods import MULTI_CROP_METHODS, Method, build_method
from fastssl.train.optim import build_optimizer, lr_at, peak_lr, set_lr
from fastssl.train.plots import write_dashboard, write_plots
from fastssl.train.trackers import Trackers

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
BACKBONE = "backbone.pt"
PREPROCESSING = "preprocessing.json"
# Keys every checkpoint of this driver holds (a file without them is not one of ours).
_CHECKPOINT_KEYS = ("epoch", "step", "elapsed", "steps_per_epoch", "world_size", "model", "optimizer", "scaler",
                    "data_generator", "ranks")


# ---------------------------------------------------------------------------------------------
# Process set-up
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_context(cfg: TrainConfig) -> Context:
    """Device and process group from ``--device`` and torchrun's environment variables
    (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda but no CUDA device is available")
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://", rank=rank, world_size=world)
    return Context(device=device, rank=rank, world_size=world, local_rank=local_rank)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _autocast(cfg: TrainConfig, device: torch.device):
    precision = cfg.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype), precision


def _default_output_dir(cfg: TrainConfig, ctx: Context) -> str:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join("runs", f"{cfg.method}-{stamp}")
    if ctx.distributed:
        box = [path]
        dist.broadcast_object_list(box, src=0)
        path = box[0]
    return path


def _atomic_save(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_json(obj: Any, path: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    """The records of ``metrics.jsonl`` in a run directory.

    A half-written last line (the process was killed while appending it) is dropped: the
    checkpoint of that epoch was not written yet either, so a resume recomputes it.

    Raises:
        ConfigError: an unreadable line before the last one (the file is damaged).
    """
    path = os.path.join(run_dir, METRICS)
    if not os.path.isfile(path):
        return []
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            lines = [line for line in f.read().split("\n") if line.strip()]
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "epoch" not in record:
                raise ValueError("not a record")
        except ValueError:
            if number == len(lines):
                break  # the half-written last line
            raise ConfigError(f"{path}: line {number} is not a metrics record (damaged file)") from None
        records.append(record)
    return records


# ---------------------------------------------------------------------------------------------
# Progress display
# ---------------------------------------------------------------------------------------------


class Progress:
    """tqdm bar with loss and throughput when wanted and available; a line per epoch always
    (unless ``--progress none``).

    The bar is refreshed by time (``refresh_seconds``), not every k steps: slow steps (a big
    backbone on a CPU) still show movement, and fast ones do not flood the terminal. Without
    tqdm, a text line is printed at most every ``fallback_seconds``.
    """

    def __init__(self, mode: str, enabled: bool, refresh_seconds: float = 0.5, fallback_seconds: float = 10.0) -> None:
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "epochs"
        self.mode = mode if enabled else "none"
        self.bar = None
        self.refresh_seconds = refresh_seconds
        self.fallback_seconds = fallback_seconds
        self._last = 0.0

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        self._last = time.perf_counter()
        if self.mode != "bar":
            return
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
            return
        self.bar = tqdm(total=steps, desc=f"epoch {epoch}/{epochs}", leave=False, dynamic_ncols=True, mininterval=self.refresh_seconds)

    def due(self, step_in_epoch: int, steps: int) -> bool:
        """Whether the display wants a new value now (reading the loss syncs a GPU, so the
        loop asks first): after ``refresh_seconds`` (bar) / ``fallback_seconds`` (text lines),
        and at the epoch's last step."""
        if self.mode != "bar":
            return False
        interval = self.refresh_seconds if self.bar is not None else self.fallback_seconds
        return step_in_epoch == steps or step_in_epoch == 1 or time.perf_counter() - self._last >= interval

    def update(self, step_in_epoch: int, steps: int, loss: float, images_per_s: float) -> None:
        if self.mode != "bar":
            return
        self._last = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{images_per_s:.0f}", refresh=False)
            self.bar.update(step_in_epoch - self.bar.n)
        else:
            print(f"  step {step_in_epoch}/{steps}  loss {loss:.4f}  {images_per_s:.0f} img/s", flush=True)

    def end_epoch(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def line(self, text: str) -> None:
        if self.mode != "none":
            print(text, flush=True)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate_epoch(
    cfg: TrainConfig, method: Method, data: Dict[str, Tensor], augmenter: Augmenter, final: bool, spectrum: bool = False
) -> Dict[str, Any]:
    """kNN top-1 on backbone features and collapse metrics of the held-out embeddings; the
    covariance spectrum with ``spectrum`` or ``final``, the linear probe with ``final``."""
    was_training = method.training
    method.eval()
    to_input = lambda images: augmenter.normalize(augmenter.to_float(images))
    train_feat = ev.extract(method.features, data["train_images"], to_input, cfg.eval_batch_size)
    test_feat = ev.extract(method.features, data["test_images"], to_input, cfg.eval_batch_size)
    test_emb = ev.extract(method.embed, data["test_images"], to_input, cfg.eval_batch_size)
    out: Dict[str, Any] = {
        "knn_top1": ev.knn_top1(train_feat, data["train_labels"], test_feat, data["test_labels"], cfg.knn_k, cfg.knn_temperature)
    }
    out.update(ev.embedding_metrics(test_emb))
    if final or spectrum:
        out["spectrum"] = ev.covariance_spectrum(test_emb).tolist()
    if final:
        if cfg.probe_steps > 0:
            train_acc, test_acc = ev.linear_probe(train_feat, data["train_labels"], test_feat, data["test_labels"], cfg.probe_steps)
            out["linear_probe_top1"] = test_acc
            out["linear_probe_train_top1"] = train_acc
    method.train(was_training)
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def _numpy_state() -> tuple:
    # As plain ints and a tensor, so that checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return (str(name), torch.from_numpy(np.asarray(keys, dtype=np.int64)), int(pos), int(has_gauss), float(cached))


def _set_numpy_state(state: tuple) -> None:
    name, keys, pos, has_gauss, cached = state
    keys = np.asarray(keys.numpy() if isinstance(keys, Tensor) else keys, dtype=np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))


def _rank_state(method: Method, aug_gen: torch.Generator, device: torch.device) -> Dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
        "augment": aug_gen.get_state(),
        "method": method.local_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _load_rank_state(state: Dict[str, Any], method: Method, aug_gen: torch.Generator, device: torch.device) -> None:
    random.setstate(tuple(state["python"]))
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    aug_gen.set_state(state["augment"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
    method.load_local_state(state["method"])


def _gather_rank_states(state: Dict[str, Any], ctx: Context) -> List[Dict[str, Any]]:
    if not ctx.distributed:
        return [state]
    states: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, state)
    return states


def _check_replicas_in_sync(method: Method, ctx: Context) -> None:
    """DDP keeps the replicas identical; a checksum of all parameters catches a violation."""
    if not ctx.distributed:
        return
    with torch.no_grad():
        checksum = torch.stack([p.detach().double().sum() for p in method.parameters()]).sum().cpu()
    sums: List[Any] = [None] * ctx.world_size
    dist.all_gather_object(sums, float(checksum))
    # Replicas are bitwise identical in practice; the tolerance only absorbs the summation
    # order of the checksum itself, far below what a missed update would change.
    if any(abs(s - sums[0]) > 1e-6 * max(1.0, abs(sums[0])) for s in sums):
        raise RuntimeError(f"model replicas diverged across processes (parameter checksums {sums})")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _wrap_ddp(method: Method, ctx: Context) -> nn.Module:
    """DDP without buffer synchronization in forward: BN statistics are synchronized by
    SyncBatchNorm on GPU, and the SwAV queue is deliberately per process."""
    ddp = nn.parallel.DistributedDataParallel
    kwargs: Dict[str, Any] = {"device_ids": [ctx.device.index] if ctx.device.type == "cuda" else None}
    # `broadcast_buffers` was renamed `forward_sync_buffers` in recent PyTorch releases.
    if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters:
        kwargs["forward_sync_buffers"] = False
    else:
        kwargs["broadcast_buffers"] = False
    return ddp(method, **kwargs)


def _data_on_device(data: ImageData, device: torch.device) -> Dict[str, Any]:
    """Labels on the device; images too unless streamed (decoded per batch on the CPU)."""
    move = lambda images: images if isinstance(images, StreamingImages) else images.to(device)
    return {
        "train_images": move(data.train_images),
        "train_labels": data.train_labels.to(device),
        "test_images": move(data.test_images),
        "test_labels": data.test_labels.to(device),
    }


def run(cfg: TrainConfig) -> Dict[str, Any]:
    """Train and evaluate as configured; returns the summary (also written to summary.json)."""
    ctx = setup_context(cfg)
    threads = torch.get_num_threads()
    try:
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        return _run(cfg, ctx)
    finally:
        torch.set_num_threads(threads)
        if ctx.distributed and dist.is_initialized():
            dist.destroy_process_group()


def _data_message(cfg: TrainConfig) -> str:
    if cfg.dataset == "shapes":
        return f"generating the shapes data set ({cfg.num_train} + {cfg.num_test} images) ..."
    if cfg.dataset == "digits":
        return "loading scikit-learn's digits ..."
    how = "listing" if cfg.stream else "loading"
    return f"{how} {cfg.dataset} from {cfg.data_path} ..."


def _load_checkpoint(path: str, out_dir: str) -> Dict[str, Any]:
    """The resume checkpoint, or a :class:`ConfigError` that says what is wrong with it
    (missing, empty, truncated, not a torch file, not one of this driver's checkpoints)."""
    if not os.path.isfile(path):
        raise ConfigError(f"--resume {out_dir}: no {CHECKPOINT} there (the run stopped before its first epoch ended?)")
    if os.path.getsize(path) == 0:
        raise ConfigError(f"--resume {out_dir}: {CHECKPOINT} is empty (the write was interrupted); start the run again")
    try:
        # Checkpoints hold only tensors and plain containers: no pickled code is run.
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip/pickle errors of a truncated or foreign file come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"--resume {out_dir}: {CHECKPOINT} cannot be read (truncated, or not written by fastssl.train: {first[:200]})"
        ) from None
    missing = [k for k in _CHECKPOINT_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise ConfigError(f"--resume {out_dir}: {CHECKPOINT} is not a fastssl.train checkpoint (no {', '.join(missing)})")
    return ckpt


def _restore(ckpt: Dict[str, Any], out_dir: str, method: Method, optimizer, scaler, data_gen, aug_gen, ctx: Context, steps: int):
    if ckpt["world_size"] != ctx.world_size:
        raise ConfigError(f"--resume: the run used {ckpt['world_size']} process(es), this one has {ctx.world_size}")
    if ckpt["steps_per_epoch"] != steps:
        raise ConfigError("--resume: the data or batch size changed since the checkpoint")
    try:
        method.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        data_gen.set_state(ckpt["data_generator"])
        _load_rank_state(ckpt["ranks"][ctx.rank], method, aug_gen, ctx.device)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"--resume {out_dir}: {CHECKPOINT} does not match this run's model and settings ({first[:200]})") from None


def _export_backbone(method: Method, cfg: TrainConfig, data: ImageData, mean: Tensor, std: Tensor, out_dir: str, epoch: int) -> None:
    """``backbone.pt`` (the backbone's plain state_dict: loads with ``weights_only=True``) and
    ``preprocessing.json`` (what an image must go through before it), written atomically."""
    state = {k: v.detach().cpu().clone() for k, v in method.backbone.state_dict().items()}
    _atomic_save(state, os.path.join(out_dir, BACKBONE))
    _write_json(
        {
            "backbone": cfg.backbone,
            "width": cfg.width,
            "channels": data.channels,
            "image_size": data.image_size,
            "feature_dim": int(method.feature_dim),
            "mean": [float(v) for v in mean],
            "std": [float(v) for v in std],
            "input": "RGB (or gray) values scaled to [0, 1], then (x - mean) / std per channel",
            "resize": "shorter side to image_size, centre crop (image folders); CIFAR/shapes are already square",
            "method": cfg.method,
            "epoch": epoch,
        },
        os.path.join(out_dir, PREPROCESSING),
    )


def _read_step_losses(path: str, up_to_epoch: int) -> List[List[float]]:
    """[step, loss] pairs of ``losses.jsonl`` for the epochs a resumed run keeps."""
    out: List[List[float]] = []
    if not os.path.isfile(path):
        return out
    with open(path, "r", encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                break  # a half-written last line
            if isinstance(entry, dict) and entry.get("epoch", 1e9) <= up_to_epoch:
                out += [[float(a), float(b)] for a, b in entry.get("losses", [])]
    return out


def _run(cfg: TrainConfig, ctx: Context) -> Dict[str, Any]:
    _seed_everything(cfg.seed)
    wall_start = time.perf_counter()
    progress = Progress(cfg.progress, ctx.is_main)

    progress.line(_data_message(cfg))
    data = load_dataset(
        cfg.dataset, cfg.data_path, cfg.image_size, cfg.num_train, cfg.num_test, cfg.test_fraction, cfg.seed, stream=cfg.stream
    )
    num_train = int(data.train_images.shape[0])
    steps = steps_per_epoch(num_train, cfg.batch_size, ctx.world_size)
    if steps < 1:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} x {ctx.world_size} process(es) exceeds the {num_train} training images: "
            "no full batch per epoch"
        )
    total_steps = steps * cfg.epochs
    global_batch = cfg.batch_size * ctx.world_size

    # Identical initialization on every rank (DDP also broadcasts rank 0's weights).
    torch.manual_seed(cfg.seed)
    method = build_method(cfg, data.channels, num_train, ctx.world_size, data.image_size).to(ctx.device)
    if ctx.distributed and ctx.device.type == "cuda":
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    if cfg.compile:
        method.compile_networks()
    # Wrapped before any rank-local state (resumed SwAV queue) is loaded: DDP's construction
    # broadcasts rank 0's parameters and buffers.
    model = _wrap_ddp(method, ctx) if ctx.distributed else method
    optimizer = build_optimizer(cfg, method, global_batch)
    autocast, precision = _autocast(cfg, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=(precision == "fp16"))

    num_local = cfg.num_local_crops if cfg.num_local_crops is not None else (2 if cfg.method in MULTI_CROP_METHODS else 0)
    if cfg.method not in MULTI_CROP_METHODS:
        num_local = 0
    local_size = cfg.local_crop_size or max(4, round(data.image_size * 3 / 7))
    views = make_views(
        data.image_size, num_local, local_size, cfg.crop_scale, cfg.local_crop_scale, cfg.jitter_strength,
        cfg.jitter_prob, cfg.grayscale_prob, cfg.blur_probs, cfg.solarize_probs,
    )
    mean, std = data.channel_stats()
    augmenter = Augmenter(views, mean, std, ctx.device)
    tensors = _data_on_device(data, ctx.device)

    data_gen = torch.Generator().manual_seed(cfg.seed + 1)
    aug_gen = torch.Generator(device=ctx.device).manual_seed(cfg.seed * 1000 + 17 + ctx.rank)

    out_dir = cfg.output_dir or _default_output_dir(cfg, ctx)
    cfg.output_dir = out_dir
    metrics_path = os.path.join(out_dir, METRICS)
    losses_path = os.path.join(out_dir, "losses.jsonl")
    ckpt_path = os.path.join(out_dir, CHECKPOINT)

    start_epoch, step, elapsed = 0, 0, 0.0
    records: List[Dict[str, Any]] = []
    step_losses: List[List[float]] = []
    initial_spectrum: Optional[List[float]] = None
    if cfg.resume:
        ckpt = _load_checkpoint(ckpt_path, out_dir)
        _restore(ckpt, out_dir, method, optimizer, scaler, data_gen, aug_gen, ctx, steps)
        start_epoch, step, elapsed = int(ckpt["epoch"]), int(ckpt["step"]), float(ckpt["elapsed"])
        # Records written after the checkpoint (a crash between the two) are dropped.
        records = [r for r in read_metrics(out_dir) if r["epoch"] <= start_epoch]
        step_losses = _read_step_losses(losses_path, start_epoch)
        initial_spectrum = _read_spectrum(out_dir).get("initial")
        if ctx.is_main:
            with open(metrics_path + ".tmp", "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            os.replace(metrics_path + ".tmp", metrics_path)
        if start_epoch >= cfg.epochs:
            progress.line(f"{out_dir}: already trained for {start_epoch} epoch(s) of {cfg.epochs}")
        else:
            progress.line(f"resuming {out_dir} at epoch {start_epoch + 1} of {cfg.epochs} (checkpoint after epoch {start_epoch}, step {step})")
    trackers = Trackers(None, None)
    if ctx.is_main:
        os.makedirs(out_dir, exist_ok=True)
        saved = cfg.to_dict()
        saved.update(resume=None, stop_after=None, output_dir=out_dir)
        _write_json(saved, os.path.join(out_dir, "config.json"))
        if not cfg.resume:
            for stale in (metrics_path, losses_path):
                if os.path.exists(stale):
                    os.remove(stale)
        trackers = Trackers.create(cfg, out_dir, resume=bool(cfg.resume))

    def log_record(record: Dict[str, Any]) -> None:
        records.append(record)
        if ctx.is_main:
            with open(metrics_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({k: v for k, v in record.items() if k != "spectrum"}) + "\n")
            trackers.log_record(record)

    def evaluate(epoch: int, loss: Optional[float], extra: Dict[str, Any]) -> Dict[str, Any]:
        final = epoch == cfg.epochs
        record: Dict[str, Any] = {"epoch": epoch, "loss": loss}
        if ctx.is_main:
            record.update(evaluate_epoch(cfg, method, tensors, augmenter, final, spectrum=(epoch == 0)))
        record.update(extra)
        record["seconds"] = round(elapsed + time.perf_counter() - segment_start, 3)
        if ctx.is_main and "spectrum" in record:
            spectra = {"initial": record["spectrum"] if epoch == 0 else initial_spectrum}
            if final:
                spectra["final"] = record["spectrum"]
            _write_json(spectra, os.path.join(out_dir, "spectrum.json"))
        return record

    segment_start = time.perf_counter()
    if ctx.is_main:
        progress.line(
            f"{cfg.method} on {cfg.dataset} ({num_train} train / {data.test_images.shape[0]} held-out images, "
            f"{data.image_size}px), {cfg.backbone}, {ctx.world_size} process(es) on {ctx.device.type}, "
            f"batch {global_batch}, {cfg.epochs} epochs of {steps} steps, lr {peak_lr(cfg, global_batch):.3g} ({cfg.optimizer}), "
            f"precision {precision} -> {out_dir}"
        )
    if not cfg.resume:
        progress.line(f"evaluating the untrained network (epoch 0: kNN over {num_train} images, collapse metrics) ...")
        record = evaluate(0, None, {"lr": 0.0, "step": 0})
        initial_spectrum = record.get("spectrum")
        log_record(record)
        progress.line(_epoch_line(record, cfg.epochs))

    train_images = tensors["train_images"]
    epochs_this_run = 0
    peak = peak_lr(cfg, global_batch)
    warmup_steps = int(round(cfg.warmup_epochs * steps))
    # Mean training loss over a few steps for the trackers' step curve: accumulated on the
    # device and read only at these points (a read syncs a GPU).
    tracker_every = max(1, steps // 10)
    for epoch in range(start_epoch, cfg.epochs):
        method.train()
        progress.start_epoch(epoch + 1, cfg.epochs, steps)
        loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
        epoch_losses = torch.zeros(steps, dtype=torch.float32, device=ctx.device)
        t_epoch = time.perf_counter()
        lr = 0.0
        for i, idx in enumerate(epoch_batches(num_train, cfg.batch_size, data_gen, ctx.rank, ctx.world_size)):
            batch_views = augmenter(take(train_images, idx, ctx.device), aug_gen)
            lr = lr_at(step, total_steps, warmup_steps, peak, cfg.min_lr_fraction)
            set_lr(optimizer, lr, peak)
            with autocast:
                loss = model(batch_views, epoch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            method.after_backward(epoch)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            method.after_step(step / total_steps)
            loss_sum += loss.detach().double()
            epoch_losses[i] = loss.detach().float()
            if progress.due(i + 1, steps):
                current = float(loss.detach())
                if not math.isfinite(current):
                    raise RuntimeError(f"the loss is {current} at step {step}: lower --lr or check the settings")
                rate = (i + 1) * global_batch / max(1e-9, time.perf_counter() - t_epoch)
                progress.update(i + 1, steps, current, rate)
            if trackers.active and ((i + 1) % tracker_every == 0 or i + 1 == steps):
                window = epoch_losses[max(0, i + 1 - tracker_every) : i + 1]
                trackers.log_step(step, float(window.mean()), lr)
        progress.end_epoch()
        if ctx.distributed:
            dist.all_reduce(loss_sum)
            loss_sum /= ctx.world_size
        epoch_loss = float(loss_sum) / steps
        if not math.isfinite(epoch_loss):
            raise RuntimeError(f"the loss became {epoch_loss} in epoch {epoch + 1}: lower --lr or check the settings")
        images_per_s = steps * global_batch / max(1e-9, time.perf_counter() - t_epoch)
        _check_replicas_in_sync(method, ctx)
        first_step = step - steps + 1
        losses_this_epoch = [[first_step + j, round(v, 6)] for j, v in enumerate(epoch_losses.tolist())]
        step_losses += losses_this_epoch
        if epoch + 1 == cfg.epochs:
            progress.line("final evaluation (kNN, collapse metrics, linear probe) ...")
        record = evaluate(epoch + 1, epoch_loss, {"lr": lr, "step": step, "images_per_second": round(images_per_s, 1)})
        log_record(record)
        progress.line(_epoch_line(record, cfg.epochs))
        # The checkpoint comes after the record: a resume drops records past its epoch.
        elapsed_now = record["seconds"]
        rank_states = _gather_rank_states(_rank_state(method, aug_gen, ctx.device), ctx)
        if ctx.is_main:
            with open(losses_path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"epoch": epoch + 1, "losses": losses_this_epoch}) + "\n")
            _atomic_save(
                {
                    "epoch": epoch + 1,
                    "step": step,
                    "elapsed": elapsed_now,
                    "steps_per_epoch": steps,
                    "world_size": ctx.world_size,
                    "model": method.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "data_generator": data_gen.get_state(),
                    "ranks": rank_states,
                    "config": cfg.to_dict(),
                },
                ckpt_path,
            )
            _export_backbone(method, cfg, data, mean, std, out_dir, epoch + 1)
        if ctx.distributed:
            dist.barrier()
        epochs_this_run += 1
        if cfg.stop_after is not None and epochs_this_run >= cfg.stop_after and epoch + 1 < cfg.epochs:
            progress.line(f"stopped after {epochs_this_run} epoch(s); continue with --resume {out_dir}")
            trackers.close()
            return {"output_dir": out_dir, "stopped_at_epoch": epoch + 1}

    summary = _summary(cfg, records, out_dir, time.perf_counter() - wall_start)
    summary["world_size"] = ctx.world_size
    summary["num_classes"] = len(data.classes)
    if ctx.is_main:
        _finish(cfg, records, out_dir, summary, progress, step_losses)
    trackers.close(summary)
    return summary


def _read_spectrum(out_dir: str) -> Dict[str, Any]:
    """``spectrum.json``: {"initial": [...], "final": [...]} (older runs: the final list)."""
    path = os.path.join(out_dir, "spectrum.json")
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, "r", encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {"final": data}


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _epoch_line(r: Dict[str, Any], epochs: int) -> str:
    text = (
        f"epoch {r['epoch']:>3}/{epochs}  loss {_fmt(r.get('loss'), '.4f')}  kNN {_fmt(r.get('knn_top1'), '.3f')}  "
        f"stable rank {_fmt(r.get('stable_rank'), '.2f')}  erank {_fmt(r.get('entropy_rank'), '.2f')}  "
        f"center {_fmt(r.get('center_vector_norm'), '.3f')}  std(z/|z|) {_fmt(r.get('std_of_l2_normalized'), '.4f')}  "
        f"{r['seconds']:.0f}s"
    )
    if r.get("images_per_second"):
        text += f"  {r['images_per_second']:.0f} img/s"
    if r.get("linear_probe_top1") is not None:
        text += f"  linear probe {r['linear_probe_top1']:.3f}"
    return text


def _summary(cfg: TrainConfig, records: List[Dict[str, Any]], out_dir: str, wall: float) -> Dict[str, Any]:
    first = records[0] if records else {}
    last = records[-1] if records else {}
    keys = ("knn_top1", "stable_rank", "entropy_rank", "center_vector_norm", "std_of_l2_normalized")
    return {
        "method": cfg.method,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "output_dir": out_dir,
        "wall_seconds_this_invocation": round(wall, 1),
        "training_seconds": last.get("seconds"),
        "initial": {k: first.get(k) for k in keys},
        "final": {k: last.get(k) for k in keys + ("loss", "linear_probe_top1")},
        "best_knn_top1": max((r["knn_top1"] for r in records if r.get("knn_top1") is not None), default=None),
    }


_FILE_NOTES = {
    "backbone.pt": "backbone weights (plain state_dict, torch.load(..., weights_only=True))",
    "preprocessing.json": "mean, std, image size and backbone name for inference",
    "checkpoint.pt": "full training state for --resume",
    "config.json": "every setting of the run",
    "metrics.jsonl": "one record per evaluation",
    "metrics.csv": "the same as a table",
    "losses.jsonl": "training loss of every step",
    "spectrum.json": "covariance eigenvalues of the embeddings, untrained and final",
    "summary.json": "first vs last metrics, linear probe",
    "dashboard.png": "loss, kNN, ranks, center norm, std of z, spectrum in one figure",
    "plots": "one PNG per curve",
    "tensorboard": "TensorBoard scalars (tensorboard --logdir ...)",
    "wandb": "Weights & Biases run files",
}


def _written_files(out_dir: str) -> List[str]:
    names = sorted(n for n in os.listdir(out_dir) if not n.startswith(".") and ".tmp" not in n)
    return [n + ("/" if os.path.isdir(os.path.join(out_dir, n)) else "") for n in names]


def _finish(
    cfg: TrainConfig, records: List[Dict[str, Any]], out_dir: str, summary: Dict[str, Any], progress: Progress,
    step_losses: Optional[List[List[float]]] = None,
) -> None:
    _write_csv(records, os.path.join(out_dir, "metrics.csv"))
    spectra = _read_spectrum(out_dir)
    if records and records[-1].get("spectrum") is not None:
        spectra["final"] = records[-1]["spectrum"]
    if cfg.plots:
        write_plots(records, spectra.get("final"), os.path.join(out_dir, "plots"), title=cfg.method)
        write_dashboard(
            records, step_losses or [], spectra.get("initial"), spectra.get("final"), os.path.join(out_dir, "dashboard.png"),
            title=f"{cfg.method} on {cfg.dataset} ({cfg.backbone})", num_classes=summary.get("num_classes"),
        )
    summary["files"] = sorted(set(_written_files(out_dir)) | {"summary.json"})
    _write_json(summary, os.path.join(out_dir, "summary.json"))
    i, f = summary["initial"], summary["final"]
    lines = [
        f"done: {cfg.method} on {cfg.dataset}, {cfg.epochs} epochs in {summary['training_seconds']:.0f}s -> {out_dir}",
        f"  kNN top-1        {_fmt(i['knn_top1'], '.3f')} (epoch 0) -> {_fmt(f['knn_top1'], '.3f')} (best {_fmt(summary['best_knn_top1'], '.3f')})",
        f"  linear probe     {_fmt(f.get('linear_probe_top1'), '.3f')}",
        f"  stable rank      {_fmt(i['stable_rank'], '.2f')} -> {_fmt(f['stable_rank'], '.2f')}",
        f"  center norm      {_fmt(i['center_vector_norm'], '.3f')} -> {_fmt(f['center_vector_norm'], '.3f')}",
        f"  std(z/|z|)       {_fmt(i['std_of_l2_normalized'], '.4f')} -> {_fmt(f['std_of_l2_normalized'], '.4f')}",
        f"files in {out_dir}:",
    ]
    for name in summary["files"]:
        note = _FILE_NOTES.get(name.rstrip("/"))
        lines.append(f"  {name:<20} {note}" if note else f"  {name}")
    lines.append(f"evaluate the backbone on other data: python -m fastssl.train.eval {out_dir} --dataset ... --data-path ...")
    progress.line("\n".join(lines))


def _write_csv(records: List[Dict[str, Any]], path: str) -> None:
    keys: List[str] = []
    for r in records:
        keys += [k for k in r if k not in keys and k != "spectrum"]
    with open(path, "w", encoding="utf-8") as f:
        f.write(",".join(keys) + "\n")
        for r in records:
            f.write(",".join("" if r.get(k) is None else str(r[k]) for k in keys) + "\n")
