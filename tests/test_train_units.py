"""Unit tests of the pretraining driver's parts: configuration, data loaders, augmentations,
optimizers and schedules, evaluation."""

from __future__ import annotations

import json
import math
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastssl.train import augment as A
from fastssl.train import data as D
from fastssl.train import evaluate as E
from fastssl.train import optim as O
from fastssl.train.config import ConfigError, TrainConfig, parse_args, parse_loss_args
from fastssl.train.methods import build_method, cosine_momentum, ema_update, loss_arguments

# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------


def test_defaults_parse_and_flags_override_config_file(tmp_path):
    cfg = parse_args([])
    assert cfg == TrainConfig(loss_args={})
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"method": "vicreg", "batch-size": 32, "epochs": 3, "loss_args": {"mu_param": 0}}))
    cfg = parse_args(["--config", str(path), "--epochs", "5", "--loss-arg", "nu_param=2.5"])
    assert (cfg.method, cfg.batch_size, cfg.epochs) == ("vicreg", 32, 5)
    assert cfg.loss_args == {"mu_param": 0, "nu_param": 2.5}


def test_yaml_config_file(tmp_path):
    pytest.importorskip("yaml")
    path = tmp_path / "run.yaml"
    path.write_text("method: byol\nema_momentum: 0.9\nloss_arg: ['eps=1e-6']\n")
    cfg = parse_args(["--config", str(path)])
    assert (cfg.method, cfg.ema_momentum, cfg.loss_args) == ("byol", 0.9, {"eps": 1e-6})


