import math
import signal

import pytest
import torch

from mnistkit.training.device import resolve_device, resolve_precision
from mnistkit.errors import TrainingDiverged, TrainingInterrupted, UsageError
from mnistkit.training.evaluation import evaluate_checkpoint, per_class_report
from mnistkit.experiments import resolve_recipe
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.runs.checkpoint import load_checkpoint
from mnistkit.runs import read_config, read_metrics
from mnistkit.training.loop import resume, train

SYN = DataOptions("synthetic")
pytestmark = pytest.mark.slow  # most tests here train a model for a second or two


def strip_timing(rows):
    return [{k: v for k, v in r.to_dict().items() if k not in ("seconds", "train_images_per_s")} for r in rows]


class StopAfter:
    """A callback that presses Ctrl-C after ``n`` epochs of this call (as a user would)."""

    def __init__(self, n):
        self.n, self.seen, self.best_flags, self.start = n, 0, [], None

    def on_start(self, start):
        self.start = start

    def on_step(self, step):
        pass

    def on_epoch(self, row, best):
        self.best_flags.append(best)
        self.seen += 1
        if self.seen >= self.n:
            raise KeyboardInterrupt


def small(epochs=2, **kw):
    # a gentle LR: with ~12 steps per epoch, OneCycle's warm-up to 0.2 can blow up the FC models
    return Recipe(epochs=epochs, batch_size=128, **{"lr": 0.05, **kw})


def test_training_lifts_accuracy_well_above_chance(tmp_path):
    result = train("I3", Recipe(epochs=3), SYN, device="cpu", runs_dir=tmp_path)
    assert result.metrics[-1].test_acc >= 95.0  # chance is 10%
    assert result.metrics[-1].train_loss < result.metrics[0].train_loss


def test_same_seed_gives_identical_metrics_and_another_seed_does_not(tmp_path):
    runs = [train("I1", small(), DataOptions("synthetic", limit=1500), device="cpu", runs_dir=tmp_path / str(i))
            for i in range(2)]
    assert strip_timing(runs[0].metrics) == strip_timing(runs[1].metrics)
    other = train("I1", small(seed=7), DataOptions("synthetic", limit=1500), device="cpu", runs_dir=tmp_path / "o")
    assert strip_timing(other.metrics) != strip_timing(runs[0].metrics)


def test_run_folder_contents(tmp_path):
    result = train("I3", small(epochs=1), DataOptions("synthetic", limit=500), device="cpu", runs_dir=tmp_path)
    folder = result.run_dir
    assert folder.parent == tmp_path and folder.name.startswith("I3-")
    assert {p.name for p in folder.iterdir()} == {"config.yaml", "metrics.jsonl", "last.pt", "best.pt", ".lock"}
    config = read_config(folder)
    assert config.model == "I3" and config.recipe.epochs == 1 and config.data.limit == 500
    # reproducible from the folder alone; "auto" precision and backend are recorded as what they
    # meant here (the tests turn the kernel off: auto is torch; tests/test_backends.py has fused)
    cpu = torch.device("cpu")
    assert small(epochs=1).backend == "auto"
    assert config.recipe == small(epochs=1).replace(precision=resolve_precision("auto", cpu), backend="torch")
    assert config.recipe.precision in ("fp32", "bf16")
    assert read_metrics(folder) == result.metrics
    ckpt = load_checkpoint(folder / "last.pt")
    assert ckpt["epoch"] == 1 and ckpt["params"] == 14_500 and "torch" in ckpt["versions"]
    assert config.measured_on == {"dataset": "synthetic", "official_mnist": False, "train_samples": 500,
                                     "val_samples": 0, "test_samples": 1000, "full_training_set": False}


def test_checkpoint_evaluates_to_the_recorded_accuracy(tmp_path):
    result = train("I3", small(), DataOptions("synthetic", limit=2000), device="cpu", runs_dir=tmp_path)
    report = evaluate_checkpoint(result.run_dir, device="cpu")
    best = result.best
    assert report.epoch == best.epoch
    assert report.test_acc == pytest.approx(best.test_acc, abs=1e-9)
    assert report.test_loss == pytest.approx(best.test_loss, rel=1e-5)
    assert sum(map(sum, report.confusion_matrix)) == report.samples == 1000


