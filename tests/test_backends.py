"""The backend seam: plain models in, mnistkit's kernels layer by layer wherever they can train a
BatchNorm exactly or draw a Dropout mask, the same statistics and state_dict whichever backend
trains; the kernels against the formula.

Kernel tests run wherever a C compiler is, and fail there (never skip) when the kernel does not
build or pass its self-test. (conftest.py turns the kernel off for every other test.)
"""
import copy
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mnistkit import backends, get_model
from mnistkit.backends import fused, kernel
from mnistkit.errors import RunError, TrainingInterrupted, UsageError
from mnistkit.training.evaluation import fold_batchnorm
from mnistkit.training.optim import SGD
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.runs import read_config
from mnistkit.training.loop import resume, train, train_step

CPU = torch.device("cpu")
COMPILER = kernel._compiler() if sys.platform.startswith("linux") else None


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.fixture
def kernel_on(monkeypatch):
    """The kernel, for a test that needs it: where a C compiler is, it must build and pass."""
    monkeypatch.delenv("MNISTKIT_FUSED", raising=False)
    if COMPILER is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    assert kernel.available(), kernel.status()
    return kernel


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader's module state reset (restored afterwards), the cache in a temporary folder."""
    monkeypatch.delenv("MNISTKIT_FUSED", raising=False)
    monkeypatch.setattr(kernel, "_lib", None)
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(kernel, "_reason", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "mnistkit" / "kernel"


class PlainNet(nn.Module):
    """What a user writes: plain nn.BatchNorm2d layers, one in a Sequential before a ReLU (fusable),
    one before a Dropout (not), one used with F.relu in forward (not), and one with 16 channels."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(1, 6, 3, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv2d(6, 10, 3, bias=False), nn.BatchNorm2d(10), nn.Dropout(0.0))
        self.conv3 = nn.Conv2d(10, 12, 3, bias=False)
        self.bn3 = nn.BatchNorm2d(12)
        self.wide = nn.Sequential(nn.Conv2d(12, 16, 3, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

    def forward(self, x):
        x = self.mid(self.block(x))
        return self.head(self.wide(F.relu(self.bn3(self.conv3(x)))))


@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_plain_batchnorm_trains_on_the_whole_batch_through_every_backend(backend, request):
    # the must-show of the core seam: whichever backend trains it, every BatchNorm of a user's plain
    # model moves its running statistics by the statistics of the whole batch, not of a part of it
    if backend == "fused":
        request.getfixturevalue("kernel_on")
    torch.manual_seed(0)
    model = PlainNet().to(memory_format=torch.channels_last)
    keys = list(model.state_dict())
    prepared = backends.prepare(model, backend, CPU, channels_last=True)
    assert prepared.backend == backend and list(model.state_dict()) == keys
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(bns) == 4
    inputs = {}
    for name, bn in bns.items():
        bn.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0].detach().clone()))
    x, y = torch.randn(64, 1, 20, 20), torch.randint(0, 10, (64,))
    optimizer = SGD(model.parameters(), lr=0.1)
    train_step(model, x, y, optimizer, channels_last=True)
    for name, bn in bns.items():
        h = inputs[name].double()
        assert h.shape[0] == 64, name   # the whole batch reached this BatchNorm
        n = h.numel() // h.shape[1]
        mean, var = h.mean((0, 2, 3)), h.var((0, 2, 3), unbiased=False) * n / (n - 1)
        assert torch.allclose(bn.running_mean.double(), 0.1 * mean, rtol=1e-4, atol=1e-6), name
        assert torch.allclose(bn.running_var.double(), 0.9 + 0.1 * var, rtol=1e-4, atol=1e-6), name
        assert int(bn.num_batches_tracked) == 1, name
    fused_here = {n for n, m in bns.items() if isinstance(m, fused.FusedBatchNorm)}
    with_relu = {n for n, m in bns.items() if isinstance(m, fused.FusedBatchNormReLU)}
    assert fused_here == ({"block.1", "mid.1", "bn3"} if backend == "fused" else set())
    assert with_relu == ({"block.1"} if backend == "fused" else set())


def test_the_fused_backend_takes_each_layer_it_can(kernel_on):
    # layer by layer: the BatchNorm before an nn.ReLU in a Sequential with its ReLU, the one before a
    # Dropout and the one used with F.relu in forward alone, the 16-channel one left to PyTorch
    model = PlainNet()
    prepared = backends.prepare(model, "fused", CPU, channels_last=True)
    assert prepared.note == ("backend fused: mnistkit's kernels train 3 of 4 BatchNorm layers (1 with the ReLU after "
                             "them) and 1 Dropout layer (their own masks); 1 BatchNorm keeps PyTorch's (a multiple of "
                             "16 channels, where PyTorch's own kernel is faster: wide.1)")
    assert type(model.mid[1]) is fused.FusedBatchNorm and type(model.bn3) is fused.FusedBatchNorm
    assert type(model.wide[1]) is nn.BatchNorm2d and isinstance(model.wide[2], nn.ReLU)
    assert isinstance(model.block[1], fused.FusedBatchNormReLU) and isinstance(model.block[2], nn.Identity)
    assert fused.why_not(nn.BatchNorm2d(10, affine=False)) and fused.why_not(nn.BatchNorm2d(65))
    assert fused.why_not(nn.BatchNorm2d(10, momentum=None)) and fused.why_not(nn.SyncBatchNorm(10))
    assert fused.why_not(nn.BatchNorm2d(10)) is None

    # a Sequential subclass may have its own forward: its BatchNorm is fused without the ReLU
    class Mine(nn.Sequential):
        def forward(self, x):
            return super().forward(x) * 2
    m = Mine(nn.BatchNorm2d(6), nn.ReLU())
    assert backends.prepare(m, "fused", CPU, True).note.startswith("backend fused: mnistkit's kernels train 1 of 1 "
                                                                   "BatchNorm layers")
    assert type(m[0]) is fused.FusedBatchNorm and type(m[1]) is nn.ReLU
    # one BatchNorm registered twice is one layer, swapped in both places; a ReLU follows it in one
    # place only, so it keeps no ReLU of its own (the other place must still pass negative values)
    bn = nn.BatchNorm2d(1)
    twice = nn.Sequential(nn.Sequential(bn, nn.ReLU()), nn.Sequential(bn))
    backends.prepare(twice, "fused", CPU, True)
    assert twice[0][0] is twice[1][0] and type(twice[0][0]) is fused.FusedBatchNorm
    assert isinstance(twice[0][1], nn.ReLU) and (twice[1](cl(torch.randn(4, 1, 28, 28))) < 0).any()


class WalksItsBlock(nn.Module):
    """A forward that walks a Sequential's children itself, adding a skip between them: the
    Sequential's own forward never runs, so its ReLU must stay where it is."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.block = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 10))

    def forward(self, x):
        x = self.stem(x)
        skip = x
        for i, layer in enumerate(self.block):
            x = layer(x)
            if i == 1:
                x = x + skip
        return self.head(x)


def test_a_relu_moves_into_a_batchnorm_only_where_its_sequential_runs_whole(kernel_on):
    torch.manual_seed(0)
    model = WalksItsBlock().to(memory_format=torch.channels_last)
    plain = copy.deepcopy(model)
    prepared = backends.prepare(model, "fused", CPU, True)
    assert type(model.block[1]) is fused.FusedBatchNorm and isinstance(model.block[2], nn.ReLU)
    assert prepared.kernels == {"block.1": "batchnorm"}
    x = cl(torch.randn(8, 1, 28, 28))
    assert torch.allclose(model.train()(x), plain.train()(x), atol=1e-5)


def test_the_registered_models_are_plain_pytorch():
    import mnistkit.models as models

    assert "backends" not in open(models.__file__).read()
    for name in ("I1", "I2", "I3", "I4", "I5"):
        kinds = {type(m) for m in get_model(name).modules()}
        assert kinds <= {models.I1, models.I2, models.I3, models.I4, models.I5, nn.Sequential, nn.Conv2d, nn.BatchNorm2d,
                         nn.ReLU, nn.Dropout, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Linear}, kinds


@pytest.mark.parametrize("name,fused_layers", [("I1", 2), ("I2", 1), ("I3", 6), ("I4", 5), ("I5", 3)])
def test_fusing_a_model_keeps_its_parameters_keys_and_evaluation(kernel_on, name, fused_layers):
    torch.manual_seed(0)
    plain = get_model(name).eval()
    model = copy.deepcopy(plain).train()
    params = [id(p) for p in model.parameters()]
    note = backends.prepare(model, "fused", CPU, True).note
    assert note.startswith(f"backend fused: mnistkit's kernels train {fused_layers} of ")
    assert [id(p) for p in model.parameters()] == params   # the same tensors: the optimizer sees them
    assert list(model.state_dict()) == list(plain.state_dict())
    model.eval()
    x = torch.randn(8, 1, 28, 28)
    assert torch.allclose(model(x), plain(x), atol=1e-5)
    assert torch.allclose(fold_batchnorm(model)(x), plain(x), atol=1e-4)   # folding keeps the fused ReLU
    reloaded = get_model(name)
    reloaded.load_state_dict(model.state_dict())   # a checkpoint of a fused run loads into the plain model


def test_auto_the_off_switch_and_fused_where_it_cannot_run(monkeypatch):
    monkeypatch.setenv("MNISTKIT_FUSED", "0")
    assert not kernel.available() and "MNISTKIT_FUSED=0" in kernel.status()
    assert backends.resolve("auto", CPU) == ("torch", "turned off by MNISTKIT_FUSED=0")
    assert backends.resolve("torch", CPU) == ("torch", None)
    with pytest.raises(UsageError, match="backend 'fused' cannot be used here: turned off by MNISTKIT_FUSED=0"):
        backends.resolve("fused", CPU)
    model = get_model("I3")
    note = backends.prepare(model, "auto", CPU, True).note
    assert note == "backend torch: PyTorch's own ops (mnistkit's kernels: turned off by MNISTKIT_FUSED=0)"
    assert all(type(m) in (nn.BatchNorm2d, nn.Dropout) for m in model.modules()
               if isinstance(m, (nn.BatchNorm2d, nn.Dropout)))


def test_auto_takes_the_kernels_on_the_cpu(kernel_on):
    assert backends.resolve("auto", CPU) == ("fused", None)
    assert backends.resolve("auto", torch.device("meta")) == ("torch", "they run on the CPU only")
    with pytest.raises(UsageError, match="CPU only"):
        backends.resolve("fused", torch.device("meta"))
    # in PyTorch's default layout (a `view` head): the Dropout kernel, BatchNorm left to PyTorch
    model = get_model("I3")
    prepared = backends.prepare(model, "auto", CPU, channels_last=False)
    assert prepared.backend == "fused" and prepared.note.endswith(
        "6 BatchNorm keep PyTorch's (the model trains in PyTorch's default layout, not channels_last: net.c1.bn, "
        "net.c2.bn, net.c3.bn, net.c4.bn, net.c5.bn, net.c6.bn)")
    assert "train 0 of 6 BatchNorm layers and 2 Dropout layers" in prepared.note


def test_the_kernel_is_built_wherever_a_c_compiler_is(kernel_on):
    assert kernel.status() == "available"


@pytest.mark.parametrize("channels", [1, 6, 10, 17, 26, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 4e-3)])
@pytest.mark.parametrize("relu", [True, False])
def test_kernel_matches_the_float64_formula(kernel_on, channels, dtype, tol, relu):
    # 5*9*11 = 495 rows: for most channel counts the flat array ends with a partial period
    gen = torch.Generator().manual_seed(channels)
    x = cl((torch.randn(5, channels, 9, 11, generator=gen) * 3 + 2).to(dtype))
    g = cl(torch.randn(5, channels, 9, 11, generator=gen).to(dtype))
    errors = fused.check(x, g, torch.rand(channels, generator=gen) + 0.5, torch.rand(channels, generator=gen) - 0.5,
                         relu)
    # bf16 output and input grad carry one bf16 rounding (2^-8); sums and statistics stay fp32-exact
    assert errors["output"] <= tol and errors["input grad"] <= tol, errors
    for name in ("weight grad", "bias grad", "running mean", "running var"):
        assert errors[name] <= 1e-5, (name, errors)
    assert errors["mask flips"] == 0