def test_loss_arg_values_are_python_literals():
    parsed = parse_loss_args(["a=0", "b=1e-3", "c=True", "d=(4096, 128)", "e=zca", "f='x'"])
    assert parsed == {"a": 0, "b": 1e-3, "c": True, "d": (4096, 128), "e": "zca", "f": "x"}
    assert isinstance(parsed["a"], int)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_loss_args(["novalue"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--no-centering"], "applies to dino"),
        (["--method", "simclr", "--no-predictor"], "apply to"),
        (["--method", "simclr", "--ema-momentum", "0.9"], "applies to"),
        (["--method", "byol", "--ema-momentum", "1.5"], r"\[0, 1\]"),
        (["--dataset", "cifar10"], "needs --data-path"),
        (["--crop-scale", "0.5,0.2"], "lo <= hi"),
        (["--epochs", "0"], "epochs"),
        (["--queue-size", "8"], "applies to swav"),
    ],
)
def test_bad_flag_combinations_raise(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(argv)


def test_unknown_choice_and_unknown_file_key(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--method", "nope"])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"methd": "simclr"}))
    with pytest.raises(ConfigError, match="unknown setting 'methd'"):
        parse_args(["--config", str(path)])
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", str(tmp_path / "missing.json")])


def test_loss_args_are_checked_against_the_loss_signature():
    cfg = TrainConfig(method="vicreg", loss_args={"mu_param": 0, "lambda_param": 10.0})
    assert loss_arguments(cfg, {}) == {"mu_param": 0, "lambda_param": 10.0}
    method = build_method(cfg, in_channels=3, num_train=64)
    assert method.criterion.mu_param == 0 and method.criterion.lambda_param == 10.0
    with pytest.raises(ConfigError, match="VICRegLoss takes"):
        loss_arguments(TrainConfig(method="vicreg", loss_args={"temperature": 0.1}), {})
    with pytest.raises(ConfigError, match="set by the driver"):
        loss_arguments(TrainConfig(method="simclr", loss_args={"gather_distributed": True}), {})
    with pytest.raises(ConfigError, match="NTXentLoss"):  # the loss's own validation, reported as a config error
        build_method(TrainConfig(method="simclr", loss_args={"temperature": float("nan")}), 3, 64)


def test_method_batch_constraints():
    with pytest.raises(ConfigError, match="multiple of it"):
        build_method(TrainConfig(method="wmse", batch_size=24, proj_dim=8, loss_args={"w_size": 16}), 3, 64)
    with pytest.raises(ConfigError, match="at least 2"):
        build_method(TrainConfig(method="barlow_twins", batch_size=1), 3, 64)
    build_method(TrainConfig(method="wmse", batch_size=32, proj_dim=8, loss_args={"w_size": 16}), 3, 64)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def test_shapes_are_deterministic_balanced_and_varied():
    a = D.generate_shapes(60, 20, image_size=16, seed=3)
    b = D.generate_shapes(60, 20, image_size=16, seed=3)
    c = D.generate_shapes(60, 20, image_size=16, seed=4)
    assert a.train_images.shape == (60, 3, 16, 16) and a.train_images.dtype == torch.uint8
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images, c.train_images)
    counts = torch.cat([a.train_labels, a.test_labels]).bincount(minlength=10)
    assert counts.tolist() == [8] * 10
    # No two images alike, and real contrast within each image (the shape is visible).
    flat = a.train_images.flatten(1).float()
    assert torch.cdist(flat, flat).add(torch.eye(60) * 1e9).min() > 0
    assert (flat.amax(1) - flat.amin(1)).min() > 60


def test_shape_classes_are_invariant_to_horizontal_flip():
    # Each class's mask, drawn centred, equals its own mirror image (so a flip keeps the class).
    coords = torch.linspace(-1.2, 1.2, 41)
    v, u = torch.meshgrid(coords, coords, indexing="ij")
    for cls in range(len(D.SHAPE_CLASSES)):
        inside = D._inside(cls, u, v) > 0
        assert inside.any()
        assert torch.equal(inside, inside.flip(-1)), D.SHAPE_CLASSES[cls]
    # ... and the classes differ from each other.
    masks = torch.stack([(D._inside(c, u, v) > 0).flatten() for c in range(10)]).float()
    assert torch.cdist(masks, masks).add(torch.eye(10) * 1e9).min() > 0


def test_digits():
    pytest.importorskip("sklearn")
    d = D.load_digits(image_size=12, test_fraction=0.25, seed=0)
    assert d.train_images.shape[1:] == (1, 12, 12)
    assert d.train_images.shape[0] + d.test_images.shape[0] == 1797
    assert abs(d.test_images.shape[0] - 1797 * 0.25) <= 1
    assert set(d.train_labels.tolist()) == set(range(10))


def _write_png(path, array):
    from PIL import Image

    Image.fromarray(array).save(path)


def test_image_folder_random_split_and_train_val_layout(tmp_path):
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    root = tmp_path / "flat"
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            _write_png(root / cls / f"{i}.png", rng.integers(0, 255, size=(20 + i, 30, 3), dtype=np.uint8))
    (root / "cat" / "notes.txt").write_text("not an image")
    d = D.load_image_folder(str(root), image_size=16, test_fraction=0.2, seed=0)
    assert d.classes == ["cat", "dog"]
    assert d.train_images.shape == (8, 3, 16, 16) and d.test_images.shape == (2, 3, 16, 16)
    assert sorted(torch.cat([d.train_labels, d.test_labels]).tolist()) == [0] * 5 + [1] * 5
    # A uniform image decodes to its colour exactly (resize of a constant is the constant).
    split = tmp_path / "split"
    for part, n in (("train", 2), ("val", 1)):
        for cls, colour in (("a", 10), ("b", 200)):
            (split / part / cls).mkdir(parents=True)
            for i in range(n):
                _write_png(split / part / cls / f"{i}.png", np.full((8, 12, 3), colour, dtype=np.uint8))
    d = D.load_image_folder(str(split), image_size=6)
    assert d.train_images.shape == (4, 3, 6, 6) and d.test_images.shape == (2, 3, 6, 6)
    assert d.test_labels.tolist() == [0, 1]
    assert d.test_images[0].unique().tolist() == [10] and d.test_images[1].unique().tolist() == [200]


def test_image_folder_errors(tmp_path):
    with pytest.raises(D.DataError, match="not a directory"):
        D.load_image_folder(str(tmp_path / "missing"))
    pytest.importorskip("PIL")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(D.DataError, match="no images"):
        D.load_image_folder(str(tmp_path / "empty"))
    with pytest.raises(D.DataError, match="does not exist"):
        D.load_dataset("folder", str(tmp_path / "nope"))


def _cifar_batch(n, rng, label_key):
    return {b"data": rng.integers(0, 255, size=(n, 3072), dtype=np.uint8), label_key: rng.integers(0, 10, size=n).tolist()}


def _write_cifar10(folder, rng):
    folder.mkdir(parents=True)
    batches = {}
    for name, n in (("data_batch_1", 6), ("data_batch_2", 4), ("test_batch", 5)):
        batches[name] = _cifar_batch(n, rng, b"labels")
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, f)
    return batches