def test_checkpoint_loss_uses_the_runs_own_label_smoothing(tmp_path):
    result = train("I3", small(label_smoothing=0.1), DataOptions("synthetic", limit=1500), device="cpu",
                   runs_dir=tmp_path)
    report = evaluate_checkpoint(result.run_dir, device="cpu")
    assert report.test_loss == pytest.approx(result.best.test_loss, rel=1e-5)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    data = DataOptions("synthetic", limit=1500)
    full = train("I2", small(epochs=3), data, device="cpu", runs_dir=tmp_path / "full")
    with pytest.raises(TrainingInterrupted) as info:
        train("I2", small(epochs=3), data, device="cpu", runs_dir=tmp_path / "cut", callback=StopAfter(1))
    cut_dir = next((tmp_path / "cut").iterdir())
    assert f"mnistkit train --resume {cut_dir}" in str(info.value)
    assert len(read_metrics(cut_dir)) == 1
    resumed = resume(cut_dir, device="cpu")
    assert resumed.run_dir == cut_dir
    assert strip_timing(resumed.metrics) == strip_timing(full.metrics)
    assert torch.equal(load_checkpoint(cut_dir / "last.pt")["state_dict"]["net.fc.weight"],
                       load_checkpoint(full.run_dir / "last.pt")["state_dict"]["net.fc.weight"])


def test_ctrl_c_while_an_epoch_is_being_saved_leaves_consistent_files(tmp_path, monkeypatch):
    # Ctrl-C lands while best.pt is being written (the window CI once hit between metrics.jsonl
    # and last.pt): the epoch's files must still be written whole and agree with each other.
    import os

    import mnistkit.files.outputs as runs

    real_stage = runs._stage
    staged = []

    def stage_then_ctrl_c(path, raw):
        staged.append(path.name)
        if path.name == "best.pt" and staged.count("best.pt") == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return real_stage(path, raw)

    # Python's default handler, whatever was installed before (a background job ignores SIGINT)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        monkeypatch.setattr(runs, "_stage", stage_then_ctrl_c)
        mine = lambda signum, frame: (_ for _ in ()).throw(KeyboardInterrupt)  # noqa: E731
        signal.signal(signal.SIGINT, mine)
        with pytest.raises(TrainingInterrupted) as info:
            train("I3", small(epochs=3), DataOptions("synthetic", limit=500), device="cpu", runs_dir=tmp_path)
        assert signal.getsignal(signal.SIGINT) is mine  # the handler installed before the call is put back
    finally:
        signal.signal(signal.SIGINT, before)
    run = next(tmp_path.iterdir())
    assert "after epoch 1 of 3" in str(info.value)
    assert [r.epoch for r in read_metrics(run)] == [1]
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and load_checkpoint(run / "best.pt")["epoch"] == 1


def finite(state_dict):
    return all(bool(torch.isfinite(t).all()) for t in state_dict.values() if t.is_floating_point())


def test_divergence_stops_with_a_clear_message_and_keeps_no_bad_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged) as info:
        train("I0", small(epochs=1, lr=1e6, scheduler="none"), DataOptions("synthetic", limit=1000),
              device="cpu", runs_dir=tmp_path)
    assert "learning rate" in str(info.value) and "no epoch finished with finite numbers" in str(info.value)
    folder = next(tmp_path.iterdir())
    last = load_checkpoint(folder / "last.pt")
    assert last["epoch"] == 0 and finite(last["state_dict"]) and not (folder / "best.pt").exists()


def test_a_non_finite_test_loss_is_divergence_even_in_the_last_epoch(tmp_path, monkeypatch):
    # the training loss stays finite; only the evaluation goes bad (the case that used to exit 0)
    import mnistkit.training.loop as training
    from mnistkit.training.evaluation import SplitResult

    real = training.evaluate
    calls = []

    def nan_on_second_epoch(model, batches, label_smoothing=0.0):
        calls.append(1)
        result = real(model, batches, label_smoothing)
        return SplitResult(float("nan"), result.acc, result.n) if len(calls) == 2 else result

    monkeypatch.setattr(training, "evaluate", nan_on_second_epoch)
    with pytest.raises(TrainingDiverged) as info:
        train("I3", small(epochs=2), DataOptions("synthetic", limit=500), device="cpu", runs_dir=tmp_path)
    folder = next(tmp_path.iterdir())
    assert "test loss became nan at epoch 2" in str(info.value) and "holds epoch 1" in str(info.value)
    assert [r.epoch for r in read_metrics(folder)] == [1]
    for name in ("last.pt", "best.pt"):
        ckpt = load_checkpoint(folder / name)
        assert ckpt["epoch"] == 1 and finite(ckpt["state_dict"])
        assert all(math.isfinite(r["test_loss"]) for r in ckpt["metrics"])