def test_a_batch_over_many_chunks_with_a_large_offset(kernel_on):
    # 64*26*26 rows of 10 channels (many fixed chunks); a mean 50x the spread tests the shifted sums
    gen = torch.Generator().manual_seed(1)
    x = cl(torch.randn(64, 10, 26, 26, generator=gen) * 0.5 + 25)
    g = cl(torch.randn(64, 10, 26, 26, generator=gen))
    errors = fused.check(x, g, torch.linspace(0.5, 2, 10), torch.linspace(-1, 1, 10))
    assert max(errors.values()) <= 1e-4, errors


def test_inputs_the_kernel_does_not_take_go_to_pytorch(kernel_on):
    bn = fused.FusedBatchNormReLU(10).train()
    x = torch.randn(4, 10, 6, 6)   # NCHW: PyTorch's ops, the same result
    assert torch.allclose(bn(x), torch.relu(nn.BatchNorm2d(10).train()(x)), atol=1e-6)
    with pytest.raises(ValueError, match="more than 1 value per channel"):   # as PyTorch says it
        bn(cl(torch.randn(1, 10, 1, 1)))


# Not I5: there one BN weight's gradient (net.c3.bn, 16 channels, PyTorch's own op) nearly cancels,
# and PyTorch's fp32 step is 1.4% from float64 on it without the kernel (0.7% with): fp32's limit, not the kernel's
@pytest.mark.parametrize("name", ["I1", "I2", "I3", "I4"])
def test_a_training_step_with_the_kernel_is_as_exact_as_float64_allows(kernel_on, name):
    # one fp32 channels_last step, fused, against the same step in float64 with PyTorch's ops; no
    # dropout. Conv biases before BN (I1) have a true gradient of 0 and are left out.
    torch.manual_seed(0)
    base = get_model(name, dropout=0.0).train()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))

    def step(dtype, on):
        model = copy.deepcopy(base).to(dtype)
        if on:
            model = backends.prepare(model.to(memory_format=torch.channels_last), "fused", CPU, True).model
        loss = F.cross_entropy(model(cl(x.to(dtype)) if on else x.to(dtype)), y)
        loss.backward()
        return loss.item(), {k: p.grad.double() for k, p in model.named_parameters()}, model.state_dict()

    loss64, grads64, state64 = step(torch.float64, False)
    loss32, grads32, state32 = step(torch.float32, True)
    assert loss32 == pytest.approx(loss64, rel=1e-6)
    top = max(g.abs().max() for g in grads64.values())
    for k, g in grads64.items():
        if g.abs().max() > 1e-6 * top:
            assert (grads32[k] - g).abs().max() <= 2e-5 * g.abs().max(), k
    for k in state64:  # running statistics and num_batches_tracked move the same way
        assert torch.allclose(state32[k].double(), state64[k].double(), rtol=1e-5, atol=1e-6), k


