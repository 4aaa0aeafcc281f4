"""Short training runs of the driver: every method, the ablation flags, resume, errors, plots,
and DDP with two gloo processes on CPU. Shapes are tiny (a few steps each)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from test_train_units import _write_cifar10, _write_png

from fastssl.train import plots
from fastssl.train.cli import main
from fastssl.train.config import METHODS, TrainConfig
from fastssl.train.loop import Progress, read_metrics
from fastssl.train.methods import build_method

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--num-train", "48", "--num-test", "24", "--image-size", "16", "--width", "4",
    "--batch-size", "16", "--probe-steps", "5", "--progress", "none", "--threads", "1", "--no-plots",
]
# Per-method settings that the tiny shapes need.
METHOD_ARGS = {
    "wmse": ["--proj-dim", "8", "--loss-arg", "w_size=16"],
    "dino": ["--prototypes", "32", "--num-local-crops", "1"],
    "swav": ["--num-local-crops", "1", "--queue-size", "32"],
}
REQUIRED = ("epoch", "loss", "knn_top1", "stable_rank", "entropy_rank", "center_vector_norm", "std_of_l2_normalized", "seconds")
TIMING = ("seconds", "images_per_second")


def _train(out, method="simclr", *extra):
    argv = ["--method", method, "--output-dir", str(out)] + TINY + METHOD_ARGS.get(method, []) + list(extra)
    assert main(argv) == 0
    return read_metrics(str(out))


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_logs(tmp_path, method):
    records = _train(tmp_path, method, "--epochs", "1")
    assert [r["epoch"] for r in records] == [0, 1]
    assert records[0]["loss"] is None and math.isfinite(records[1]["loss"])
    for r in records:
        assert all(k in r for k in REQUIRED)
        assert 0.0 <= r["knn_top1"] <= 1.0
        assert r["stable_rank"] >= 0 and math.isfinite(r["entropy_rank"]) and 0 <= r["center_vector_norm"] <= 1 + 1e-6
    assert 0.0 <= records[-1]["linear_probe_top1"] <= 1.0
    for name in ("config.json", "checkpoint.pt", "summary.json", "metrics.csv", "spectrum.json"):
        assert (tmp_path / name).is_file(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["method"] == method and config["output_dir"] == str(tmp_path)
    # The weights moved away from their (seeded) initialization.
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=False)
    cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items()})
    initial = []
    for _ in range(2):
        torch.manual_seed(cfg.seed)
        initial.append(build_method(cfg, 3, 48).state_dict()["backbone.features.0.weight"])
    assert torch.equal(initial[0], initial[1])  # the initialization is seeded ...
    assert not torch.equal(initial[0], ckpt["model"]["backbone.features.0.weight"])  # ... and training moved it
    assert ckpt["epoch"] == 1 and ckpt["step"] == 3


@pytest.mark.parametrize(
    "method, extra",
    [
        ("moco", ["--ema-momentum", "0.9"]),  # memory bank + key encoder
        ("swav", []),  # queue, frozen prototypes, multi-crop
        ("dino", []),  # teacher, center, multi-crop
    ],
)
def test_resume_reproduces_the_uninterrupted_run(tmp_path, method, extra):
    full = _train(tmp_path / "full", method, "--epochs", "3", *extra)
    first = _train(tmp_path / "split", method, "--epochs", "3", "--stop-after", "1", *extra)
    assert [r["epoch"] for r in first] == [0, 1]
    assert not (tmp_path / "split" / "summary.json").exists()
    assert main(["--resume", str(tmp_path / "split"), "--progress", "none"]) == 0
    resumed = read_metrics(str(tmp_path / "split"))
    assert [r["epoch"] for r in resumed] == [0, 1, 2, 3]
    assert _without_timing(resumed) == _without_timing(full)
    assert resumed[-1]["seconds"] >= resumed[1]["seconds"]


def test_resume_drops_records_written_after_the_checkpoint(tmp_path):
    _train(tmp_path, "simclr", "--epochs", "2", "--stop-after", "1")
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"epoch": 2, "loss": 1.0}) + "\n")
    assert main(["--resume", str(tmp_path), "--progress", "none"]) == 0
    records = read_metrics(str(tmp_path))
    assert [r["epoch"] for r in records] == [0, 1, 2] and records[2]["loss"] != 1.0


def test_collapse_ablation_flags_change_the_model(tmp_path):
    cfg = TrainConfig(method="simsiam", width=4, no_predictor=True)
    assert isinstance(build_method(cfg, 3, 48).predictor, torch.nn.Identity)
    assert not isinstance(build_method(TrainConfig(method="simsiam", width=4), 3, 48).predictor, torch.nn.Identity)
    # Without the stop-gradient the targets carry a gradient too: same weights, same batch,
    # different gradient.
    torch.manual_seed(0)
    views = [torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)]
    grads = {}
    for flag in (False, True):
        torch.manual_seed(0)
        m = build_method(TrainConfig(method="simsiam", width=4, no_stop_gradient=flag), 3, 48)
        m(views, 0).backward()
        grads[flag] = m.backbone.features[0].weight.grad.clone()
    assert not torch.allclose(grads[False], grads[True])
    # DINO without centering keeps a zero center; with it the center follows the teacher.
    _train(tmp_path / "c", "dino", "--epochs", "1")
    _train(tmp_path / "nc", "dino", "--epochs", "1", "--no-centering")
    center = torch.load(tmp_path / "c" / "checkpoint.pt", weights_only=False)["model"]["criterion.center"]
    no_center = torch.load(tmp_path / "nc" / "checkpoint.pt", weights_only=False)["model"]["criterion.center"]
    assert center.abs().max() > 0 and torch.count_nonzero(no_center) == 0


def test_byol_ablations_and_loss_args_run(tmp_path):
    records = _train(tmp_path / "a", "byol", "--epochs", "1", "--no-predictor", "--no-stop-gradient", "--ema-momentum", "0.5")
    assert math.isfinite(records[-1]["loss"])
    records = _train(tmp_path / "b", "vicreg", "--epochs", "1", "--loss-arg", "mu_param=0", "--optimizer", "lars")
    assert math.isfinite(records[-1]["loss"])
    assert json.loads((tmp_path / "b" / "config.json").read_text())["loss_args"] == {"mu_param": 0}


@pytest.mark.parametrize("precision, method", [("bf16", m) for m in METHODS] + [("fp16", "simclr"), ("fp16", "barlow_twins")])
def test_mixed_precision_paths(tmp_path, precision, method):
    # On CPU these exercise the autocast (and, for fp16, gradient-scaler) code used on GPUs:
    # networks in half precision, the losses fed half-precision embeddings outside autocast.
    records = _train(tmp_path, method, "--epochs", "1", "--precision", precision)
    assert math.isfinite(records[-1]["loss"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--batch-size", "64"], "exceeds the 48 training images"),
        (["--method", "wmse", "--batch-size", "24", "--proj-dim", "8", "--loss-arg", "w_size=16"], "multiple of it"),
        (["--dataset", "folder", "--data-path", "/nonexistent/images"], "does not exist"),
        (["--dataset", "cifar10", "--data-path", "/nonexistent/cifar.tar.gz"], "does not exist"),
        (["--method", "vicreg", "--loss-arg", "temperature=0.1"], "VICRegLoss takes"),
        (["--resume", "/nonexistent/run"], "no config.json"),
    ],
)
def test_clear_errors(tmp_path, capsys, extra, message):
    argv = ["--output-dir", str(tmp_path / "run")] + TINY + extra
    if extra[0] == "--resume":
        argv = extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def _tiny_data_args(out):
    argv = ["--output-dir", str(out), "--epochs", "1"] + TINY
    for flag in ("--num-train", "--num-test"):
        i = argv.index(flag)
        del argv[i : i + 2]
    return argv


def test_user_data_sets_train_end_to_end(tmp_path):
    rng = np.random.default_rng(0)
    _write_cifar10(tmp_path / "c" / "cifar-10-batches-py", rng)
    tarball = tmp_path / "cifar.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "c", arcname=".")
    argv = _tiny_data_args(tmp_path / "cifar") + ["--dataset", "cifar10", "--data-path", str(tarball), "--batch-size", "4"]
    assert main(argv) == 0
    records = read_metrics(str(tmp_path / "cifar"))
    assert [r["epoch"] for r in records] == [0, 1] and math.isfinite(records[1]["loss"])
    assert "linear_probe_top1" in records[1]
    pytest.importorskip("sklearn")
    assert main(_tiny_data_args(tmp_path / "digits") + ["--dataset", "digits", "--batch-size", "64"]) == 0
    assert len(read_metrics(str(tmp_path / "digits"))) == 2
    pytest.importorskip("PIL")
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            _write_png(tmp_path / "imgs" / cls / f"{i}.png", rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8))
    argv = _tiny_data_args(tmp_path / "folder") + ["--dataset", "folder", "--data-path", str(tmp_path / "imgs"), "--batch-size", "4"]
    assert main(argv) == 0
    assert len(read_metrics(str(tmp_path / "folder"))) == 2


def test_plots_written_or_skipped_with_a_warning(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    argv = ["--output-dir", str(tmp_path / "p"), "--epochs", "1", "--probe-steps", "0"] + [a for a in TINY if a != "--no-plots"]
    assert main(argv) == 0
    names = sorted(os.listdir(tmp_path / "p" / "plots"))
    assert names == ["center_vector_norm.png", "knn_top1.png", "loss.png", "spectrum.png", "stable_rank.png"]
    for name in names:
        assert (tmp_path / "p" / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setattr(plots, "_pyplot", lambda: None)
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        assert main(argv[:1] + [str(tmp_path / "q")] + argv[2:]) == 0
    assert not (tmp_path / "q" / "plots").exists()


def test_progress_fallback_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    clock = [0.0]
    monkeypatch.setattr("fastssl.train.loop.time.perf_counter", lambda: clock[0])
    p = Progress("bar", enabled=True, fallback_seconds=10.0)
    p.start_epoch(1, 2, 20)
    # Refreshed by time, not by step count: a line at the first step, then one per 10 s
    # (slow steps of 3 s here), and at the last step.
    for i in range(1, 21):
        clock[0] += 3.0
        if p.due(i, 20):
            p.update(i, 20, 0.5, 100.0)
    p.end_epoch()
    out = capsys.readouterr().out
    steps = [int(line.split()[1].split("/")[0]) for line in out.splitlines()]
    assert steps == [1, 5, 9, 13, 17, 20] and "100 img/s" in out
    quiet = Progress("bar", enabled=False)
    quiet.line("hidden")
    assert capsys.readouterr().out == ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("method", ["swav"])
def test_ddp_two_gloo_processes(tmp_path, method):
    port = _free_port()
    argv = [sys.executable, "-m", "fastssl.train", "--method", method, "--output-dir", str(tmp_path), "--device", "cpu",
            "--epochs", "1"] + TINY + METHOD_ARGS.get(method, [])
    # 48 images, 2 processes x 8: three global batches per epoch.
    argv[argv.index("--batch-size") + 1] = "8"
    argv[argv.index("--progress") + 1] = "epochs"
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("FASTSSL_BACKEND", None)
        procs.append(subprocess.Popen(argv, cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out
    records = read_metrics(str(tmp_path))
    assert [r["epoch"] for r in records] == [0, 1]
    assert math.isfinite(records[1]["loss"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["ranks"]) == 2 and ckpt["steps_per_epoch"] == 3
    # Each process draws its own augmentations.
    assert not torch.equal(ckpt["ranks"][0]["augment"], ckpt["ranks"][1]["augment"])
    # Only rank 0 reports.
    assert "2 process(es)" in outputs[0] and "epoch   1/1" in outputs[0] and "epoch" not in outputs[1]


@pytest.mark.slow
def test_compile_flag(tmp_path):
    records = _train(tmp_path, "simclr", "--epochs", "1", "--compile")
    assert math.isfinite(records[-1]["loss"])