def test_validation_split_chooses_best_and_is_held_out(tmp_path):
    from mnistkit.data import hold_out

    result = train("I3", small(epochs=3), DataOptions("synthetic", val=1000, limit=1000), device="cpu",
                   runs_dir=tmp_path)
    config = read_config(result.run_dir)
    assert config.data.val == 1000 and config.measured_on["train_samples"] == 1000
    assert config.measured_on["val_samples"] == 1000 and not config.measured_on["full_training_set"]
    assert all(r.val_acc is not None for r in result.metrics)
    assert result.best == max(result.metrics, key=lambda r: (r.val_acc, -r.epoch))  # on validation, not test
    assert load_checkpoint(result.run_dir / "best.pt")["epoch"] == result.best.epoch
    assert result.to_dict()["best_selected_on"] == "validation"
    # the split is a fixed draw: the same images every time, disjoint from the rest, which keeps its order
    from mnistkit.data import Split

    ids = torch.arange(6000)
    full = Split(ids.view(-1, 1, 1).expand(-1, 28, 28), ids)  # each image carries its index
    rest, held = hold_out(full, 1000, 0)
    assert torch.equal(held.labels, hold_out(full, 1000, 0)[1].labels) and len(rest) == 5000
    assert not torch.equal(held.labels, hold_out(full, 1000, 1)[1].labels)  # val_seed picks another draw
    assert torch.equal(torch.cat([rest.labels, held.labels]).sort().values, ids)
    assert bool((rest.labels.diff() > 0).all())


def test_resumed_run_stars_only_a_real_new_best(tmp_path):
    data = DataOptions("synthetic", limit=1500)
    first = StopAfter(2)
    with pytest.raises(TrainingInterrupted):
        train("I3", small(epochs=3, lr=1e-5, scheduler="none"), data, device="cpu", runs_dir=tmp_path,
              callback=first)
    run = next(tmp_path.iterdir())
    after = StopAfter(99)
    result = resume(run, device="cpu", callback=after)
    assert after.start.best is not None and after.start.best.epoch in (1, 2)  # the display is told the best so far
    third = result.metrics[2]
    previous_best = max(r.test_acc for r in result.metrics[:2])
    assert after.best_flags == [third.test_acc > previous_best]


def test_recipes_come_from_experiments_yaml_and_cli_overrides_win():
    i0 = resolve_recipe("I0")
    assert (i0.epochs, i0.lr, i0.scheduler, i0.dropout) == (1, 0.1, "step", 0.0)
    i3 = resolve_recipe("I3", epochs=2, lr=None)
    assert (i3.epochs, i3.lr, i3.scheduler, i3.batch_size, i3.weight_decay, i3.seed) == (2, 0.2, "onecycle", 128,
                                                                                          0.0005, 42)
    assert i3.augment.degrees == 10 and i3.augment.translate == 0.05
    assert resolve_recipe("I3", batch_size=256).batch_size == 256  # an option wins over the change-log


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": -1}, {"lr": 0.0}, {"scheduler": "cosine"}])
def test_bad_recipe_values(bad):
    with pytest.raises(UsageError):
        Recipe(**bad)


def test_recipe_from_dict_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(UsageError, match="unknown key 'learning_rate'"):
        Recipe.from_dict({"learning_rate": 0.1})
    with pytest.raises(UsageError, match="epochs must be int"):
        Recipe.from_dict({"epochs": "ten"})


def test_devices():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device("cuda:x")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_limit_larger_than_dataset(tmp_path):
    with pytest.raises(UsageError, match="larger than"):
        train("I3", small(), DataOptions("synthetic", limit=10**6), device="cpu", runs_dir=tmp_path)