@pytest.mark.slow
def test_a_damaged_cached_library_is_rebuilt(fresh_loader):
    if COMPILER is None:
        pytest.skip("no C compiler here")
    built = kernel.library_path()
    assert built.parent == fresh_loader
    built.parent.mkdir(mode=0o700, parents=True)
    built.write_bytes(b"not a shared library")  # e.g. a disk that filled up mid-write
    built.chmod(0o600)
    assert kernel.available(), kernel.status()
    assert built.stat().st_size > 1000
    assert [p.name for p in fresh_loader.iterdir()] == [built.name]  # no temporary files left


def test_a_library_others_could_have_planted_is_never_loaded(fresh_loader):
    if COMPILER is None:
        pytest.skip("no C compiler here")
    built = kernel.library_path()
    built.parent.mkdir(mode=0o700, parents=True)
    built.write_bytes(b"planted")
    built.chmod(0o666)   # writable by anyone: it may not be ours
    assert not kernel.available()
    assert "is not private to this user" in kernel.status() and built.read_bytes() == b"planted"
    kernel._tried = False
    built.unlink()
    fresh_loader.chmod(0o777)   # a cache folder anyone can write to
    assert not kernel.available() and "not private" in kernel.status()
    assert not built.exists()


@pytest.mark.slow
def test_threads_asking_at_once_all_get_the_self_tested_kernel(fresh_loader, monkeypatch):
    if COMPILER is None:
        pytest.skip("no C compiler here")
    compiler = kernel._compiler

    def slow_compiler():
        time.sleep(0.3)
        return compiler()

    monkeypatch.setattr(kernel, "_compiler", slow_compiler)
    results = [None] * 3
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, kernel.available())) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [True] * 3, results
    monkeypatch.setattr(kernel, "_tried", False)
    monkeypatch.setattr(fused, "self_test", lambda: "made to fail")
    assert not kernel.available() and "made to fail" in kernel.status() and kernel._lib is None


