"""Sharded (data-parallel) training steps: the same step as one thread over the whole batch, up to
rounding; reproducible and resumable; an error in one shard is the caller's error, never a hang."""
import contextlib
import copy
import threading

import pytest
import torch
import torch.nn.functional as F

from mnistkit import fused, get_model
from mnistkit.device import resolve_shards
from mnistkit.errors import TrainingInterrupted, UsageError
from mnistkit.parallel import ShardDropout, ShardedStep, step_threads
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.runs import load_checkpoint, read_config
from mnistkit.training import SGD, resume, train

needs_kernel = pytest.mark.skipif(not fused.available(), reason=f"no fused kernel here: {fused.status()}")
CPU = torch.device("cpu")


def small(**kw):
    base = dict(epochs=2, batch_size=64, test_batch_size=500, lr=0.05, seed=3, shards=2)
    base.update(kw)
    return Recipe(**base)


@contextlib.contextmanager
def sharded(model, shards=2, seed=0):
    step = ShardedStep(model, shards, seed)
    try:
        yield step
    finally:
        step.close()


def run(step, x, y, opt, **kw):
    """One sharded step as the trainer runs it: one intra-op thread per shard."""
    with step_threads(1):
        return step(x, y, opt, channels_last=True, **kw)


def strip_timing(rows):
    return [{k: v for k, v in r.to_dict().items() if k not in ("seconds", "train_images_per_s")} for r in rows]


@needs_kernel
@pytest.mark.parametrize("name,shards,batch", [("I0", 2, 40), ("I1", 2, 40), ("I2", 3, 37), ("I3", 2, 37),
                                               ("I4", 4, 40)])
def test_a_sharded_step_is_the_whole_batch_step_up_to_rounding(name, shards, batch):
    # fp32, no dropout: loss, every gradient and every running statistic against one float64
    # step over the whole batch with PyTorch's ops. BatchNorm over each shard alone (what a
    # sharded step without the exchange would do) misses by far more than the tolerance.
    torch.manual_seed(0)
    base = get_model(name, dropout=0.0).train()
    x, y = torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))

    ref = copy.deepcopy(base).double()
    out64 = ref(x.double())
    loss64 = F.cross_entropy(out64, y)
    loss64.backward()

    model = copy.deepcopy(base).to(memory_format=torch.channels_last)
    opt = SGD(model.parameters(), lr=0.0)   # lr 0: the step leaves the weights, the gradients stay
    with sharded(model, shards) as step:
        loss, hits = run(step, x, y, opt)
    assert loss.item() == pytest.approx(loss64.item(), rel=1e-6)
    assert hits.item() == (out64.argmax(1) == y).sum().item()
    grads64 = {k: p.grad for k, p in ref.named_parameters()}
    top = max(g.abs().max() for g in grads64.values())
    for k, p in model.named_parameters():
        g = grads64[k]
        if g.abs().max() > 1e-6 * top:
            assert (p.grad.double() - g).abs().max() <= 2e-5 * g.abs().max(), k
    for k, v in ref.state_dict().items():   # running statistics, num_batches_tracked
        assert torch.allclose(model.state_dict()[k].double(), v.double(), rtol=1e-5, atol=1e-6), k


@needs_kernel
def test_bf16_sharded_step_stays_within_bf16_rounding_of_the_unsharded_one():
    # against the fp32 step: a sharded bf16 step is off by what an unsharded bf16 step is off by
    torch.manual_seed(1)
    base = get_model("I3", dropout=0.0).train().to(memory_format=torch.channels_last)
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (128,))

    def grads(bf16, shards):
        model = copy.deepcopy(base)
        fused.use_fused(model)
        opt = SGD(model.parameters(), lr=0.0)
        if shards == 1:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(x), y)
            loss.backward()
        else:
            with sharded(model, shards) as step:
                run(step, x, y, opt, bf16=bf16)
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    exact = grads(False, 1)
    errors = {shards: ((grads(True, shards) - exact).norm() / exact.norm()).item() for shards in (1, 2)}
    assert 0 < errors[2] < 2 * errors[1], errors