def test_per_class_report():
    labels = torch.tensor([0, 0, 1, 1, 2])
    preds = torch.tensor([0, 1, 1, 1, 0])
    r = per_class_report(labels, preds, classes=3)
    assert r["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    c0, c1, c2 = r["per_class"]
    assert (c0["recall"], c0["precision"]) == (50.0, 50.0)
    assert (c1["recall"], round(c1["precision"], 4)) == (100.0, 66.6667)
    assert c2["recall"] == 0.0 and c2["precision"] is None  # never predicted: undefined (JSON null), not 0


def test_precision_choice_is_honoured_and_fp32_is_exactly_reproducible(tmp_path):
    data = DataOptions("synthetic", limit=1500)
    a = train("I3", small(epochs=1, precision="fp32", channels_last=False), data, device="cpu", runs_dir=tmp_path / "a")
    b = train("I3", small(epochs=1, precision="fp32", channels_last=True), data, device="cpu", runs_dir=tmp_path / "b")
    assert read_config(a.run_dir).recipe.precision == "fp32"
    assert read_config(b.run_dir).recipe.channels_last is True
    c = train("I3", small(epochs=1, precision="bf16"), data, device="cpu", runs_dir=tmp_path / "c")
    assert read_config(c.run_dir).recipe.precision == "bf16"
    assert c.metrics[0].train_loss != a.metrics[0].train_loss  # bf16 really ran
    assert abs(c.metrics[0].train_loss - a.metrics[0].train_loss) < 0.1
    with pytest.raises(UsageError, match="precision"):
        Recipe(precision="fp8")


def test_a_run_too_short_for_onecycle_still_trains_and_says_so(tmp_path):
    seen = {}

    class Spy:
        def on_start(self, start):
            seen["notes"] = start.notes

        def on_step(self, step):
            pass

        def on_epoch(self, row, best):
            pass

    result = train("I3", small(epochs=1), DataOptions("synthetic", limit=256), device="cpu", runs_dir=tmp_path,
                   callback=Spy())
    assert len(result.metrics) == 1
    assert any("stretched to 6 steps" in note for note in seen["notes"])  # 2 steps < 1 / pct_start


def test_channels_last_does_not_change_the_mathematics():
    from mnistkit.models import get_model

    torch.manual_seed(0)
    model = get_model("I1").eval()
    x = torch.randn(8, 1, 28, 28)
    want = model(x)
    got = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("model", ["I0", "I1", "I2", "I3", "I4"])
def test_a_quick_run_of_every_iteration_learns_and_stays_finite(tmp_path, model):
    # 2 epochs of the synthetic set (48 steps): OneCycle reaches lr 0.2 within 10 steps, which
    # drove I1 and I2 (FC heads) to NaN before their recipes clipped the gradient norm at 5
    recipe = resolve_recipe(model, epochs=2, seed=1)
    result = train(model, recipe, DataOptions("synthetic"), device="cpu", runs_dir=tmp_path)
    assert all(math.isfinite(r.train_loss) and math.isfinite(r.test_loss) for r in result.metrics)
    assert result.metrics[-1].test_acc >= 40.0  # chance is 10% (I2 ends at 47% on the fixed synthetic set)


@pytest.mark.parametrize("nesterov", [False, True])
def test_mnistkits_sgd_is_torchs_sgd_bit_for_bit(nesterov):
    # mnistkit's SGD skips torch's compile wrappers (start-up); the update and the state must not change
    from mnistkit.models import get_model
    from mnistkit.training.optim import SGD

    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    results = []
    for cls in (torch.optim.SGD, SGD):
        torch.manual_seed(0)
        model = get_model("I2", dropout=0.0)
        opt = cls(model.parameters(), lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=10)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
        results.append((torch.cat([p.detach().flatten() for p in model.parameters()]), opt.state_dict()))
    assert torch.equal(results[0][0], results[1][0])
    a, b = results[0][1], results[1][1]
    assert a["param_groups"] == b["param_groups"]
    assert all(torch.equal(a["state"][k]["momentum_buffer"], b["state"][k]["momentum_buffer"]) for k in a["state"])
    opt.load_state_dict(a)  # a torch.optim.SGD state loads into mnistkit's (old runs resume)
    assert torch.equal(opt.state_dict()["state"][0]["momentum_buffer"], a["state"][0]["momentum_buffer"])


def test_gradient_clipping_acts_only_above_the_limit():
    from mnistkit.models import get_model
    from mnistkit.training.optim import build_optimizer
    from mnistkit.training.loop import train_step

    x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    states = []
    for clip in (0.0, 1e9, 1e-3):
        torch.manual_seed(0)
        model = get_model("I3", dropout=0.0)
        opt = build_optimizer(model, Recipe(lr=0.1, momentum=0.0))
        train_step(model, x, y, opt, grad_clip=clip)
        states.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(states[0], states[1])  # a limit that is not reached changes nothing, bit for bit
    assert not torch.allclose(states[0], states[2])


def test_weight_average_follows_its_formula_and_copies_integer_buffers():
    from mnistkit.models import get_model
    from mnistkit.training.optim import WeightAverage

    torch.manual_seed(0)
    model = get_model("I3")
    avg = WeightAverage(model, 0.9)
    before = {k: v.clone() for k, v in avg.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.net.c1.bn.running_mean.add_(2.0)
        model.net.c1.bn.num_batches_tracked.add_(5)
    avg.update(100)  # ramp: min(0.9, 101/110) = 0.9
    live = model.state_dict()
    for key, old in before.items():
        got = avg.model.state_dict()[key]
        if old.is_floating_point():
            torch.testing.assert_close(got, 0.9 * old + 0.1 * live[key])
        else:
            assert torch.equal(got, live[key])
    assert not any(p.requires_grad for p in avg.model.parameters()) and not avg.model.training
    avg.update(0)  # the first step's decay is 1/10: the average is mostly the live weights
    torch.testing.assert_close(avg.model.net.c1.conv.weight,
                               0.1 * (0.9 * before["net.c1.conv.weight"] + 0.1 * live["net.c1.conv.weight"])
                               + 0.9 * live["net.c1.conv.weight"])


def test_with_a_moving_average_the_average_is_evaluated_saved_and_resumed_exactly(tmp_path):
    data = DataOptions("synthetic", limit=1500)
    recipe = small(epochs=3, ema=0.99)
    full = train("I3", recipe, data, device="cpu", runs_dir=tmp_path / "full")
    plain = train("I3", small(epochs=3), data, device="cpu", runs_dir=tmp_path / "plain")
    assert strip_timing(full.metrics) != strip_timing(plain.metrics)
    # the same training (same live weights), only what is evaluated differs
    assert [r.train_loss for r in full.metrics] == [r.train_loss for r in plain.metrics]
    last = load_checkpoint(full.run_dir / "last.pt")
    assert not torch.equal(last["state_dict"]["net.c1.conv.weight"], last["train_state_dict"]["net.c1.conv.weight"])
    report = evaluate_checkpoint(full.run_dir / "last.pt", device="cpu")
    assert report.test_acc == pytest.approx(full.metrics[-1].test_acc, abs=1e-9)
    with pytest.raises(TrainingInterrupted):
        train("I3", recipe, data, device="cpu", runs_dir=tmp_path / "cut", callback=StopAfter(1))
    resumed = resume(next((tmp_path / "cut").iterdir()), device="cpu")
    assert strip_timing(resumed.metrics) == strip_timing(full.metrics)
    assert torch.equal(load_checkpoint(resumed.run_dir / "last.pt")["state_dict"]["net.c1.conv.weight"],
                       last["state_dict"]["net.c1.conv.weight"])


def test_moving_average_decay_is_checked():
    with pytest.raises(UsageError, match="ema must be in"):
        Recipe(ema=1.0)
    assert Recipe.from_dict({"ema": 0.999}).ema == 0.999


def test_bn_momentum_sets_the_running_statistics_weight_of_each_batch(tmp_path):
    from mnistkit.models import get_model
    from mnistkit.training.optim import set_bn_momentum

    model = get_model("I3").train()
    assert set_bn_momentum(model, 1.0) == 6
    x = torch.randn(16, 1, 28, 28)
    model(x)  # momentum 1: the running mean is the last batch's mean, exactly
    bn, conv = model.net.c1.bn, model.net.c1.conv
    torch.testing.assert_close(bn.running_mean, conv(x).detach().mean((0, 2, 3)))
    # through a run: only evaluation differs (training uses the batch's statistics), so the
    # training losses match and the test figures do not
    data = DataOptions("synthetic", limit=1500)
    slow = train("I3", small(bn_momentum=0.01), data, device="cpu", runs_dir=tmp_path / "slow")
    plain = train("I3", small(), data, device="cpu", runs_dir=tmp_path / "plain")
    assert [r.train_loss for r in slow.metrics] == [r.train_loss for r in plain.metrics]
    assert [r.test_loss for r in slow.metrics] != [r.test_loss for r in plain.metrics]
    assert load_checkpoint(slow.run_dir / "last.pt")["state_dict"]["net.c1.bn.num_batches_tracked"] > 0
    assert read_config(slow.run_dir).recipe.bn_momentum == 0.01
    with pytest.raises(UsageError, match="bn_momentum must be in"):
        Recipe(bn_momentum=0.0)


def test_onecycle_cycles_the_recipes_momentum_not_pytorchs_default():
    # Before 0.6, OneCycleLR overwrote the recipe's momentum with its own 0.85-0.95: a momentum
    # lever in a sweep changed nothing. The recipe's momentum is now the centre of the cycle.
    from mnistkit.training.optim import build_optimizer, build_scheduler

    def momenta(**kw):
        recipe = Recipe(epochs=2, **kw)
        model = torch.nn.Linear(2, 2)
        opt = build_optimizer(model, recipe)
        sched = build_scheduler(opt, recipe, steps_per_epoch=10)
        seen = [opt.param_groups[0]["momentum"]]
        for _ in range(19):
            opt.step()
            sched.step()
            seen.append(opt.param_groups[0]["momentum"])
        return min(seen), max(seen)

    assert momenta() == (0.85, 0.95)  # the default reproduces PyTorch's cycle exactly
    low, high = momenta(momentum=0.5)
    assert low == pytest.approx(0.45) and high == pytest.approx(0.55)
    assert momenta(momentum=0.5, momentum_cycle=0.0) == (0.5, 0.5)
    assert momenta(momentum=0.0) == (0.0, 0.0)
    with pytest.raises(UsageError, match="momentum plus momentum_cycle"):
        Recipe(momentum=0.97)


def test_dropout_placement_reaches_the_trained_model_and_its_checkpoint(tmp_path):
    data = DataOptions("synthetic", limit=600)
    moved = train("I1", small(dropout=0.3, dropout_at="convs"), data, device="cpu", runs_dir=tmp_path / "a")
    default = train("I1", small(dropout=0.3), data, device="cpu", runs_dir=tmp_path / "b")
    # the same seed and data: only where Dropout sits differs, and training sees it
    assert strip_timing(moved.metrics) != strip_timing(default.metrics)
    assert read_config(moved.run_dir).recipe.dropout_at == "convs"
    report = evaluate_checkpoint(moved.run_dir, device="cpu")
    assert report.test_acc == pytest.approx(moved.best.test_acc, abs=1e-9)


def test_a_run_resumes_with_the_threads_it_trained_with(tmp_path):
    # issue 29, item 8: a sweep trial trained with 1 thread was resumed with 2, and ended elsewhere
    data = DataOptions("synthetic", limit=600)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.raises(TrainingInterrupted):
            train("I3", small(epochs=2), data, device="cpu", runs_dir=tmp_path, callback=StopAfter(1))
    finally:
        torch.set_num_threads(before)
    (run,) = tmp_path.iterdir()
    assert read_config(run).threads == 1

    class Threads(StopAfter):
        def on_start(self, start):
            self.threads = torch.get_num_threads()

    seen = Threads(99)
    torch.set_num_threads(2)
    try:
        resume(run, device="cpu", callback=seen)
        assert seen.threads == 1 and torch.get_num_threads() == 2   # the run's threads, then the caller's again
    finally:
        torch.set_num_threads(before)


def test_steplr_steps_with_every_batch_and_keeps_each_epochs_lr_and_old_states_resume(tmp_path):
    # the schedule steps in one place (every batch); StepLR's step_size still counts epochs, and
    # each epoch records the LR its steps used
    from mnistkit.training.optim import build_optimizer, build_scheduler, per_step_schedule

    recipe = small(epochs=3, scheduler="step", step_size=1, gamma=0.1, lr=0.1)
    result = train("I3", recipe, DataOptions("synthetic", limit=300), device="cpu", runs_dir=tmp_path)
    assert [r.lr for r in result.metrics] == pytest.approx([0.1, 0.01, 0.001])
    # a run of 0.11 stepped StepLR once an epoch: its state resumes in steps
    model = torch.nn.Linear(2, 2)
    opt = build_optimizer(model, recipe)
    old = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.1)
    old.step()
    sched = build_scheduler(build_optimizer(model, recipe), recipe, steps_per_epoch=3)
    sched.optimizer.load_state_dict(opt.state_dict())   # as Session.restore does
    sched.load_state_dict(per_step_schedule(old.state_dict(), recipe, 3))
    assert (sched.last_epoch, sched.step_size) == (3, 3)
    lrs = []
    for _ in range(4):
        lrs.append(sched.optimizer.param_groups[0]["lr"])
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.001])