def test_cifar10_folder_and_tarball(tmp_path):
    rng = np.random.default_rng(0)
    batches = _write_cifar10(tmp_path / "cifar-10-batches-py", rng)
    expected_train = np.concatenate([batches["data_batch_1"][b"data"], batches["data_batch_2"][b"data"]]).reshape(-1, 3, 32, 32)
    for path in (tmp_path, tmp_path / "cifar-10-batches-py"):
        d = D.load_cifar(str(path), "cifar10")
        assert torch.equal(d.train_images, torch.from_numpy(expected_train))
        assert d.train_labels.tolist() == batches["data_batch_1"][b"labels"] + batches["data_batch_2"][b"labels"]
        assert d.test_images.shape == (5, 3, 32, 32) and d.classes[3] == "c3"
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(tmp_path / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    d = D.load_cifar(str(tarball), "cifar10", image_size=16)
    assert d.train_images.shape == (10, 3, 16, 16)
    assert d.test_labels.tolist() == batches["test_batch"][b"labels"]
    with pytest.raises(D.DataError, match="no cifar100 batches"):
        D.load_cifar(str(tarball), "cifar100")


def test_cifar100_and_bad_files(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name, n in (("train", 7), ("test", 3)):
        batch = _cifar_batch(n, rng, b"fine_labels")
        batch[b"fine_labels"] = rng.integers(0, 100, size=n).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    d = D.load_cifar(str(tmp_path), "cifar100")
    assert d.train_images.shape == (7, 3, 32, 32) and d.test_images.shape == (3, 3, 32, 32)
    (folder / "test").write_bytes(b"garbage")
    with pytest.raises(D.DataError, match="not a CIFAR"):
        D.load_cifar(str(tmp_path), "cifar100")
    (tmp_path / "x.tar.gz").write_bytes(b"not a tarball")
    with pytest.raises(D.DataError, match="tar archive"):
        D.load_cifar(str(tmp_path / "x.tar.gz"), "cifar10")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_epoch_batches_shard_disjointly_and_drop_the_incomplete_batch(world):
    n, b = 50, 4
    shards = []
    for rank in range(world):
        gen = torch.Generator().manual_seed(7)
        shards.append(list(D.epoch_batches(n, b, gen, rank, world)))
    steps = D.steps_per_epoch(n, b, world)
    assert all(len(s) == steps for s in shards)
    all_idx = torch.cat([torch.cat(s) for s in shards])
    assert all_idx.numel() == steps * b * world and all_idx.unique().numel() == all_idx.numel()
    assert all(len(batch) == b for s in shards for batch in s)


# ---------------------------------------------------------------------------------------------
# Augmentations
# ---------------------------------------------------------------------------------------------


def test_views_shapes_ranges_and_determinism():
    x = torch.rand(6, 3, 16, 16)
    views = A.make_views(16, num_local_crops=2, local_crop_size=7)
    assert [v.size for v in views] == [16, 16, 7, 7]
    assert [v.blur_prob for v in views] == [1.0, 0.1, 0.1, 0.1]
    outs = [A.augment(x, v, torch.Generator().manual_seed(1)) for v in views]
    again = [A.augment(x, v, torch.Generator().manual_seed(1)) for v in views]
    for o, o2, v in zip(outs, again, views):
        assert o.shape == (6, 3, v.size, v.size) and torch.isfinite(o).all()
        assert o.min() >= 0 and o.max() <= 1
        assert torch.equal(o, o2)
    assert not torch.equal(outs[0], A.augment(x, views[0], torch.Generator().manual_seed(2)))


def test_flip_mirrors_the_crop():
    x = torch.rand(5, 3, 12, 12)
    plain = A.random_resized_crop(x, 10, (0.3, 0.9), 0.0, torch.Generator().manual_seed(0))
    flipped = A.random_resized_crop(x, 10, (0.3, 0.9), 1.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-6, rtol=0)


def test_crop_samples_inside_the_box():
    # An image whose value is its column index: a crop's values span a sub-range of columns,
    # whose width matches the box (area fraction 0.25 -> side fraction 0.43 .. 0.58).
    cols = torch.arange(32, dtype=torch.float32).view(1, 1, 1, 32).expand(64, 1, 32, 32).contiguous()
    out = A.random_resized_crop(cols, 32, (0.25, 0.25), 0.0, torch.Generator().manual_seed(0))
    span = out.amax(dim=(1, 2, 3)) - out.amin(dim=(1, 2, 3))
    assert span.min() > 0.43 * 32 - 2 and span.max() < 0.58 * 32 + 1
    assert (out.amin(dim=(1, 2, 3)) >= 0).all() and (out.amax(dim=(1, 2, 3)) <= 31).all()


def test_colour_transforms():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 9, 9)
    assert torch.equal(A.color_jitter(x, 0.5, 0.0, gen), x)
    y = A.color_jitter(x, 0.5, 1.0, gen)
    assert not torch.allclose(y, x) and y.min() >= 0 and y.max() <= 1
    g = A.random_grayscale(x, 1.0, gen)
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    torch.testing.assert_close(g[:, 0], 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])
    # Hue rotation: orthogonal, keeps gray (the rotation axis) and, at 2π/3, cycles the channels.
    rot = A._hue_rotation(torch.tensor([0.3, 2 * math.pi / 3]))
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(3).expand(2, 3, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(rot @ torch.ones(3), torch.ones(2, 3), atol=1e-6, rtol=0)
    torch.testing.assert_close(rot[1] @ torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)
    s = A.random_solarize(x, 1.0, gen)
    torch.testing.assert_close(s, torch.where(x >= 0.5, 1 - x, x))
    # Single-channel images: jitter touches brightness/contrast only, grayscale is a no-op.
    one = torch.rand(4, 1, 9, 9)
    assert A.color_jitter(one, 0.5, 1.0, gen).shape == one.shape
    assert torch.equal(A.random_grayscale(one, 1.0, gen), one)


def test_blur_smooths_and_keeps_the_mean():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 32, 32)
    assert torch.equal(A.gaussian_blur(x, 0.0, gen), x)
    y = A.gaussian_blur(x, 1.0, gen, sigma_range=(1.5, 2.0))
    assert y.std() < 0.75 * x.std()
    torch.testing.assert_close(y.mean(dim=(2, 3)), x.mean(dim=(2, 3)), atol=0.02, rtol=0)
    const = torch.full((2, 3, 8, 8), 0.3)
    torch.testing.assert_close(A.gaussian_blur(const, 1.0, gen), const)


