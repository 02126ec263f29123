"""The fused BatchNorm + ReLU kernel: exact against the formula, used only where it should be, and
a training step with it agrees with PyTorch's."""
import copy
import shutil
import sys
import threading
import time

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from mnistkit import fused, get_model
from mnistkit.device import resolve_bn_relu
from mnistkit.errors import UsageError
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.runs import read_config
from mnistkit.training import train

CPU = torch.device("cpu")
needs_kernel = pytest.mark.skipif(not fused.available(), reason=f"no fused kernel here: {fused.status()}")


def cl(t):
    return t.contiguous(memory_format=torch.channels_last)


@pytest.fixture
def fresh_loader(monkeypatch, tmp_path):
    """The loader's module state reset (restored afterwards), the cache in a temporary folder."""
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_tried", False)
    monkeypatch.setattr(fused, "_reason", None)
    monkeypatch.setattr(fused, "_loading", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "mnistkit"


def test_the_kernel_is_built_wherever_a_c_compiler_is():
    # a broken build must fail here, not silently fall back to PyTorch in every run
    if sys.platform.startswith("linux") and shutil.which("cc"):
        assert fused.available(), fused.status()
        assert fused.status() == "fused C kernel"


@needs_kernel
@pytest.mark.parametrize("channels", [1, 6, 10, 17, 26, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 4e-3)])
def test_kernel_matches_the_float64_formula(channels, dtype, tol):
    # 5*9*11 = 495 rows: for most channel counts the flat array ends with a partial period
    gen = torch.Generator().manual_seed(channels)
    x = cl((torch.randn(5, channels, 9, 11, generator=gen) * 3 + 2).to(dtype))
    g = cl(torch.randn(5, channels, 9, 11, generator=gen).to(dtype))
    errors = fused.check(x, g, torch.rand(channels, generator=gen) + 0.5, torch.rand(channels, generator=gen) - 0.5)
    # bf16 output and input grad carry one bf16 rounding (2^-8); sums and statistics stay fp32-exact
    assert errors["output"] <= tol and errors["input grad"] <= tol, errors
    for name in ("weight grad", "bias grad", "running mean", "running var"):
        assert errors[name] <= 1e-5, (name, errors)
    assert errors["mask flips"] == 0


@needs_kernel
def test_a_batch_over_many_chunks_with_a_large_offset():
    # 64*26*26 rows of 10 channels (many fixed chunks); a mean 50x the spread tests the shifted sums
    gen = torch.Generator().manual_seed(1)
    x = cl(torch.randn(64, 10, 26, 26, generator=gen) * 0.5 + 25)
    g = cl(torch.randn(64, 10, 26, 26, generator=gen))
    errors = fused.check(x, g, torch.linspace(0.5, 2, 10), torch.linspace(-1, 1, 10))
    assert max(errors.values()) <= 1e-4, errors


@needs_kernel
def test_which_inputs_take_the_fused_path():
    bn = nn.BatchNorm2d(10).train()
    x = cl(torch.randn(4, 10, 6, 6))
    assert fused.supports(x, bn)
    assert fused.supports(x.bfloat16(), bn)
    assert not fused.supports(x.contiguous(), bn)                     # NCHW: PyTorch's is fast there
    assert not fused.supports(x.double(), bn)
    assert not fused.supports(cl(torch.randn(1, 10, 1, 1)), bn)       # one value per channel
    assert not fused.supports(x, bn.eval())                           # evaluation folds BN instead
    assert not fused.supports(cl(torch.randn(4, 16, 6, 6)), nn.BatchNorm2d(16))  # vectorised in PyTorch
    assert not fused.supports(cl(torch.randn(4, 65, 6, 6)), nn.BatchNorm2d(65))  # beyond the kernel's period
    assert not fused.supports(x, nn.BatchNorm2d(10, momentum=None))   # cumulative average: PyTorch's


@needs_kernel
@pytest.mark.parametrize("name", ["I1", "I2", "I3", "I4"])
def test_a_training_step_with_the_kernel_is_as_exact_as_float64_allows(name):
    # one fp32 channels_last step, fused, against the same step in float64 with PyTorch's ops; no
    # dropout (its masks follow the memory layout). Conv biases before BN (I1) have a true
    # gradient of 0 and are left out of the relative error.
    torch.manual_seed(0)
    base = get_model(name, dropout=0.0).train()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))

    def step(dtype, on):
        model = copy.deepcopy(base).to(dtype)
        if on:
            model = model.to(memory_format=torch.channels_last)
            assert fused.use_fused(model) == sum(1 for m in model.modules() if isinstance(m, fused.ConvBNReLU))
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


def test_models_are_not_fused_unless_asked_and_evaluation_is_unchanged():
    model = get_model("I3")
    blocks = [m for m in model.modules() if isinstance(m, fused.ConvBNReLU)]
    assert len(blocks) == 6 and not any(b.fused for b in blocks)
    assert list(model.state_dict()) == list(copy.deepcopy(model).state_dict())
    model.eval()
    x = torch.randn(8, 1, 28, 28)
    before = model(x)
    fused.use_fused(model)
    assert all(b.fused for b in blocks)
    assert torch.equal(model(x), before)  # evaluation never takes the fused path