class Starts:
    notes = ()

    def on_start(self, start):
        self.notes = start.notes

    def on_step(self, step):
        pass

    def on_epoch(self, row, best):
        pass


@pytest.mark.slow
def test_no_compiler_means_pytorch_and_the_run_says_why(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setattr(kernel, "_compiler", lambda: None)
    assert not kernel.available() and kernel.status() == "no C compiler (cc, gcc or clang) found"
    seen = Starts()
    result = train("I4", Recipe(epochs=1, batch_size=128, lr=0.05), DataOptions("synthetic", limit=256), device="cpu",
                   runs_dir=tmp_path / "runs", callback=seen)
    assert read_config(result.run_dir).recipe.backend == "torch"
    assert "backend torch: PyTorch's own ops (mnistkit's kernels: no C compiler (cc, gcc or clang) found)" in seen.notes


@pytest.mark.slow
def test_a_run_records_its_backend_and_runs_of_0_8_are_one_line(kernel_on, tmp_path):
    seen = Starts()
    result = train("I4", Recipe(epochs=1, batch_size=128, lr=0.05), DataOptions("synthetic", limit=256), device="cpu",
                   runs_dir=tmp_path, callback=seen)
    assert read_config(result.run_dir).recipe.backend == "fused"   # what auto meant here
    config = yaml.safe_load((result.run_dir / "config.yaml").read_text())   # and what it did, by layer
    assert sorted(config["kernels"].values()) == ["batchnorm+relu"] * 5 + ["dropout"] * 2, config["kernels"]
    assert config["kernels_source"] == kernel.source_digest() and len(config["kernels_source"]) == 23
    assert seen.notes[0].startswith("backend fused: mnistkit's kernels train 5 of 5 BatchNorm layers (5 with the ReLU "
                                    "after them) and 2 Dropout layers")
    # a run of 0.8 or older recorded no backend (bn_relu, shards): one line naming the version that reads it
    path = result.run_dir / "config.yaml"
    data = yaml.safe_load(path.read_text())
    for recorded in ({}, {"bn_relu": "fused", "shards": 2, "optimizer": "sgd"}):
        recipe = {k: v for k, v in data["recipe"].items() if k != "backend"}
        path.write_text(yaml.safe_dump({**data, "recipe": {**recipe, **recorded}}))
        with pytest.raises(RunError, match="was recorded by mnistkit 0.8 or older .* mnistkit 0.11 is the last version "
                                           "that reads it"):
            read_config(result.run_dir)


def test_a_change_log_with_the_old_keys_is_told_what_replaced_them():
    for key, says in (("bn_relu", "was replaced by backend in 0.9"), ("shards", "was removed in 0.9"),
                      ("optimizer", "was removed in 0.9")):
        with pytest.raises(UsageError, match=f"recipe: {key} {says}"):
            Recipe.from_dict({key: "auto"})


def test_no_compiler_found_skips_only_the_kernel_tests():
    # the kernel tests above skip only where there is no C compiler; here is one, so they ran
    if sys.platform.startswith("linux") and shutil.which("cc"):
        assert COMPILER is not None


def test_auto_records_torch_where_the_kernels_would_train_nothing(kernel_on):
    # I0 has no BatchNorm and no Dropout; a model of 16-channel layers has none the kernel takes:
    # recorded as torch, so that resuming it never needs the kernels
    for model, why in ((get_model("I0"), "no BatchNorm or Dropout layer mnistkit's kernels train)"),
                       (nn.Sequential(nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16), nn.ReLU()), "kernels train; a multiple")):
        prepared = backends.prepare(model, "auto", CPU, True)
        assert prepared.backend == "torch" and why in prepared.note, prepared.note