@needs_kernel
def test_dropout_draws_from_the_shards_generators_only():
    model = get_model("I3", dropout=0.3).train().to(memory_format=torch.channels_last)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    with sharded(model, seed=5) as step:
        assert all(type(m) is not torch.nn.Dropout for m in model.modules())
        assert sum(isinstance(m, ShardDropout) for m in model.modules()) == 2
        before = torch.get_rng_state()
        states = step.rng_state()
        run(step, x, y, SGD(model.parameters(), lr=0.0))
        assert torch.equal(torch.get_rng_state(), before)   # the global generator is untouched
        assert all(not torch.equal(a, b) for a, b in zip(states, step.rng_state()))
    # outside a sharded step, ShardDropout is nn.Dropout: same global stream, same mask
    drop, z = ShardDropout(0.3), torch.ones(1000)
    torch.manual_seed(9)
    a = drop(z)
    torch.manual_seed(9)
    assert torch.equal(a, torch.nn.Dropout(0.3)(z))


@needs_kernel
def test_an_error_in_one_shard_is_the_callers_error_and_the_next_step_works():
    model = get_model("I3", dropout=0.0).train().to(memory_format=torch.channels_last)
    opt = SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    with sharded(model) as step:
        replica = step.replicas[0]
        real = replica.forward

        def broken(inp):
            raise RuntimeError("shard 1 broke")

        replica.forward = broken
        done = {}

        def call():
            try:
                run(step, x, y, opt)
            except RuntimeError as exc:
                done["error"] = str(exc)

        t = threading.Thread(target=call)
        t.start()
        t.join(timeout=60)
        assert not t.is_alive(), "a failing shard left the step waiting"
        assert done.get("error") == "shard 1 broke"   # not the BrokenBarrierError it caused in shard 0
        replica.forward = real
        loss, _ = run(step, x, y, opt)
        assert torch.isfinite(loss)


@needs_kernel
def test_a_batch_too_small_to_split_trains_whole_in_shard_zero():
    model = get_model("I3", dropout=0.1).train().to(memory_format=torch.channels_last)
    with sharded(model) as step:
        loss, hits = run(step, torch.randn(3, 1, 28, 28), torch.randint(0, 10, (3,)), SGD(model.parameters(), lr=0.01))
    assert torch.isfinite(loss) and 0 <= hits.item() <= 3


@needs_kernel
def test_sharded_runs_repeat_exactly_and_resume_exactly(tmp_path, monkeypatch):
    data = DataOptions("synthetic", limit=1000)

    class StopAfter:
        def on_start(self, start): pass
        def on_step(self, step): pass
        def on_epoch(self, row, best):
            raise KeyboardInterrupt

    a = train("I3", small(), data, device="cpu", runs_dir=tmp_path / "a")
    b = train("I3", small(), data, device="cpu", runs_dir=tmp_path / "b")
    assert strip_timing(a.metrics) == strip_timing(b.metrics)
    config = read_config(a.run_dir)
    assert config.recipe.shards == 2 and config.recipe.bn_relu == "fused"
    with pytest.raises(TrainingInterrupted):
        train("I3", small(), data, device="cpu", runs_dir=tmp_path / "cut", callback=StopAfter())
    cut = next((tmp_path / "cut").iterdir())
    assert len(load_checkpoint(cut / "last.pt")["rng"]["shards"]) == 2
    # where its step cannot run, the run cannot be resumed: one line that says so and what to do,
    # naming neither "use shards 1" (a resumed run keeps its recipe) nor touching the folder
    before = {p.name: p.read_bytes() for p in cut.iterdir()}
    with monkeypatch.context() as m:
        m.setattr(fused, "_lib", None)
        m.setattr(fused, "_tried", True)
        m.setattr(fused, "_reason", "no C compiler (cc, gcc or clang) found")
        with pytest.raises(UsageError, match=r"was trained with 2 shards per step and resumes only with them, and a sharded step "
                           r"needs the fused BatchNorm kernel, which is not available here: no C compiler .*; resume "
                           r"it where they run \(for the kernel: a C compiler\), or start a new run with --shards 1$"):
            resume(cut, device="cpu")
        from typer.testing import CliRunner

        from mnistkit.cli import app
        out = CliRunner().invoke(app, ["train", "--resume", str(cut)])
        assert out.exit_code == 2 and "resumes only with them" in out.output and "Traceback" not in out.output
    assert {p.name: p.read_bytes() for p in cut.iterdir()} == before
    resumed = resume(cut, device="cpu")
    assert strip_timing(resumed.metrics) == strip_timing(a.metrics)
    wa = load_checkpoint(a.run_dir / "last.pt")["state_dict"]
    wc = load_checkpoint(cut / "last.pt")["state_dict"]
    assert all(torch.equal(wa[k], wc[k]) for k in wa)
    # and a sharded run is a run of its own: one thread over the whole batch ends elsewhere
    one = train("I3", small(shards=1, bn_relu="fused"), data, device="cpu", runs_dir=tmp_path / "one")
    assert strip_timing(one.metrics) != strip_timing(a.metrics)