def test_the_off_switch_and_what_auto_resolves_to(fresh_loader, monkeypatch):
    monkeypatch.setenv("MNISTKIT_FUSED", "0")
    assert not fused.available() and "MNISTKIT_FUSED=0" in fused.status()
    assert resolve_bn_relu("auto", CPU, True) == "torch"
    with pytest.raises(UsageError, match="bn_relu 'fused' cannot be used here: turned off by MNISTKIT_FUSED=0"):
        resolve_bn_relu("fused", CPU, True)
    assert resolve_bn_relu("torch", CPU, True) == "torch"


@needs_kernel
def test_auto_needs_channels_last_and_the_cpu():
    assert resolve_bn_relu("auto", CPU, True) == "fused"
    assert resolve_bn_relu("auto", CPU, False) == "torch"
    assert resolve_bn_relu("auto", torch.device("meta"), True) == "torch"
    with pytest.raises(UsageError, match="needs channels_last"):
        resolve_bn_relu("fused", CPU, False)


@needs_kernel
def test_a_damaged_cached_library_is_rebuilt(fresh_loader):
    built = fused.library_path()
    assert built.parent == fresh_loader
    built.parent.mkdir(parents=True)
    built.write_bytes(b"not a shared library")  # e.g. a disk that filled up mid-write, by another tool
    assert fused.available(), fused.status()
    assert built.stat().st_size > 1000
    assert [p.name for p in fresh_loader.iterdir()] == [built.name]  # no temporary files left


@needs_kernel
def test_threads_asking_at_once_all_get_the_loaded_and_self_tested_kernel(fresh_loader, monkeypatch):
    # the two shards of a sharded step may be the first to ask for the kernel: the second must wait
    # for the first's load (it was told "not available" while the first compiled), and must never
    # see a kernel before its self-test has passed
    compiler, self_test = fused._compiler, fused._self_test
    in_self_test = threading.Event()

    def slow_compiler():
        time.sleep(0.3)
        return compiler()

    def failing_self_test():
        in_self_test.set()
        assert fused._lib is not None and fused.available()   # the loading thread's own calls go through
        time.sleep(0.3)
        return "made to fail"

    def ask(results, i):
        results[i] = fused.available()

    for test, expected in ((self_test, True), (failing_self_test, False)):
        monkeypatch.setattr(fused, "_tried", False)
        monkeypatch.setattr(fused, "_lib", None)
        monkeypatch.setattr(fused, "_compiler", slow_compiler)
        monkeypatch.setattr(fused, "_self_test", test)
        results = [None] * 3
        first = threading.Thread(target=ask, args=(results, 0))
        first.start()
        time.sleep(0.1)   # the first is compiling (or about to)
        others = [threading.Thread(target=ask, args=(results, i)) for i in (1, 2)]
        for t in others:
            t.start()
        if not expected:
            assert in_self_test.wait(5)
            assert fused._lib is not None   # loaded, under test: nobody else may use it yet
        for t in [first, *others]:
            t.join(10)
        assert results == [expected] * 3, results
        assert fused.available() is expected
    assert "made to fail" in fused.status()


@pytest.mark.slow
def test_no_compiler_means_pytorch_with_a_reason(fresh_loader, monkeypatch, tmp_path):
    monkeypatch.setattr(fused, "_compiler", lambda: None)
    assert not fused.available()
    assert fused.status() == "PyTorch (no C compiler (cc, gcc or clang) found)"
    # a run still trains, records what trained it, and says why
    class Starts:
        notes = ()

        def on_start(self, start):
            self.notes = start.notes

        def on_step(self, step):
            pass

        def on_epoch(self, row, best):
            pass

    seen = Starts()
    result = train("I4", Recipe(epochs=1, batch_size=128, lr=0.05, bn_relu="auto", shards=1),
                   DataOptions("synthetic", limit=256), device="cpu", runs_dir=tmp_path / "runs", callback=seen)
    assert read_config(result.run_dir).recipe.bn_relu == "torch"
    assert "BatchNorm + ReLU train with PyTorch's ops, not the fused kernel: no C compiler (cc, gcc or clang) " \
           "found" in seen.notes


@pytest.mark.slow
def test_a_run_records_its_kernel_and_older_runs_read_as_torch(tmp_path):
    result = train("I4", Recipe(epochs=1, batch_size=128, lr=0.05, bn_relu="torch", shards=1),
                   DataOptions("synthetic", limit=256), device="cpu", runs_dir=tmp_path)
    path = result.run_dir / "config.yaml"
    assert read_config(result.run_dir).recipe.bn_relu == "torch"
    data = yaml.safe_load(path.read_text())
    del data["recipe"]["bn_relu"]  # as 0.3 wrote it
    path.write_text(yaml.safe_dump(data))
    assert read_config(result.run_dir).recipe.bn_relu == "torch"