def test_a_fused_block_wider_than_the_kernel_uses_pytorch(kernel_on):
    # the kernel's per-channel arrays hold 64: a hand-made wider block must never reach it
    bn = fused.FusedBatchNormReLU(80).train()
    x = cl(torch.randn(4, 80, 5, 5))
    assert torch.allclose(bn(x), torch.relu(nn.BatchNorm2d(80).train()(x)), atol=1e-5)


def test_the_kernel_source_is_packaged():
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+

    root = Path(__file__).resolve().parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["mnistkit"]
    assert "backends/_kernels.c" in data and "templates/project/*" in data
    assert all(any(f.is_file() for f in (root / "mnistkit").glob(p)) for p in data)
    assert (root / "mnistkit" / "templates" / "project" / "experiments.yaml").is_file()


# --------------------------------------------------------------------------- Dropout's mask kernel


def test_the_dropout_kernel_masks_scales_and_reproduces(kernel_on):
    from mnistkit.backends.dropout import KernelDropout

    drop = KernelDropout(0.1).train()
    for dtype in (torch.float32, torch.bfloat16):
        x = cl(torch.randn(64, 10, 28, 28).to(dtype)).requires_grad_(True)
        torch.manual_seed(3)
        y = drop(x)
        kept = y != 0
        n = kept.numel()
        # about 1 - p kept (within 5 standard deviations), kept values scaled by 1 / (1 - p)
        assert abs(kept.float().mean().item() - 0.9) < 5 * (0.09 / n) ** 0.5
        scale = torch.tensor(1 / 0.9, dtype=torch.float32)
        assert torch.equal(y[kept], (x[kept].float() * scale).to(dtype))
        assert y.is_contiguous(memory_format=torch.channels_last)   # the layout it came in
        # neighbours drop independently: both of a pair of elements dropped about p^2 of the time
        flat = kept.permute(0, 2, 3, 1).reshape(-1, 2)
        both = (~flat[:, 0] & ~flat[:, 1]).float().mean().item()
        assert abs(both - 0.01) < 5 * (0.01 * 0.99 / flat.shape[0]) ** 0.5
        grad = torch.randn_like(y)
        y.backward(grad)
        assert torch.equal(x.grad, (grad.float() * scale * kept).to(dtype))
        # the same seed, the same mask; the next call, another
        torch.manual_seed(3)
        again = drop(x.detach())
        assert torch.equal(again, y.detach()) and not torch.equal(drop(x.detach()) != 0, kept)
    # evaluation, p = 0 and p = 1, a tensor that is not dense: as PyTorch's nn.Dropout
    x = torch.randn(8, 10, 6, 6)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(KernelDropout(0.0).train()(x), x) and not KernelDropout(1.0).train()(x).any()
    # the gradient of a sum comes in expanded (every stride 0): the backward pass takes it too
    xs = cl(torch.randn(8, 10, 6, 6)).requires_grad_(True)
    kept = KernelDropout(0.5).train()(xs) != 0
    torch.manual_seed(5)
    KernelDropout(0.5).train()(xs).sum().backward()
    torch.manual_seed(5)
    kept = KernelDropout(0.5).train()(xs.detach()) != 0
    assert torch.equal(xs.grad, kept * 2.0)
    strided = x[:, ::2]
    out = KernelDropout(0.5).train()(strided)
    assert set(torch.unique(out[out != 0] / strided[out != 0]).round(decimals=4).tolist()) == {2.0}


