"""What a finished run leaves behind and the commands around it: backbone export and loading,
the evaluation command, the dashboard, TensorBoard / wandb records, timm / torchvision
backbones (fake packages), the streamed folder data set, data-path inference, method
recipes, clear errors on corrupted run directories, and the collapse-experiment command.
All on tiny shapes (a few steps per run)."""

from __future__ import annotations

import json
import os
import sys
import tarfile
import types

import numpy as np
import pytest
import torch
from test_train_units import _write_cifar10, _write_png
from torch import nn

from fastssl.train import data as D
from fastssl.train import optim as O
from fastssl.train.cli import main
from fastssl.train.config import METHOD_DEFAULTS, TrainConfig, build_parser, parse_args
from fastssl.train.eval import load_backbone
from fastssl.train.eval import main as eval_main
from fastssl.train.loop import read_metrics
from fastssl.train.methods import build_method

TINY = [
    "--num-train", "48", "--num-test", "24", "--image-size", "16", "--width", "4",
    "--batch-size", "16", "--probe-steps", "5", "--progress", "none", "--threads", "1", "--no-plots",
]


def _train(out, *extra):
    assert main(["--output-dir", str(out)] + TINY + list(extra)) == 0
    return read_metrics(str(out))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One 2-epoch SimCLR run with plots, shared by the output tests."""
    out = tmp_path_factory.mktemp("run") / "simclr"
    argv = ["--output-dir", str(out), "--epochs", "2"] + [a for a in TINY if a != "--no-plots"]
    assert main(argv) == 0
    return out


def test_backbone_export_loads_with_weights_only_and_matches_the_run(finished_run, capsys):
    state = torch.load(finished_run / "backbone.pt", weights_only=True)
    pre = json.loads((finished_run / "preprocessing.json").read_text())
    assert pre["backbone"] == "tiny_cnn" and pre["image_size"] == 16 and pre["channels"] == 3 and pre["epoch"] == 2
    assert len(pre["mean"]) == len(pre["std"]) == 3 and all(s > 0 for s in pre["std"])
    # The exported weights are the checkpoint's backbone (the checkpoint loads weights_only too).
    ckpt = torch.load(finished_run / "checkpoint.pt", weights_only=True)
    for key, value in state.items():
        assert torch.equal(value, ckpt["model"][f"backbone.{key}"]), key
    net, pre2 = load_backbone(str(finished_run))
    assert pre2 == pre and not net.training
    x = torch.rand(3, 3, 16, 16)
    norm = (x - torch.tensor(pre["mean"]).view(1, 3, 1, 1)) / torch.tensor(pre["std"]).view(1, 3, 1, 1)
    cfg = TrainConfig(**{k: v for k, v in ckpt["config"].items()})
    method = build_method(cfg, 3, 48, 1, 16)
    method.load_state_dict(ckpt["model"])
    assert torch.allclose(net(norm), method.eval().features(norm))
    # The evaluation command on the run's own data reproduces the run's final kNN accuracy.
    capsys.readouterr()
    assert eval_main([str(finished_run), "--probe-steps", "5", "--threads", "1"]) == 0
    result = json.loads((finished_run / "eval-shapes.json").read_text())
    final = read_metrics(str(finished_run))[-1]
    assert result["knn_top1"] == pytest.approx(final["knn_top1"]) and result["num_test"] == 24
    assert "kNN top-1" in capsys.readouterr().out


def test_eval_command_on_another_data_set_and_its_errors(finished_run, tmp_path, capsys):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(5):
            _write_png(tmp_path / "imgs" / cls / f"{i}.png", rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8))
    out = tmp_path / "r.json"
    # --dataset inferred from the path; a backbone.pt path works as well as the run directory.
    argv = [str(finished_run / "backbone.pt"), "--data-path", str(tmp_path / "imgs"), "--probe-steps", "5", "--output", str(out)]
    assert eval_main(argv) == 0
    result = json.loads(out.read_text())
    assert result["dataset"] == "folder" and result["num_classes"] == 2 and result["num_train"] + result["num_test"] == 10
    assert 0 <= result["knn_top1"] <= 1 and 0 <= result["linear_probe_top1"] <= 1
    capsys.readouterr()
    assert eval_main([str(tmp_path / "nothing-here")]) == 2
    assert "error:" in capsys.readouterr().err
    pytest.importorskip("sklearn")
    assert eval_main([str(finished_run), "--dataset", "digits"]) == 2  # 1 channel vs 3
    assert "channel" in capsys.readouterr().err


def test_dashboard_summary_and_messages(finished_run):
    from PIL import Image

    with Image.open(finished_run / "dashboard.png") as im:
        assert im.info["dpi"][0] >= 149 and im.size[0] >= 1500
    summary = json.loads((finished_run / "summary.json").read_text())
    for name in ("backbone.pt", "preprocessing.json", "checkpoint.pt", "dashboard.png", "metrics.jsonl", "summary.json"):
        assert name in summary["files"], name
    spectra = json.loads((finished_run / "spectrum.json").read_text())
    assert len(spectra["initial"]) == len(spectra["final"]) == 128
    losses = [json.loads(line) for line in (finished_run / "losses.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in losses] == [1, 2] and [s for s, _ in losses[1]["losses"]] == [4, 5, 6]


def test_final_summary_lists_files_and_progress_messages(tmp_path, capsys):
    argv = ["--output-dir", str(tmp_path / "r"), "--epochs", "1"] + TINY
    argv[argv.index("--progress") + 1] = "epochs"
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "generating the shapes data set" in out and "evaluating the untrained network" in out
    assert "files in" in out and "backbone.pt" in out and "python -m fastssl.train.eval" in out


def test_tensorboard_scalars_match_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _train(tmp_path, "--epochs", "2", "--method", "vicreg")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    knn = [(e.step, e.value) for e in acc.Scalars("eval/knn_top1")]
    assert knn == [(r["step"], pytest.approx(r["knn_top1"])) for r in records]
    assert len(acc.Scalars("train/loss")) == 6  # every step of the 3-step epochs (steps // 10 = 0 -> 1)
    _train(tmp_path / "off", "--epochs", "1", "--no-tensorboard")
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_wandb_receives_the_metrics_records(tmp_path, monkeypatch):
    # A stand-in module: the real package needs an account or its offline service process.
    calls = {"log": [], "init": None, "finished": False}

    class FakeRun:
        summary: dict = {}

        def log(self, data, step=None):
            calls["log"].append((step, dict(data)))

        def finish(self):
            calls["finished"] = True

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.__setitem__("init", kw) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    records = _train(tmp_path, "--epochs", "1", "--wandb", "--wandb-project", "proj", "--no-tensorboard")
    assert calls["init"]["project"] == "proj" and calls["init"]["config"]["method"] == "simclr" and calls["finished"]
    evals = [(s, d) for s, d in calls["log"] if "eval/knn_top1" in d]
    assert [(s, d["eval/knn_top1"]) for s, d in evals] == [(r["step"], r["knn_top1"]) for r in records]
    # Asked for but not installed: a warning, and the run goes on.
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.warns(RuntimeWarning, match="wandb is not installed"):
        _train(tmp_path / "b", "--epochs", "1", "--wandb", "--no-tensorboard")


class _FakeNet(nn.Module):
    def __init__(self, in_chans=3, features=12):
        super().__init__()
        self.conv = nn.Conv2d(in_chans, features, 3, padding=1)
        self.fc = nn.Linear(features, 1000)  # the classifier torchvision models carry

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_timm_and_torchvision_backbones_by_name(tmp_path, monkeypatch):
    # The real torchvision wheel does not import next to this torch build: fake packages with
    # the entry points the driver calls stand in for both.
    timm = types.ModuleType("timm")

    def create_model(name, pretrained=False, num_classes=1000, in_chans=3, **kw):
        assert name == "vit_tiny_patch16_224" and not pretrained and num_classes == 0
        if "img_size" in kw:
            raise TypeError("convolutional model: no img_size")
        net = _FakeNet(in_chans, 10)
        net.fc = nn.Identity()
        return net

    timm.create_model = create_model
    tv = types.ModuleType("torchvision")
    tv.models = types.ModuleType("torchvision.models")
    tv.models.get_model = lambda name, weights=None: _FakeNet(3, 14)
    monkeypatch.setitem(sys.modules, "timm", timm)
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.models", tv.models)
    for spec, dim in (("timm:vit_tiny_patch16_224", 10), ("torchvision:resnet50", 14)):
        out = tmp_path / spec.split(":")[0]
        records = _train(out, "--epochs", "1", "--backbone", spec)
        assert records[-1]["loss"] is not None
        net, pre = load_backbone(str(out))
        assert pre["backbone"] == spec and pre["feature_dim"] == dim
        assert net(torch.zeros(2, 3, 16, 16)).shape == (2, dim)
    monkeypatch.setitem(sys.modules, "timm", None)
    assert main(["--output-dir", str(tmp_path / "x"), "--backbone", "timm:resnet18"] + TINY) == 2
    assert main(["--output-dir", str(tmp_path / "y"), "--backbone", "resnet9000"] + TINY) == 2


def test_streamed_folder_matches_the_in_memory_one(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(1)
    for cls in ("a", "b", "c"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(12):
            _write_png(tmp_path / "imgs" / cls / f"{i}.png", rng.integers(0, 255, size=(18, 20, 3), dtype=np.uint8))
    memory = D.load_image_folder(str(tmp_path / "imgs"), image_size=16, seed=3)
    stream = D.load_image_folder(str(tmp_path / "imgs"), image_size=16, seed=3, stream=True)
    assert isinstance(stream.train_images, D.StreamingImages) and stream.train_images.shape == memory.train_images.shape
    idx = torch.tensor([5, 0, 7])
    assert torch.equal(D.take(stream.train_images, idx), memory.train_images[idx])
    assert torch.equal(stream.test_labels, memory.test_labels)
    for a, b in zip(stream.channel_stats(), memory.channel_stats()):
        assert torch.allclose(a, b)
    base = ["--epochs", "1", "--data-path", str(tmp_path / "imgs"), "--batch-size", "8"]
    argv = [a for a in TINY if a not in ("--num-train", "48", "--num-test", "24")]
    runs = []
    for extra in ([], ["--stream"]):
        out = tmp_path / f"run{len(runs)}"
        assert main(["--output-dir", str(out)] + argv + base + extra) == 0
        runs.append(read_metrics(str(out)))
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("seconds", "images_per_second")} for r in rs]
    assert strip(runs[0]) == strip(runs[1])
    assert json.loads((tmp_path / "run0" / "config.json").read_text())["dataset"] == "folder"  # inferred


def test_data_path_inference(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    _write_cifar10(tmp_path / "c" / "cifar-10-batches-py", rng)
    tarball = tmp_path / "cifar.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "c", arcname=".")
    assert D.infer_dataset(str(tmp_path / "c")) == "cifar10" and D.infer_dataset(str(tarball)) == "cifar10"
    (tmp_path / "f" / "cat").mkdir(parents=True)
    assert D.infer_dataset(str(tmp_path / "f")) == "folder"
    assert parse_args(["--data-path", str(tarball)]).dataset == "cifar10"
    assert parse_args(["--data-path", str(tarball), "--dataset", "cifar10"]).dataset == "cifar10"
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(Exception, match="pass --dataset|does not exist"):
            parse_args(["--data-path", str(path)])


def test_method_recipes_apply_unless_overridden(tmp_path):
    for method, recipe in METHOD_DEFAULTS.items():
        cfg = parse_args(["--method", method])
        for key, value in recipe.items():
            if key == "loss_args":
                assert all(cfg.loss_args[k] == v for k, v in value.items())
            else:
                assert getattr(cfg, key) == value, (method, key)
        assert cfg.epochs >= 1 and cfg.optimizer in ("adamw", "sgd", "lars")
    cfg = parse_args(["--method", "simsiam", "--epochs", "3", "--optimizer", "lars"])
    assert cfg.epochs == 3 and cfg.optimizer == "lars"
    text = build_parser().format_help()
    assert "recipes" in text and "python -m fastssl.train.experiments collapse" in text


def test_invariance_recipes_centre_the_embeddings_and_set_their_augmentations():
    """The methods without negatives start from centred embeddings (a BatchNorm ends their
    projector) and use the augmentations that make colour unreliable; flags still win."""
    torch.manual_seed(0)
    for method in ("byol", "simsiam", "center_penalty"):
        cfg = parse_args(["--method", method])
        assert (tuple(cfg.crop_scale), cfg.jitter_prob, cfg.grayscale_prob, tuple(cfg.blur_probs)) == ((0.6, 1.0), 1.0, 0.4, (0.0, 0.0))
        model = build_method(TrainConfig(method=method, width=4), 3, 64)
        assert isinstance(model.projector[-1], torch.nn.BatchNorm1d), method
        # All-positive features (as after ReLU and pooling) still give embeddings whose batch
        # mean is zero, the premise of the center-vector argument.
        z = model.projector(torch.rand(16, model.feature_dim) + 1.0)
        assert z.mean(0).abs().max() < 1e-5 and z.std(0).min() > 0.5
    assert parse_args(["--method", "simsiam"]).predictor_lr_scale == 10.0
    assert list(parse_args(["--method", "byol", "--crop-scale", "0.3,1"]).crop_scale) == [0.3, 1.0]
    generic = parse_args(["--method", "simclr"])
    assert (tuple(generic.crop_scale), generic.jitter_strength, tuple(generic.blur_probs)) == ((0.25, 1.0), 0.5, (1.0, 0.1))


def test_predictor_learning_rate_rules():
    cfg = TrainConfig(method="simsiam", width=4, predictor_lr_scale=2.0, predictor_constant_lr=True)
    method = build_method(cfg, 3, 48)
    opt = O.build_optimizer(cfg, method, 256)
    predictor_ids = {id(p) for p in method.predictor.parameters()}
    O.set_lr(opt, 0.01, peak=0.5)
    for group in opt.param_groups:
        in_predictor = {id(p) in predictor_ids for p in group["params"]}
        assert len(in_predictor) == 1  # no group mixes predictor and other parameters
        assert group["lr"] == (1.0 if in_predictor.pop() else 0.01)


def _error_of(argv, capsys):
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_resume_on_corrupted_run_directories(tmp_path, capsys):
    run = tmp_path / "run"
    _train(run, "--epochs", "3", "--stop-after", "2")
    good = (run / "checkpoint.pt").read_bytes()
    resume = ["--resume", str(run), "--progress", "none"]
    cases = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "text": b"not a checkpoint\n",
    }
    for name, blob in cases.items():
        (run / "checkpoint.pt").write_bytes(blob)
        err = _error_of(resume, capsys)
        assert "error:" in err and "checkpoint.pt" in err, name
    torch.save({"weights": torch.zeros(2)}, run / "checkpoint.pt")
    assert "not a fastssl.train checkpoint" in _error_of(resume, capsys)
    # A checkpoint of another model (wider network) is refused with one line.
    other = tmp_path / "other"
    _train(other, "--epochs", "3", "--stop-after", "1", "--width", "8")
    (run / "checkpoint.pt").write_bytes((other / "checkpoint.pt").read_bytes())
    assert "does not match" in _error_of(resume, capsys)
    (run / "checkpoint.pt").write_bytes(good)
    # A damaged config.json.
    config = (run / "config.json").read_text()
    (run / "config.json").write_text(config[: len(config) // 2])
    assert "config.json" in _error_of(resume, capsys)
    (run / "config.json").write_text(config)
    # A half-written last line of metrics.jsonl is tolerated; the resume says where it starts.
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "loss": 1.2, "knn_to')
    capsys.readouterr()
    assert main(["--resume", str(run), "--progress", "epochs"]) == 0
    out = capsys.readouterr().out
    assert "resuming" in out and "at epoch 3 of 3" in out
    assert [r["epoch"] for r in read_metrics(str(run))] == [0, 1, 2, 3]
    # A damaged line in the middle is an error, not a silent loss of records.
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert "line 2" in _error_of(resume, capsys)


def test_collapse_experiment_command(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from fastssl.train.experiments import main as experiments_main

    argv = ["collapse", "--budget", "tiny", "--only", "center", "--output-dir", str(tmp_path / "doc"),
            "--runs-dir", str(tmp_path / "runs"), "--threads", "1"]
    assert experiments_main(argv) == 0
    report = (tmp_path / "doc" / "REPORT.md").read_text()
    assert "Jha et al." in report and ("supported" in report) and "center.png" in report
    # Every condition of a claim is printed with its two numbers, and whether the reference run
    # learned at all is said beside the verdict.
    results_now = json.loads((tmp_path / "doc" / "results.json").read_text())
    evidence = results_now["verdicts"][0]["evidence"]
    assert len(evidence) == 2 and all(("-- holds" in e) or ("-- does not hold" in e) for e in evidence)
    assert all(e in report for e in evidence)
    assert "itself: kNN" in report
    assert (tmp_path / "doc" / "center.png").read_bytes()[:4] == b"\x89PNG"
    results = json.loads((tmp_path / "doc" / "results.json").read_text())
    assert [r["epoch"] for r in results["records"]["center"]["invariance"]] == [0, 1, 2]
    # --reuse reads the runs instead of training again (same report).
    assert experiments_main(argv + ["--reuse"]) == 0
    assert (tmp_path / "doc" / "REPORT.md").read_text() == report
    assert "reusing" in capsys.readouterr().out
    assert experiments_main(["collapse", "--only", "nope"]) == 2