def test_what_auto_resolves_to_and_where_shards_cannot_run(monkeypatch):
    assert resolve_shards(1, torch.device("cuda"), False) == 1   # one shard runs anywhere
    assert resolve_shards("auto", torch.device("cuda"), True) == 1
    assert resolve_shards("auto", CPU, False) == 1
    with pytest.raises(UsageError, match=r"^shards 2 cannot be used here: it runs on the CPU only; use shards 1$"):
        resolve_shards(2, torch.device("cuda"), True)
    with pytest.raises(UsageError, match="it needs channels_last"):
        resolve_shards(2, CPU, False)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert resolve_shards("auto", CPU, True) == 1   # one thread: nothing to split across
        torch.set_num_threads(2)
        assert resolve_shards("auto", CPU, True) == (2 if fused.available() else 1)
        assert resolve_shards(3, CPU, True) == 3 or not fused.available()
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(fused, "_lib", None)
    monkeypatch.setattr(fused, "_tried", True)
    monkeypatch.setattr(fused, "_reason", "no C compiler (cc, gcc or clang) found")
    assert resolve_shards("auto", CPU, True) == 1
    with pytest.raises(UsageError, match="needs the fused BatchNorm kernel, which is not available here: no C compiler"):
        resolve_shards(2, CPU, True)
    for bad in (0, 65, 2.0, True, "two"):
        with pytest.raises(UsageError, match="shards"):
            Recipe(shards=bad)
    assert Recipe.from_dict({"shards": 2}).shards == 2 and Recipe.from_dict({"shards": "auto"}).shards == "auto"
    for bad in (True, 2.5, None, [2]):   # as a change-log or a sweep spec might hold them
        with pytest.raises(UsageError, match=r"shards must be auto or a whole number, not"):
            Recipe.from_dict({"shards": bad})


def test_runs_written_before_shards_read_as_one_shard(tmp_path):
    import yaml

    result = train("I0", Recipe(epochs=1, batch_size=128, lr=0.01, shards=1), DataOptions("synthetic", limit=300),
                   device="cpu", runs_dir=tmp_path)
    path = result.run_dir / "config.yaml"
    data = yaml.safe_load(path.read_text())
    assert data["recipe"]["shards"] == 1
    del data["recipe"]["shards"]   # as 0.6 wrote it
    path.write_text(yaml.safe_dump(data))
    assert read_config(result.run_dir).recipe.shards == 1


def test_cli_shards_option(tmp_path):
    from typer.testing import CliRunner

    from mnistkit.cli import app

    runner = CliRunner()
    for bad in ("0", "65", "x", "²", "-1"):
        out = runner.invoke(app, ["train", "I3", "--shards", bad, "--dataset", "synthetic", "--limit", "200",
                                  "--runs-dir", str(tmp_path)])
        assert out.exit_code == 2 and "--shards must be auto or a whole number from 1 to 64" in out.output, bad
        assert "Traceback" not in out.output
    assert not any(tmp_path.iterdir())   # nothing half-written