def test_a_runs_dropout_masks_follow_its_seed(kernel_on):
    # the same weights and batches: the same seed gives bit-identical steps, another seed other
    # masks (the only random draws of these steps are the masks)
    torch.manual_seed(0)
    start = nn.Sequential(nn.Conv2d(1, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.2), nn.Flatten(),
                          nn.Linear(6 * 26 * 26, 10))

    def one(seed):
        model = copy.deepcopy(start).to(memory_format=torch.channels_last)
        prepared = backends.prepare(model, "fused", CPU, True)
        assert prepared.kernels == {"1": "batchnorm+relu", "3": "dropout"}
        opt = SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(seed)
        for _ in range(3):
            train_step(model, torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen),
                       opt, channels_last=True, bf16=True)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(one(1), one(1)) and not torch.equal(one(1), one(2))


@pytest.mark.slow
def test_a_resumed_run_of_a_model_of_ones_own_continues_its_kernels_masks(kernel_on, tmp_path):
    # a user's file, with Dropout and BatchNorm the kernels train: a run interrupted after epoch 1
    # resumes (its layers were swapped only after its architecture was recorded) and ends
    # bit-identical to an uninterrupted one, its masks continuing from the saved generator
    class StopAfterOne:
        def on_start(self, start): pass
        def on_step(self, step): pass
        def on_epoch(self, row, best): raise KeyboardInterrupt

    ref = f"{STUDENTS / 'relu_before_bn.py'}:Net"
    recipe, data = Recipe(epochs=2, batch_size=64, lr=0.05), DataOptions("synthetic", limit=256)
    full = train(ref, recipe, data, device="cpu", runs_dir=tmp_path / "full")
    assert yaml.safe_load((full.run_dir / "config.yaml").read_text())["kernels"]["drop"] == "dropout"
    with pytest.raises(TrainingInterrupted):
        train(ref, recipe, data, device="cpu", runs_dir=tmp_path / "cut", callback=StopAfterOne())
    resumed = resume(next((tmp_path / "cut").iterdir()), device="cpu")
    def rows(result):
        return [{k: v for k, v in r.to_dict().items() if k not in ("seconds", "train_images_per_s")}
                for r in result.metrics]

    assert rows(resumed) == rows(full)
    a = torch.load(full.run_dir / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(resumed.run_dir / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


STUDENTS = Path(__file__).resolve().parent.parent / "bench" / "models"


def _student(name):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"student_{name}", STUDENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Net()


@pytest.mark.parametrize("name,note", [
    ("dropout_blocks", "train 5 of 6 BatchNorm layers (4 with the ReLU after them) and 5 Dropout layers (their own "
                       "masks); 1 BatchNorm keeps PyTorch's (a multiple of 16 channels"),
    ("relu_before_bn", "train 3 of 5 BatchNorm layers and 1 Dropout layer (their own masks); 2 BatchNorm keep "
                       "PyTorch's (a multiple of 16 channels"),
])
def test_student_models_take_the_kernels_layer_by_layer(kernel_on, name, note):
    # the benchmark's two student shapes: Conv-BN-ReLU-Dropout blocks with one BatchNorm not followed
    # by a ReLU; ReLU before BatchNorm with F.relu in forward and one Dropout after every layer
    torch.manual_seed(0)
    plain = _student(name).eval()
    model = copy.deepcopy(plain)
    params = [id(p) for p in model.parameters()]
    prepared = backends.prepare(model.to(memory_format=torch.channels_last).train(), "auto", CPU, True)
    assert prepared.backend == "fused" and note in prepared.note, prepared.note
    assert [id(p) for p in model.parameters()] == params and list(model.state_dict()) == list(plain.state_dict())
    assert "dropout" in prepared.kernels.values()
    x = torch.randn(8, 1, 28, 28)
    assert torch.allclose(model.eval()(cl(x)), plain(x), atol=1e-5)
    # one fp32 step without dropout against float64 with PyTorch's ops
    for m in (plain, model):
        for d in m.modules():
            if isinstance(d, nn.Dropout):
                d.p = 0.0
    y = torch.randint(0, 10, (8,))

    def grads(net, dtype, layout):
        net = copy.deepcopy(net).to(dtype).train()
        F.nll_loss(net(x.to(dtype).contiguous(memory_format=layout)), y).backward()
        return {k: p.grad.double() for k, p in net.named_parameters()}

    g64, g32 = grads(plain, torch.float64, torch.contiguous_format), grads(model, torch.float32, torch.channels_last)
    top = max(g.abs().max() for g in g64.values())
    for k, g in g64.items():
        if g.abs().max() > 1e-6 * top:
            assert (g32[k] - g).abs().max() <= 1e-4 * g.abs().max(), k