# ---------------------------------------------------------------------------------------------
# Optimization
# ---------------------------------------------------------------------------------------------


def test_warmup_cosine_schedule():
    peak, total, warm = 1.0, 100, 10
    lrs = [O.lr_at(s, total, warm, peak, 0.1) for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert O.lr_at(total, total, warm, peak, 0.1) == pytest.approx(0.1)
    assert O.lr_at(55, total, warm, peak, 0.0) == pytest.approx(0.5)


def test_lars_step_matches_the_formula():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(torch.randn(3))
    opt = O.LARS([{"params": [w], "weight_decay": 0.1, "lars": True}, {"params": [b], "weight_decay": 0.0, "lars": False}], lr=0.5, momentum=0.9)
    gw, gb = torch.randn(4, 3), torch.randn(3)
    w0, b0 = w.detach().clone(), b.detach().clone()
    w.grad, b.grad = gw.clone(), gb.clone()
    opt.step()
    g = gw + 0.1 * w0
    trust = 1e-3 * w0.norm() / g.norm()
    torch.testing.assert_close(w.detach(), w0 - 0.5 * trust * g)
    torch.testing.assert_close(b.detach(), b0 - 0.5 * gb)
    # Second step: momentum accumulates the scaled update.
    w1 = w.detach().clone()
    w.grad = gw.clone()
    opt.step()
    g2 = gw + 0.1 * w1
    buf = 0.9 * trust * g + 1e-3 * w1.norm() / g2.norm() * g2
    torch.testing.assert_close(w.detach(), w1 - 0.5 * buf)


def test_optimizers_exclude_norm_and_bias_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    for name in ("sgd", "lars", "adamw"):
        opt = O.build_optimizer(TrainConfig(optimizer=name, weight_decay=0.3), model, global_batch=512)
        decayed = [g for g in opt.param_groups if g["weight_decay"] > 0]
        assert len(decayed) == 1 and decayed[0]["params"] == [model[0].weight]
        assert opt.param_groups[0]["lr"] == pytest.approx(O.DEFAULT_LR[name] * 2)


def test_ema_update_and_momentum_schedule():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    online, target = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        online.weight.copy_(torch.randn(3))
        online.running_mean.copy_(torch.randn(3))
    before = target.weight.detach().clone()
    ema_update(target, online, 0.75)
    torch.testing.assert_close(target.weight, 0.75 * before + 0.25 * online.weight.detach())
    torch.testing.assert_close(target.running_mean, online.running_mean)


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------


def _knn_brute_force(train, train_labels, test, k, t):
    preds = []
    for q in test:
        sims = F.cosine_similarity(q.unsqueeze(0), train, dim=1)
        order = sorted(range(len(train)), key=lambda i: -float(sims[i]))[:k]
        votes = {}
        for i in order:
            votes[int(train_labels[i])] = votes.get(int(train_labels[i]), 0.0) + math.exp(float(sims[i]) / t)
        preds.append(max(votes, key=votes.get))
    return preds


def test_knn_matches_brute_force():
    torch.manual_seed(1)
    train, labels = torch.randn(40, 5), torch.randint(0, 4, (40,))
    test, test_labels = torch.randn(17, 5), torch.randint(0, 4, (17,))
    for k, t in ((1, 0.1), (5, 0.1), (20, 0.5), (100, 0.1)):
        expected = _knn_brute_force(train, labels, test, min(k, 40), t)
        accuracy = sum(int(p == int(y)) for p, y in zip(expected, test_labels)) / 17
        assert E.knn_top1(train, labels, test, test_labels, k, t, chunk=5) == pytest.approx(accuracy)


def test_knn_and_probe_on_separable_and_random_labels():
    torch.manual_seed(2)
    centers = torch.randn(3, 8) * 5
    y_tr, y_te = torch.randint(0, 3, (90,)), torch.randint(0, 3, (30,))
    x_tr, x_te = centers[y_tr] + torch.randn(90, 8) * 0.3, centers[y_te] + torch.randn(30, 8) * 0.3
    assert E.knn_top1(x_tr, y_tr, x_te, y_te, k=5) == 1.0
    train_acc, test_acc = E.linear_probe(x_tr, y_tr, x_te, y_te, steps=50)
    assert train_acc == 1.0 and test_acc == 1.0
    # Features unrelated to the labels: the held-out accuracy stays near chance.
    noise_te = torch.randn(300, 8)
    _, chance = E.linear_probe(torch.randn(300, 8), torch.randint(0, 3, (300,)), noise_te, torch.randint(0, 3, (300,)), steps=50)
    assert chance < 0.5


def test_embedding_metrics_flag_collapse():
    torch.manual_seed(3)
    healthy = E.embedding_metrics(torch.randn(200, 16))
    collapsed = E.embedding_metrics(torch.randn(1, 16).expand(200, 16) + 1e-4 * torch.randn(200, 16))
    assert healthy["stable_rank"] > 8 and healthy["center_vector_norm"] < 0.2
    assert healthy["std_of_l2_normalized"] == pytest.approx(1 / 4, rel=0.2)
    assert collapsed["center_vector_norm"] > 0.99 and collapsed["std_of_l2_normalized"] < 1e-3
    spectrum = E.covariance_spectrum(torch.randn(50, 6))
    assert spectrum.shape == (6,) and (spectrum[:-1] >= spectrum[1:]).all()


@pytest.mark.parametrize("method, weight", [("swav", "prototypes.weight"), ("dino", "head.last_layer.weight")])
def test_prototypes_are_frozen_for_the_first_epochs(method, weight):
    torch.manual_seed(0)
    cfg = TrainConfig(method=method, width=4, prototypes=8, freeze_prototypes_epochs=2)
    m = build_method(cfg, 3, 64)
    views = [torch.randn(8, 3, 16, 16) for _ in range(3)]
    param = m.get_parameter(weight)
    for epoch, frozen in ((0, True), (1, True), (2, False)):
        m.zero_grad(set_to_none=True)
        m(views, epoch).backward()
        assert param.grad is not None and param.grad.abs().sum() > 0
        m.after_backward(epoch)
        assert (param.grad is None) == frozen


def test_swav_queue_keeps_the_newest_embeddings_first():
    torch.manual_seed(0)
    m = build_method(TrainConfig(method="swav", width=4, prototypes=8, queue_size=12), 3, 64)
    dim = m.queue.shape[2]
    m.embed = lambda z: z  # feed embeddings directly: the queue content is then known exactly
    batches = [[F.normalize(torch.randn(5, dim), dim=1) for _ in range(2)] for _ in range(3)]
    for i, views in enumerate(batches):
        m(views, 1)
        assert int(m.queue_filled) == 5 * (i + 1)
    for view in range(2):
        expected = torch.cat([batches[2][view], batches[1][view], batches[0][view][:2]])
        torch.testing.assert_close(m.queue[view], expected)
    # Once full, the queue's scores join Sinkhorn: the loss differs from a queue-less one.
    with_queue = m(batches[0], 1)
    m.queue_filled.zero_()
    without = m(batches[0], 1)
    assert not torch.isclose(with_queue, without)


def test_swav_recipe_applies_its_settings_and_head():
    cfg = TrainConfig(method="swav")
    # Fixed prototypes, no small crops, colour-unreliable augmentations (docs/training.md).
    assert cfg.num_local_crops == 0 and cfg.freeze_prototypes_epochs >= 1000 * cfg.epochs
    assert tuple(cfg.crop_scale) == (0.6, 1.0) and cfg.jitter_prob == 1.0 and cfg.jitter_strength == 1.0
    assert cfg.grayscale_prob == 0.4 and max(cfg.blur_probs) == 0.0
    # Flags still override the recipe.
    cfg = parse_args(["--method", "swav", "--num-local-crops", "2", "--freeze-prototypes-epochs", "1"])
    assert cfg.num_local_crops == 2 and cfg.freeze_prototypes_epochs == 1
    for num_train, proj_dim, expected_k in ((4000, None, 2000), (100, None, 512), (10**6, 64, 3000), (100, 200, 800)):
        m = build_method(TrainConfig(method="swav", width=4, proj_dim=proj_dim), 3, num_train)
        dim = m.prototypes.weight.shape[1]
        assert m.prototypes.weight.shape[0] == expected_k
        # The prototypes span the embedding space: no embedding scores 0 against all of them
        # (with K <= d one does, and the loss sits at log K with no gradient).
        assert int(torch.linalg.matrix_rank(m.prototypes.weight.detach())) == dim
        # The projector ends in a BatchNorm (centred embeddings before the L2 norm).
        assert isinstance(m.projector[-1], torch.nn.BatchNorm1d) and m.projector[-1].num_features == dim


def test_swav_recipe_keeps_the_prototypes_fixed_while_training():
    torch.manual_seed(0)
    cfg = TrainConfig(method="swav", width=4, epochs=3)
    m = build_method(cfg, 3, 64)
    optimizer = O.build_optimizer(cfg, m, 8)
    before = m.prototypes.weight.detach().clone()
    backbone_before = [p.detach().clone() for p in m.backbone.parameters()]
    views = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    for epoch in range(cfg.epochs):
        optimizer.zero_grad(set_to_none=True)
        m(views, epoch).backward()
        m.after_backward(epoch)
        optimizer.step()
    torch.testing.assert_close(m.prototypes.weight, before, rtol=0, atol=0)
    assert any(not torch.equal(p, q) for p, q in zip(m.backbone.parameters(), backbone_before))


def test_dino_recipe_and_centring_head():
    # DINO's recipe (docs/training.md): no small crops, colour-unreliable augmentations,
    # teacher momentum 0.99; flags still override each part.
    cfg = TrainConfig(method="dino")
    assert (cfg.num_local_crops, cfg.ema_momentum, cfg.epochs, cfg.lr) == (0, 0.99, 15, 2e-3)
    assert (cfg.jitter_prob, cfg.jitter_strength, tuple(cfg.crop_scale)) == (1.0, 1.0, (0.6, 1.0))
    assert TrainConfig(method="dino", num_local_crops=2, ema_momentum=0.996).num_local_crops == 2
    # The head's hidden BatchNorms (student and teacher) spread features that share one large
    # positive component, as the untrained CNN's do; without them all bottleneck directions
    # nearly coincide. The BN-free head keeps the layer names of earlier checkpoints.
    from fastssl.train.models import DINOHead

    m = build_method(TrainConfig(method="dino", width=4, prototypes=8), 3, 64)
    for head in (m.head, m.teacher_head):
        assert sum(isinstance(layer, torch.nn.BatchNorm1d) for layer in head.mlp) == 2
    torch.manual_seed(0)
    features = 5.0 + 0.5 * torch.rand(64, 8)
    spread = {}
    for batch_norm in (False, True):
        torch.manual_seed(0)
        head = DINOHead(8, 32, 16, 8, batch_norm=batch_norm)
        spread[batch_norm] = F.normalize(head.mlp(features), dim=1).mean(0).norm()
        assert head(features).shape == (64, 8)
    assert spread[False] > 0.99 and spread[True] < 0.6
    plain = DINOHead(8, 16, 4, 8)
    assert [k for k in plain.state_dict() if k.startswith("mlp.")] == [
        f"mlp.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")
    ]
