"""Hostile and damaged inputs, table-driven: every case a hostile user tried (issue 11's eight
classes: output paths, file modes, resource bombs, user text as markup, damaged run files,
faults during a run, recipe values, messages). Each error case asserts the exit code, exactly
one stderr line (the last one, for a failure after training started), its content, no
traceback, and that no file that existed before changed."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml

from mnistkit.cli import app
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.runs.checkpoint import load_checkpoint
from mnistkit.training.loop import train

from helpers import write_fake_mnist

ROOT = Path(__file__).resolve().parent.parent
SYN = ["--dataset", "synthetic", "--limit", "256", "--device", "cpu"]


@pytest.fixture(scope="module")
def good_run(tmp_path_factory):
    """One real run folder (2 epochs) that the cases copy and damage."""
    runs = tmp_path_factory.mktemp("good")
    return train("I3", Recipe(epochs=2, batch_size=128, lr=0.05), DataOptions("synthetic", limit=256),
                 device="cpu", runs_dir=runs).run_dir


def copy_run(good: Path, tmp: Path) -> Path:
    dest = tmp / "run"
    shutil.copytree(good, dest)
    return dest


def edit_ckpt(path: Path, change: Callable[[dict], None]) -> None:
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)


def relabel(data: dict, name: str) -> None:
    """A checkpoint that says, consistently, that it holds another model."""
    data.update(model=name, model_source={**data["model_source"], "name": name, "reference": name})


def edit_config(run: Path, change: Callable[[dict], None]) -> None:
    data = yaml.safe_load((run / "config.yaml").read_text())
    change(data)
    (run / "config.yaml").write_text(yaml.safe_dump(data))


class Evil:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def changelog(tmp: Path, edit: Callable[[str], str]) -> Path:
    path = tmp / "exp.yaml"
    path.write_text(edit((ROOT / "mnistkit" / "experiments.yaml").read_text()))
    return path


def laughs() -> str:
    text = "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    for i in range(1, 12):
        text += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join(f"*{chr(96 + i)}" for _ in range(10)) + "]\n"
    return text


def gzip_bomb(path: Path) -> None:
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(struct.pack(">HBBIII", 0, 8, 3, 100, 28, 28))
        zeros = bytes(1 << 20)
        for _ in range(64):
            fh.write(zeros)


# ---------------------------------------------------------------- the case table

@dataclass
class Case:
    id: str
    setup: Callable  # (tmp, good_run, monkeypatch) -> CLI args
    code: int
    needle: str


def _args(*a):
    return lambda tmp, good, mp: list(a)


def output_case(make_target: Callable[[Path], str], extra=()):
    def setup(tmp, good, mp):
        return ["compare", "--runs-dir", str(tmp / "none"), "-f", "csv", "-o", make_target(tmp), *extra]
    return setup


def damaged_resume(change_run: Callable[[Path], None]):
    def setup(tmp, good, mp):
        run = copy_run(good, tmp)
        change_run(run)
        return ["train", "--resume", str(run), "--device", "cpu", "--quiet"]
    return setup


def damaged_evaluate(change_run: Callable[[Path], None], target: str = ""):
    def setup(tmp, good, mp):
        run = copy_run(good, tmp)
        change_run(run)
        return ["evaluate", str(run / target) if target else str(run), "--device", "cpu"]
    return setup


I3_RECIPE = "recipe: {epochs: 15, batch_size: 128, weight_decay: 0.0005}"


def i3_recipe(text: str, extra: str) -> str:
    """The shipped change-log with I3's recipe replaced by ``{epochs: 15, <extra>}``."""
    assert text.count(I3_RECIPE) == 1, "the shipped change-log changed: update I3_RECIPE"
    return text.replace(I3_RECIPE, f"recipe: {{epochs: 15, {extra}}}")


def exp_case(edit: Callable[[str], str], command: str = "train"):
    def setup(tmp, good, mp):
        path = changelog(tmp, edit)
        if command == "train":
            return ["train", "I3", "--experiments", str(path), *SYN, "--runs-dir", str(tmp / "r")]
        return ["compare", "--experiments", str(path), "--runs-dir", str(tmp / "r")]
    return setup


def data_case(make: Callable[[Path], None], extra=()):
    def setup(tmp, good, mp):
        folder = tmp / "d"
        folder.mkdir()
        make(folder)
        return ["train", "I3", "--data-dir", str(folder), "--epochs", "1", "--device", "cpu",
                "--runs-dir", str(tmp / "r"), *extra]
    return setup


def fake(folder: Path, **kw) -> None:
    write_fake_mnist(folder, n_train=64, n_test=32, **kw)


def replace_file(name: str, data: bytes):
    def make(folder):
        fake(folder)
        (folder / name).write_bytes(data)
    return make


def in_place_of(name: str, kind: str):
    def make(folder):
        fake(folder)
        (folder / name).unlink()
        if kind == "dir":
            (folder / name).mkdir()
        else:
            (folder / name).symlink_to(folder / "nowhere")
    return make


def fault_during_training(fault: str, at_epoch: int = 2):
    """A fault in the middle of a real training run: a full disk at a chosen write, SIGTERM,
    or Ctrl-C, injected where the operating system would deliver it."""
    def setup(tmp, good, mp):
        import mnistkit.files.outputs as runs
        import mnistkit.training.loop as training

        if fault == "enospc-epoch":
            real = runs._stage

            def full_disk(path, raw):
                if path.name == "last.pt" and b"metrics" in raw and runs_written.count("last.pt") >= at_epoch:
                    raise OSError(28, "No space left on device")
                runs_written.append(path.name)
                return real(path, raw)

            runs_written: list[str] = []
            mp.setattr(runs, "_stage", full_disk)
        elif fault == "enospc-create":
            def full_disk(path, raw):
                raise OSError(28, "No space left on device")
            mp.setattr(runs, "_stage", full_disk)
        else:
            real_epoch = training.train_one_epoch
            sig = signal.SIGTERM if fault == "sigterm" else signal.SIGINT

            def signalled(s, epoch, *args, **kwargs):
                if epoch == at_epoch:
                    os.kill(os.getpid(), sig)
                return real_epoch(s, epoch, *args, **kwargs)

            mp.setattr(training, "train_one_epoch", signalled)
            previous = signal.signal(signal.SIGINT, signal.default_int_handler)
            mp.setattr(signal, "_mnistkit_test_restore", previous, raising=False)
        return ["train", "I3", *SYN, "--epochs", "3", "--runs-dir", str(tmp / "r [v2]"), "--quiet"]
    return setup


SAFE_UNLESS = "asks to call"

CASES = [
    # 1. output paths
    Case("output-is-a-folder", output_case(lambda t: str(t)), 1, "is a folder"),
    Case("output-parent-missing", output_case(lambda t: str(t / "no" / "x.csv")), 1, "does not exist"),
    Case("output-full-device", output_case(lambda t: "/dev/full"), 1, "No space left on device"),
    Case("output-symlink-loop", output_case(lambda t: (os.symlink(t / "l2", t / "l1"), os.symlink(t / "l1", t / "l2"),
                                                       str(t / "l1"))[-1]), 1, "symbolic links"),
    Case("output-name-too-long", output_case(lambda t: str(t / ("a" * 300))), 1, "File name too long"),
    Case("plot-is-a-folder-nothing-written", output_case(lambda t: str(t / "report.csv"), ("--plot", "/tmp")), 1,
         "is a folder"),
    # 3. resource bombs
    Case("yaml-alias-bomb-experiments", lambda t, g, mp: (t.joinpath("b.yaml").write_text(laughs() + "iterations: []\n"),
                                                          ["compare", "--experiments", str(t / "b.yaml")])[1],
         1, "more than 20,000 YAML nodes"),
    Case("yaml-alias-bomb-in-cwd", lambda t, g, mp: (t.joinpath("experiments.yaml").write_text(laughs()),
                                                     mp.chdir(t), ["train", *SYN, "--runs-dir", str(t / "r")])[2],
         1, "more than 20,000 YAML nodes"),
    Case("experiments-endless-source", _args("compare", "--experiments", "/dev/zero"), 1,
         "/dev/zero is a character device, not a regular file"),
    Case("experiments-huge-file", lambda t, g, mp: (t.joinpath("big.yaml").write_text("# " + "x" * (2 << 20)),
                                                    ["compare", "--experiments", str(t / "big.yaml")])[1],
         1, "larger than 1,024 KiB"),
    Case("experiments-binary", lambda t, g, mp: (t.joinpath("bin.yaml").write_bytes(b"\xff\xfe\x00garbage"),
                                                 ["compare", "--experiments", str(t / "bin.yaml")])[1],
         1, "not UTF-8 text"),
    Case("idx-gzip-bomb", data_case(lambda f: (fake(f), gzip_bomb(f / "train-images-idx3-ubyte.gz"))), 1,
         "more data bytes than its header"),
    Case("idx-header-promises-terabytes", data_case(replace_file(
        "train-images-idx3-ubyte.gz", gzip.compress(struct.pack(">HBBIII", 0, 8, 3, 10**6, 1000, 1000))),
        ), 1, "more than any MNIST file"),
    Case("config-alias-bomb-on-resume", damaged_resume(lambda r: (r / "config.yaml").write_text(laughs())), 1,
         "more than 20,000 YAML nodes"),
    # 4. user text is never markup
    Case("model-name-closing-tag", _args("summary", "[/]"), 2, "'[/]'"),
    Case("model-name-style-tag", _args("train", "[bold]I3", "--dataset", "synthetic"), 1, "'[bold]I3'"),
    Case("runs-dir-markup", lambda t, g, mp: (t.joinpath("f").write_text("x"),
                                              ["train", "I3", *SYN, "--runs-dir", str(t / "f" / "[/]x")])[1],
         1, "[/]x"),
    Case("checkpoint-model-markup", damaged_evaluate(lambda r: edit_ckpt(r / "best.pt", lambda d: relabel(d, "[/]")),
                                                     "best.pt"), 1, "holds model '[/]', but its run folder"),
    Case("experiments-path-markup", lambda t, g, mp: ["compare", "--experiments", str(t / "[v2] exp.yaml")], 1,
         "[v2] exp.yaml not found"),
    Case("data-dir-markup", lambda t, g, mp: (t.joinpath("[red]f").write_text("x"),
                                              ["train", "--data-dir", str(t / "[red]f"), "--runs-dir", str(t)])[1],
         1, "[red]f"),
    # 5. damaged but readable run files
    Case("last-without-rng", damaged_resume(lambda r: edit_ckpt(r / "last.pt", lambda d: d.pop("rng"))), 1,
         "cannot be resumed"),
    Case("last-rng-wrong-type", damaged_resume(lambda r: edit_ckpt(r / "last.pt", lambda d: d.update(rng={"python": 1}))),
         1, "cannot be resumed"),
    Case("last-metrics-without-epoch", damaged_resume(lambda r: edit_ckpt(
        r / "last.pt", lambda d: d["metrics"][0].pop("epoch"))), 1, "epoch is None"),
    Case("last-metrics-not-a-list", damaged_resume(lambda r: edit_ckpt(r / "last.pt", lambda d: d.update(metrics=3))),
         1, "holds no metrics"),
    Case("last-epoch-negative", damaged_resume(lambda r: edit_ckpt(r / "last.pt", lambda d: d.update(epoch=-1))), 1,
         "its epoch is -1"),
    Case("last-epoch-beyond-metrics", damaged_resume(lambda r: edit_ckpt(r / "last.pt", lambda d: d.update(epoch=9))),
         1, "at epoch 9 but lists 2"),
    Case("last-weights-not-tensors", damaged_resume(lambda r: edit_ckpt(r / "last.pt",
                                                                        lambda d: d.update(state_dict={"w": 1}))),
         1, "not a mapping of names to tensors"),
    Case("last-weights-of-another-model", damaged_resume(lambda r: edit_ckpt(
        r / "last.pt", lambda d: d["state_dict"].update({"net.c1.conv.weight": torch.zeros(3, 3)}))), 1,
        "cannot be resumed"),
    Case("last-model-differs-from-config", damaged_resume(lambda r: edit_ckpt(r / "last.pt",
                                                                              lambda d: relabel(d, "I1"))),
         1, "holds model 'I1', but its run folder"),
    Case("last-optimizer-missing", damaged_resume(lambda r: edit_ckpt(r / "last.pt", lambda d: d.pop("optimizer"))),
         1, "cannot be resumed"),
    Case("config-missing-recipe", damaged_resume(lambda r: edit_config(r, lambda d: d.pop("recipe"))), 1,
         "needs a model name and a recipe"),
    Case("config-recipe-wrong-type", damaged_resume(lambda r: edit_config(r, lambda d: d["recipe"].update(epochs="x"))),
         1, "epochs must be int"),
    Case("config-recipe-out-of-range", damaged_resume(lambda r: edit_config(r, lambda d: d["recipe"].update(lr=-1.0))),
         1, "lr must be a positive number"),
    Case("config-not-a-mapping", damaged_resume(lambda r: (r / "config.yaml").write_text("- 1\n- 2\n")), 1,
         "not a mnistkit run config"),
    Case("config-invalid-yaml", damaged_resume(lambda r: (r / "config.yaml").write_text("model: [\n")), 1,
         "not valid YAML"),
    Case("config-duplicate-key", damaged_resume(lambda r: (r / "config.yaml").write_text(
        (r / "config.yaml").read_text() + "model: I1\n")), 1, "duplicate key 'model'"),
    Case("config-is-a-folder", damaged_resume(lambda r: ((r / "config.yaml").unlink(), (r / "config.yaml").mkdir())),
         1, "is a folder"),
    Case("config-measured-on-damaged", damaged_resume(lambda r: edit_config(
        r, lambda d: d["measured_on"].update(train_samples="many"))), 1, "measured_on is not what mnistkit writes"),
    Case("best-weights-do-not-fit", damaged_evaluate(lambda r: edit_ckpt(
        r / "best.pt", lambda d: relabel(d, "I1"))), 1, "holds model 'I1', but its run folder"),
    Case("best-model-name-disagrees-with-its-source", damaged_evaluate(lambda r: edit_ckpt(
        r / "best.pt", lambda d: d.update(model="I1"))), 1, "names model 'I1' but its model_source is 'I3'"),
    Case("best-truncated", damaged_evaluate(lambda r: (r / "best.pt").write_bytes((r / "best.pt").read_bytes()[:2000])),
         1, "truncated or corrupt"),
    Case("best-empty", damaged_evaluate(lambda r: (r / "best.pt").write_bytes(b"")), 1, "truncated or corrupt"),
    Case("no-checkpoint-in-run", damaged_evaluate(lambda r: ((r / "best.pt").unlink(), (r / "last.pt").unlink())), 1,
         "no checkpoint"),
    # 6. faults during a run
    Case("disk-full-at-epoch-2", fault_during_training("enospc-epoch"), 1, "still holds epoch 1 whole"),
    Case("disk-full-at-epoch-1", fault_during_training("enospc-epoch", at_epoch=1), 1,
         "no epoch was kept (a new run's folder is removed): make room, then train again"),
    Case("disk-full-creating-the-run", fault_during_training("enospc-create"), 1, "cannot write a run folder"),
    Case("sigterm-during-training", fault_during_training("sigterm"), 143, "terminated (SIGTERM)"),
    Case("ctrl-c-during-training", fault_during_training("sigint"), 130, "Resume with: mnistkit train --resume '"),
    # 7. recipe values
    Case("step-size-zero", exp_case(lambda t: t.replace("step_size: 1,", "step_size: 0,", 1)), 1,
         "recipe.step_size: must be at least 1"),
    Case("div-factor-zero", exp_case(lambda t: i3_recipe(t, "div_factor: 0")),
         1, "recipe.div_factor: must be positive"),
    Case("gamma-zero", exp_case(lambda t: t.replace("gamma: 0.1", "gamma: 0")), 1, "recipe.gamma: must be positive"),
    Case("degrees-inf", exp_case(lambda t: i3_recipe(t, "augment: {degrees: .inf}")),
         1, "recipe.augment.degrees: must be a finite number"),
    Case("mean-nan", exp_case(lambda t: i3_recipe(t, "mean: .nan")), 1,
         "recipe.mean: must be a finite number"),
    Case("lr-inf-in-yaml", exp_case(lambda t: i3_recipe(t, "lr: .inf")), 1,
         "recipe.lr: must be a finite number"),
    Case("dropout-one", exp_case(lambda t: i3_recipe(t, "dropout: 1.0")), 1,
         "recipe.dropout: must be in [0, 1)"),
    Case("translate-two", exp_case(lambda t: i3_recipe(t, "augment: {translate: 2}")),
         1, "recipe.augment.translate: must be in [0, 1)"),
    Case("batch-size-bool", exp_case(lambda t: i3_recipe(t, "batch_size: true")),
         1, "recipe.batch_size: must be int, not bool"),
    Case("duplicate-key-in-changelog", exp_case(lambda t: i3_recipe(t, "epochs: 3"),
                                                "compare"), 1, "duplicate key 'epochs'"),
    Case("seed-overflow", _args("train", "--seed", str(2**70), "--dataset", "synthetic"), 2, "seed must be"),
    Case("lr-nan-option", _args("train", "--lr", "nan", "--dataset", "synthetic"), 2, "lr must be a finite number"),
    Case("lr-inf-option", _args("train", "--lr", "inf", "--dataset", "synthetic"), 2, "lr must be a finite number"),
    Case("seeds-huge-count", _args("train", "--seeds", "1000", "--dataset", "synthetic"), 2, "a seed count must be"),
    # 8. messages
    Case("checkpoint-calls-os-system", lambda t, g, mp: (torch.save(
        {"format": "mnistkit-checkpoint", "x": Evil(os.system, ("true",))}, t / "e.pt"),
        ["evaluate", str(t / "e.pt")])[1], 1, "refused as unsafe: it asks to call posix.system"),
    Case("checkpoint-protocol-0-pickle", lambda t, g, mp: (t.joinpath("p0.pt").write_bytes(
        __import__("pickle").dumps({"x": Evil(os.system, ("true",))}, protocol=0)),
        ["evaluate", str(t / "p0.pt")])[1], 1, "refused as unsafe: it asks to call posix.system"),
    Case("checkpoint-legacy-exec", lambda t, g, mp: (torch.save(
        {"x": Evil(exec, ("1",))}, t / "x.pt", _use_new_zipfile_serialization=False),
        ["evaluate", str(t / "x.pt")])[1], 1, "refused as unsafe: it asks to call exec"),
    Case("idx-file-is-a-folder", data_case(in_place_of("train-labels-idx1-ubyte.gz", "dir")), 1, "is not a file"),
    Case("idx-file-dangling-symlink", data_case(in_place_of("train-labels-idx1-ubyte.gz", "link")), 1, "is not a file"),
    Case("mnistkit-data-env-offline", lambda t, g, mp: (mp.setenv("MNISTKIT_DATA", str(t / "nowhere")),
                                                        mp.setattr("torchvision.datasets.MNIST", _no_network),
                                                        ["train", "--runs-dir", str(t / "r")])[2],
         1, "(from $MNISTKIT_DATA)"),
    Case("idx-magic-swapped", data_case(lambda f: (fake(f), shutil.copy(f / "train-labels-idx1-ubyte.gz",
                                                                        f / "train-images-idx3-ubyte.gz"))),
         1, "expected 0x00000803 for images"),
    Case("unknown-option", _args("train", "--epoch", "3"), 2, "No such option"),
    Case("missing-argument", _args("evaluate"), 2, "Missing argument"),
    Case("yaml-syntax-error", exp_case(lambda t: t + "\n  bad: [\n", "compare"), 1, "not valid YAML"),
]


def _no_network(*args, **kwargs):
    raise RuntimeError("Error downloading: [Errno -3] Temporary failure in name resolution")


def snapshot(root: Path) -> dict[str, tuple]:
    out = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        if stat.S_ISLNK(st.st_mode):
            out[str(path)] = ("link", os.readlink(path))
        elif stat.S_ISREG(st.st_mode):
            out[str(path)] = ("file", path.read_bytes(), stat.S_IMODE(st.st_mode))
    return out


# the cases that train (or start a process) run in the whole suite, not the quick loop
TRAINING_CASES = {"disk-full-at-epoch-2", "disk-full-at-epoch-1", "sigterm-during-training", "ctrl-c-during-training"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.id in TRAINING_CASES else c
                                  for c in CASES], ids=[c.id for c in CASES])
def test_hostile_input_ends_in_one_clear_line(case, runner, tmp_path, good_run, monkeypatch):
    args = case.setup(tmp_path, good_run, monkeypatch)
    before = snapshot(tmp_path)
    previous_int = signal.getsignal(signal.SIGINT)
    try:
        result = runner.invoke(app, args)
    finally:
        signal.signal(signal.SIGINT, previous_int)
    assert result.exit_code == case.code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr  # one error line, and it is the last
    started = any(line.startswith("change-log:") for line in lines)
    assert len(lines) == 1 or started, result.stderr  # before training starts, nothing else is said
    assert case.needle in errors[0], errors[0]
    after = snapshot(tmp_path)
    changed = [p for p, v in before.items() if after.get(p) != v]
    assert not changed, changed


# ---------------------------------------------------------------- handled without an error

def _run(runner, args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def h_symlink_followed(runner, tmp, good):
    target = tmp / "t.csv"
    target.write_text("old")
    (tmp / "link.csv").symlink_to(target)
    _run(runner, ["compare", "--runs-dir", str(tmp / "n"), "-f", "csv", "-o", str(tmp / "link.csv")])
    assert (tmp / "link.csv").is_symlink() and target.read_text().startswith("id,")


def h_dangling_symlink_creates_target(runner, tmp, good):
    (tmp / "link.csv").symlink_to(tmp / "new.csv")
    _run(runner, ["compare", "--runs-dir", str(tmp / "n"), "-f", "csv", "-o", str(tmp / "link.csv")])
    assert (tmp / "link.csv").is_symlink() and (tmp / "new.csv").read_text().startswith("id,")


def h_character_device_written_not_replaced(runner, tmp, good):
    result = _run(runner, ["compare", "--runs-dir", str(tmp / "n"), "-f", "csv", "-o", "/dev/null"])
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and "wrote /dev/null" in result.stderr


def h_dev_stdout_is_written(runner, tmp, good):
    out = subprocess.run([sys.executable, "-m", "mnistkit", "compare", "--runs-dir", str(tmp / "n"), "-f", "csv",
                          "-o", "/dev/stdout"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("id,changes,"), out.stderr


def h_new_file_mode_follows_umask(runner, tmp, good):
    old = os.umask(0o027)
    try:
        _run(runner, ["compare", "--runs-dir", str(tmp / "n"), "-f", "csv", "-o", str(tmp / "r.csv")])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp / "r.csv").st_mode) == 0o640


def h_replaced_file_keeps_its_mode(runner, tmp, good):
    (tmp / "r.csv").write_text("old")
    os.chmod(tmp / "r.csv", 0o600)
    _run(runner, ["compare", "--runs-dir", str(tmp / "n"), "-f", "csv", "-o", str(tmp / "r.csv")])
    assert stat.S_IMODE(os.stat(tmp / "r.csv").st_mode) == 0o600


def h_run_files_follow_umask(runner, tmp, good):
    old = os.umask(0o022)
    try:
        _run(runner, ["train", "I3", *SYN, "--epochs", "1", "--runs-dir", str(tmp / "r"), "--quiet"])
    finally:
        os.umask(old)
    run = next((tmp / "r").iterdir())
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir()} == {
        n: 0o644 for n in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", ".lock")}


def h_damaged_run_does_not_hide_the_others(runner, tmp, good):
    runs = tmp / "runs"
    shutil.copytree(good, runs / "ok")
    shutil.copytree(good, runs / "bad")
    (runs / "bad" / "metrics.jsonl").write_text('{"epoch": "one"}\n')
    result = _run(runner, ["compare", "--runs-dir", str(runs), "--all-runs"])
    assert "skipped a damaged run folder" in result.stdout and "ok" in result.stdout


def h_metrics_wrong_shape_is_damage(runner, tmp, good):
    runs = tmp / "runs"
    shutil.copytree(good, runs / "bad")
    (runs / "bad" / "metrics.jsonl").write_text("[1, 2, 3]\n")
    result = _run(runner, ["compare", "--runs-dir", str(runs), "--json"])
    import json

    assert "not a metrics row" in json.loads(result.stdout)["damaged_runs"][0]["why"]


def h_closed_stdout_is_not_a_traceback(runner, tmp, good):
    proc = subprocess.run(f"{sys.executable} -m mnistkit models >&-", shell=True, capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert "Traceback" not in proc.stderr


HANDLED = [h_symlink_followed, h_dangling_symlink_creates_target, h_character_device_written_not_replaced,
           h_dev_stdout_is_written, h_new_file_mode_follows_umask, h_replaced_file_keeps_its_mode,
           h_run_files_follow_umask, h_damaged_run_does_not_hide_the_others, h_metrics_wrong_shape_is_damage,
           h_closed_stdout_is_not_a_traceback]


TRAINING_HANDLED = {"dev_stdout_is_written", "run_files_follow_umask", "closed_stdout_is_not_a_traceback"}


@pytest.mark.parametrize("case", [pytest.param(h, marks=pytest.mark.slow) if h.__name__[2:] in TRAINING_HANDLED else h
                                  for h in HANDLED], ids=[h.__name__[2:] for h in HANDLED])
def test_hostile_input_is_handled(case, runner, tmp_path, good_run):
    case(runner, tmp_path, good_run)


@pytest.mark.slow
def test_disk_full_mid_run_leaves_a_consistent_resumable_folder(runner, tmp_path, good_run, monkeypatch):
    args = fault_during_training("enospc-epoch")(tmp_path, good_run, monkeypatch)
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    run = next((tmp_path / "r [v2]").iterdir())
    assert [p.name for p in run.iterdir() if p.name.endswith(".tmp")] == []  # no staged leftovers
    epochs = {name: load_checkpoint(run / name)["epoch"] for name in ("last.pt", "best.pt")}
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert epochs == {"last.pt": 1, "best.pt": 1} and len(lines) == 1
    monkeypatch.undo()
    resumed = runner.invoke(app, ["train", "--resume", str(run), "--device", "cpu", "--quiet", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow   # starts processes or builds a whole report: not the quick loop's
def test_memory_of_the_bombs_is_bounded(tmp_path):
    """Peak RSS of the alias-bomb and gzip-bomb commands, against the same command on a small
    valid input: at most 300 MB more."""
    def peak(args, cwd=ROOT):
        code = ("import resource, sys\nfrom mnistkit.cli import app\n"
                f"try:\n    app({args!r})\nexcept SystemExit:\n    pass\n"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, timeout=300)
        return int(out.stdout.strip().splitlines()[-1]) / 1024  # MiB

    (tmp_path / "bomb.yaml").write_text(laughs() + "iterations: []\n")
    base_yaml = peak(["compare", "--runs-dir", str(tmp_path / "n")])
    bomb_yaml = peak(["compare", "--runs-dir", str(tmp_path / "n"), "--experiments", str(tmp_path / "bomb.yaml")])
    fake(tmp_path / "ok")
    fake(tmp_path / "bomb")
    gzip_bomb(tmp_path / "bomb" / "train-images-idx3-ubyte.gz")
    common = ["train", "I3", "--epochs", "1", "--device", "cpu", "--runs-dir", str(tmp_path / "r"), "--quiet"]
    base_gz = peak(common + ["--data-dir", str(tmp_path / "ok")])
    bomb_gz = peak(common + ["--data-dir", str(tmp_path / "bomb")])
    print(f"peak RSS MiB: yaml {base_yaml:.0f} -> {bomb_yaml:.0f}; gzip {base_gz:.0f} -> {bomb_gz:.0f}")
    assert bomb_yaml - base_yaml < 300 and bomb_gz - base_gz < 300


def test_predict_never_hands_a_disguised_postscript_file_to_ghostscript(tmp_path, monkeypatch):
    # issue 29, item 4: Pillow opens by content; an EPS named x.png went to Ghostscript
    from PIL import EpsImagePlugin

    from mnistkit.inference.predict import ImageError, read_image

    called = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: called.append(a) or (_ for _ in ()).throw(
        OSError("ghostscript was asked")))
    path = tmp_path / "x.png"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\nnewpath 0 0 moveto 28 28 lineto stroke\n"
                    "showpage\n%%EOF\n")
    with pytest.raises(ImageError, match="is not a PNG, JPEG, BMP, GIF, TIFF, WEBP or PPM image .*only raster"):
        read_image(path)
    assert called == []


@pytest.mark.parametrize("columns", ["0", "10"])
def test_a_tiny_or_zero_terminal_width_still_shows_the_figures(runner, columns):
    # issue 29, item 16: COLUMNS=0 printed nothing (exit 0), COLUMNS=10 tables of empty cells
    from mnistkit.cli import app

    result = runner.invoke(app, ["summary", "I3"], env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    assert "14,500" in result.stdout and "c1" in result.stdout and "Budget" in result.stdout


@pytest.mark.slow
def test_a_checkpoint_swapped_for_another_models_is_refused(runner, tmp_path):
    # issue 29, item 13: export, evaluate and predict used a best.pt of another model without a word
    import shutil

    from mnistkit.cli import app
    from mnistkit.recipe import DataOptions, Recipe
    from mnistkit.training.loop import train

    data = DataOptions("synthetic", limit=64)
    i3 = train("I3", Recipe(epochs=1, batch_size=64), data, device="cpu", runs_dir=tmp_path).run_dir
    i4 = train("I4", Recipe(epochs=1, batch_size=64), data, device="cpu", runs_dir=tmp_path).run_dir
    shutil.copy(i4 / "best.pt", i3 / "best.pt")
    for args in (["evaluate", str(i3)], ["export", str(i3), "-f", "safetensors", "-o", str(tmp_path / "x.st")],
                 ["predict", str(i3), str(Path(__file__).parent.parent / "examples" / "three.png")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        line = result.stderr.strip().splitlines()
        assert len(line) == 1 and "holds model 'I4', but its run folder" in line[0] and "trained 'I3'" in line[0]
    assert not (tmp_path / "x.st").exists()


@pytest.mark.slow
def test_one_writer_per_run_folder(runner, tmp_path):
    # issue 29, item 1: a resume that loaded its state while another process finished the run rolled
    # it back; two resumes at once were both accepted; runs listed a training run as resumable
    from mnistkit.cli import app
    from mnistkit.errors import RunError
    from mnistkit.runs.lock import FolderLock, holder
    from mnistkit.recipe import DataOptions, Recipe
    from mnistkit.runs import summarize_run
    from mnistkit.training.loop import resume, train
    from mnistkit.errors import TrainingInterrupted

    class Stop:
        def on_start(self, start): pass
        def on_step(self, step): pass
        def on_epoch(self, row, best): raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        train("I4", Recipe(epochs=2, batch_size=64), DataOptions("synthetic", limit=64), device="cpu",
              runs_dir=tmp_path, callback=Stop())
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert holder(run) is None and summarize_run(run).state == "interrupted"   # a dead writer's lock never blocks
    held = FolderLock.acquire(run)   # another process training it, as far as this folder can tell
    try:
        assert holder(run) == os.getpid()
        assert summarize_run(run).state == "training" and summarize_run(run).why == f"PID {os.getpid()}"
        before = (run / "last.pt").read_bytes()
        with pytest.raises(RunError, match=rf"in use by another mnistkit process \(PID {os.getpid()}\)"):
            resume(run, device="cpu")
        assert (run / "last.pt").read_bytes() == before   # nothing read into a session, nothing written
        result = runner.invoke(app, ["train", "--resume", str(run)])
        assert result.exit_code == 1 and "in use by another mnistkit process" in result.stderr
        listing = runner.invoke(app, ["runs", "--runs-dir", str(tmp_path)])
        assert f"training (PID {os.getpid()})" in listing.stdout
    finally:
        held.release()
    assert resume(run, device="cpu").epochs == 2 and holder(run) is None


@pytest.mark.slow
def test_two_sweeps_of_one_folder_at_once_are_refused(tmp_path):
    # issue 29, item 7
    from mnistkit.errors import RunError
    from mnistkit.runs.lock import FolderLock
    from mnistkit.sweeps.sweep import load_spec, run_sweep

    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text("name: two\nmodels: [I4]\nseeds: [1]\nrecipe: {epochs: 1, batch_size: 64}\n"
                         "data: {dataset: synthetic, limit: 64}\n")
    spec = load_spec(spec_path)
    (tmp_path / "runs" / "two").mkdir(parents=True)
    held = FolderLock.acquire(tmp_path / "runs" / "two", "sweep")
    try:
        with pytest.raises(RunError, match="in use by another mnistkit process .* training this sweep"):
            run_sweep(spec, tmp_path / "runs", workers=1, resume=True)
    finally:
        held.release()
    assert [r["status"] for r in run_sweep(spec, tmp_path / "runs", workers=1, resume=True)] == ["finished"]


@pytest.mark.slow
def test_an_output_is_never_an_input_or_a_file_of_a_run(runner, tmp_path):
    # issue 29, item 2: `export RUN -f safetensors -o RUN/best.pt` exited 0 with best.pt a safetensors
    # file; `evaluate RUN/last.pt --errors RUN/last.pt` replaced last.pt with a PNG
    from mnistkit.cli import app
    from mnistkit.recipe import DataOptions, Recipe
    from mnistkit.training.loop import train

    run = train("I4", Recipe(epochs=1, batch_size=64), DataOptions("synthetic", limit=64), device="cpu",
                runs_dir=tmp_path / "runs").run_dir
    files = {p.name: p.read_bytes() for p in run.iterdir()}
    (tmp_path / "link.pt").symlink_to(run / "last.pt")
    exp = tmp_path / "exp.yaml"
    exp.write_text((Path(__file__).parent.parent / "experiments.yaml").read_text())
    for args, needle in (
        (["export", str(run), "-f", "safetensors", "-o", str(run / "best.pt")], "which this command reads"),
        (["export", str(run), "-f", "safetensors", "-o", str(run / "last.pt")], "is a file of the run folder"),
        (["export", str(run), "-f", "safetensors", "-o", str(run / "config.yaml")], "is a file of the run folder"),
        (["evaluate", str(run / "last.pt"), "--errors", str(run / "last.pt")], "which this command reads"),
        (["evaluate", str(run / "last.pt"), "--errors", str(tmp_path / "link.pt")], "which this command reads"),
        (["evaluate", str(run), "--errors", str(tmp_path / "a.png"), "--confusion", str(tmp_path / "a.png")],
         "another output of this command"),
        (["compare", "--runs-dir", str(tmp_path / "runs"), "--experiments", str(exp), "-f", "markdown", "-o", str(exp)],
         "which this command reads"),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, result.stderr)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == files   # every run file as it was
    assert not (tmp_path / "a.png").exists() and "iterations" in exp.read_text()


def test_compare_never_writes_over_the_change_log_it_found(runner, tmp_path, monkeypatch):
    # ./experiments.yaml found by default (here, as in the repository, a link): compare -o it was written through
    from mnistkit.cli import app

    real = tmp_path / "shipped.yaml"
    real.write_text((Path(__file__).parent.parent / "experiments.yaml").read_text())
    (tmp_path / "experiments.yaml").symlink_to(real)
    monkeypatch.chdir(tmp_path)
    before = real.read_text()
    result = runner.invoke(app, ["compare", "--runs-dir", str(tmp_path / "runs"), "-f", "markdown", "-o",
                                 "experiments.yaml"])
    assert result.exit_code == 1 and "which this command reads" in result.stderr
    assert real.read_text() == before


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["pickle-protocol-4", "sparse-tensor"])
def test_torchs_warnings_about_a_hostile_checkpoint_never_reach_the_user(tmp_path, kind):
    """As a user runs it (a process, Python's default warning filters): one line, no UserWarning first."""
    import subprocess
    import sys

    path = tmp_path / "x.pt"
    if kind == "pickle-protocol-4":
        torch.save({"a": torch.zeros(2)}, path, pickle_protocol=4, _use_new_zipfile_serialization=False)
    else:
        torch.save({"state_dict": {"w": torch.zeros(3, 3).to_sparse()}}, path)
    out = subprocess.run([sys.executable, "-m", "mnistkit", "evaluate", str(path)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "Warning" not in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and out.stderr.startswith("error: ")


@pytest.mark.slow
@pytest.mark.parametrize("args, redirect", [
    (["--version"], ">/dev/full"), (["--help"], ">/dev/full"), (["summary", "I3"], ">/dev/full"),
    (["summary", "I3", "--json"], ">/dev/full"), (["summary", "I3"], ">&-"), (["summary", "I3", "--json"], ">&-"),
    (["train", "I4", "--dataset", "synthetic", "--limit", "64", "--epochs", "1", "--runs-dir", "RUNS"], ">/dev/full"),
])
def test_an_output_that_cannot_be_written_is_one_line_and_leaves_nothing(tmp_path, args, redirect):
    """stdout on a full disk or closed, as a shell makes it: one line on stderr, exit 1, no traceback,
    no run folder left behind by a training that could not show its start."""
    import shlex
    import subprocess
    import sys

    runs = tmp_path / "runs"
    command = " ".join(shlex.quote(a.replace("RUNS", str(runs))) for a in [sys.executable, "-m", "mnistkit", *args])
    out = subprocess.run(["bash", "-c", f"exec {command} {redirect}"], capture_output=True, text=True, timeout=120)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    assert lines[-1] in ("error: cannot write to standard output: No space left on device; choose another place for it",
                         "error: standard output is closed; redirect it to a file (or to /dev/null)"), out.stderr
    assert not runs.exists() or not list(runs.iterdir())


@pytest.mark.slow   # starts processes or builds a whole report: not the quick loop's
def test_ctrl_c_while_a_picture_is_drawn_lets_it_finish_then_stops_in_one_line(runner, tmp_path, good_run,
                                                                                 monkeypatch):
    """Ctrl-C inside matplotlib could leave it half-drawn (a ValueError traceback about 1 time in 40):
    the drawing finishes, then the command stops as interrupted, writing nothing."""
    import os
    import time

    from mnistkit import render

    real, finished = render.errors_png, []

    def drawing(report):
        os.kill(os.getpid(), signal.SIGINT)   # Ctrl-C arrives in the middle of the drawing
        time.sleep(0.05)
        png = real(report)
        finished.append(True)
        return png

    monkeypatch.setattr(render, "errors_png", drawing)
    out = tmp_path / "e.png"
    previous = signal.getsignal(signal.SIGINT)
    try:
        result = runner.invoke(app, ["evaluate", str(good_run), "--errors", str(out), "--device", "cpu"])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert finished == [True]
    assert result.exit_code == 130 and result.stderr.strip() == "error: interrupted" and not out.exists()


# ---------------------------------------------------------------- issue 37: hostile inputs, round four

def _cli(args: list[str], cwd: Path, timeout: int = 60) -> subprocess.CompletedProcess:
    """The CLI in its own process, with a clock: a reader that blocks fails the test instead of
    hanging it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "mnistkit", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def _one_error(proc: subprocess.CompletedProcess, needle: str) -> str:
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


@pytest.fixture
def fifo_runs(tmp_path, good_run):
    """A runs folder of a good run and one whose metrics.jsonl is a named pipe nobody writes."""
    runs = tmp_path / "runs"
    shutil.copytree(good_run, runs / "ok")
    shutil.copytree(good_run, runs / "bad")
    (runs / "bad" / "metrics.jsonl").unlink()
    os.mkfifo(runs / "bad" / "metrics.jsonl")
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("command", ["runs", "compare", "check", "report"])
def test_a_named_pipe_in_a_run_folder_is_a_damaged_folder_and_the_rest_is_listed(command, fifo_runs, tmp_path):
    args = {"runs": ["runs"], "compare": ["compare", "--all-runs"], "check": ["check"],
            "report": ["report", "-o", str(tmp_path / "rep"), "--device", "cpu"]}[command]
    proc = _cli([*args, "--runs-dir", str(fifo_runs)], tmp_path)
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.returncode == (1 if command == "check" else 0), (proc.stdout, proc.stderr)
    said = proc.stdout + proc.stderr
    assert "metrics.jsonl is a named pipe, not a regular file" in said, said
    if command == "runs":
        assert "│ ok " in proc.stdout and "finished" in proc.stdout


@pytest.mark.slow   # starts processes or builds a whole report: not the quick loop's
def test_a_named_pipe_is_never_read(fifo_runs, tmp_path):
    """plot of the run, a change-log, a checkpoint and a sweep spec that are named pipes: one line each."""
    _one_error(_cli(["plot", str(fifo_runs / "bad"), "-o", str(tmp_path / "c.png")], tmp_path),
               "metrics.jsonl is a named pipe, not a regular file; it is not a metrics file")
    os.mkfifo(tmp_path / "exp.yaml")
    _one_error(_cli(["compare", "--experiments", str(tmp_path / "exp.yaml"), "--runs-dir", str(fifo_runs)], tmp_path),
               "exp.yaml is a named pipe, not a regular file; it is not a change-log file")
    os.mkfifo(tmp_path / "ck.pt")
    _one_error(_cli(["evaluate", str(tmp_path / "ck.pt"), "--device", "cpu"], tmp_path),
               "ck.pt is a named pipe, not a regular file")
    os.mkfifo(tmp_path / "sweep.yaml")
    _one_error(_cli(["sweep", str(tmp_path / "sweep.yaml"), "--runs-dir", str(tmp_path / "r")], tmp_path),
               "sweep.yaml is a named pipe, not a regular file")


@pytest.mark.parametrize("command", ["runs", "compare", "check", "plot"])
def test_json_nested_too_deeply_is_a_damaged_folder(command, runner, tmp_path, good_run):
    runs = tmp_path / "runs"
    shutil.copytree(good_run, runs / "ok")
    shutil.copytree(good_run, runs / "bad")
    (runs / "bad" / "metrics.jsonl").write_text("[" * 200_000 + "\n")
    args = {"runs": ["runs", "--runs-dir", str(runs)], "compare": ["compare", "--all-runs", "--runs-dir", str(runs)],
            "check": ["check", "--runs-dir", str(runs)],
            "plot": ["plot", str(runs / "bad"), "-o", str(tmp_path / "c.png")]}[command]
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    said = result.stdout + result.stderr
    assert "metrics.jsonl:1 is not valid JSON (nested too deeply); the run folder is damaged" in said, said
    if command == "plot":
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    else:
        assert result.exit_code == (1 if command == "check" else 0), said
        assert "skipped a damaged run folder" in said or command == "runs", said
        assert "│ ok " in result.stdout or command == "check", result.stdout


ESCAPES = "\x1b]0;owned\x1b\\ \x1b[2J \x1b]52;c;cHduZWQ=\x07 \x9b2J"   # title, clear, clipboard, C1 CSI


def _no_escape_reaches(result, shown=True) -> str:
    said = result.stdout + result.stderr
    assert "\x1b" not in said and "\x9b" not in said, repr(said[:3000])
    assert "Traceback" not in said
    if shown:
        assert "\\x1b" in said, said   # shown for what it is, not dropped silently
    return said


def _escape_setup(tmp: Path, good: Path, what: str) -> list[str]:
    if what == "runs":
        runs = tmp / "runs"
        shutil.copytree(good, runs / f"x{ESCAPES}y")
        shutil.copytree(good, runs / "model")
        edit_config(runs / "model", lambda d: d.update(model=f"I3{ESCAPES}"))
        shutil.copytree(good, runs / "diverged")
        (runs / "diverged" / "outcome.json").write_text(
            json.dumps({"state": "diverged", "epoch": 1, "reason": f"loss {ESCAPES}"}))
        return ["runs", "--runs-dir", str(runs)]
    if what == "evaluate":
        shutil.copytree(good, tmp / f"run{ESCAPES}")
        return ["evaluate", str(tmp / f"run{ESCAPES}"), "--device", "cpu"]
    if what.startswith("compare"):
        path = changelog(tmp, lambda t: t.replace("changes: Transition layers (1x1) + tuned channels",
                                                  f"changes: {json.dumps('Transition ' + ESCAPES)}"))
        fmt = what.partition("-")[2]
        return ["compare", "--experiments", str(path), "--runs-dir", str(tmp / "none")] + (["-f", fmt] if fmt else [])
    if what == "summary":
        arch = (ROOT / "examples" / "architectures" / "i3.yaml").read_text()
        (tmp / "a.yaml").write_text(re.sub(r"(?m)^description: .*$",
                                           lambda m: "description: " + json.dumps(f"Mine {ESCAPES}"), arch))
        return ["summary", str(tmp / "a.yaml")]
    if what == "sweep":
        name = "lr\x1b]0;owned\x07\x1b[2J\x9b2J"   # a folder name: no backslash
        (tmp / "s.yaml").write_text(f"name: {json.dumps(name)}\nmodels: [I3]\ngrid: {{lr: [0.1]}}\n")
        return ["sweep", str(tmp / "s.yaml"), "--report", "--runs-dir", str(tmp / "r")]
    if what == "error":
        return ["evaluate", str(tmp / f"gone{ESCAPES}\nerror: forged second line")]
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["runs", "evaluate", "compare", "compare-markdown", "compare-csv", "summary",
                                  "sweep", "error"])
def test_terminal_escapes_in_user_text_are_shown_not_obeyed(what, runner, tmp_path, good_run):
    result = runner.invoke(app, _escape_setup(tmp_path, good_run, what))
    said = _no_escape_reaches(result)
    if what == "error":
        assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "\\nerror: forged second line" in result.stderr
    else:
        assert result.exit_code == 0, said


def test_check_junit_parses_whatever_the_text_holds(runner, tmp_path):
    """A runs folder (or a change-log's text) with characters XML 1.0 forbids: the report still parses."""
    from xml.etree import ElementTree as ET

    out = tmp_path / "check.xml"
    result = runner.invoke(app, ["check", "--format", "junit", "-i", "I3", "--runs-dir", str(tmp_path / "r\x01\x1bx"),
                                 "-o", str(out)])
    assert result.exit_code == 1, result.output   # a check failed: no run
    root = ET.fromstring(out.read_text())   # before: not well-formed (invalid token)
    details = [f.get("message") for f in root.iter("failure")]
    assert details and all("r\\x01\\x1bx" in d for d in details), details
    _no_escape_reaches(result)   # the failing checks on stderr too


def test_compare_csv_text_cells_never_start_a_formula(runner, tmp_path):
    import csv
    import io

    formulas = {"I3": '=HYPERLINK("http://evil.example","x")', "I4": "+1+cmd|' /C calc'!A0", "I1": "-2+3",
                "I2": "@SUM(1,1)"}
    text = (ROOT / "mnistkit" / "experiments.yaml").read_text()
    for ident, formula in formulas.items():
        text, n = re.subn(rf"(- id: {ident}\n(?:    #.*\n)*    model: .*\n    changes: ).*", lambda m: m.group(1)
                          + json.dumps(formula), text)
        assert n == 1, ident
    (tmp_path / "exp.yaml").write_text(text)
    result = runner.invoke(app, ["compare", "-f", "csv", "--experiments", str(tmp_path / "exp.yaml"),
                                 "--runs-dir", str(tmp_path / "none")])
    assert result.exit_code == 0, result.output
    rows = {r["id"]: r for r in csv.DictReader(io.StringIO(result.stdout))}
    for ident, formula in formulas.items():
        assert rows[ident]["changes"] == "'" + formula, rows[ident]
    assert rows["I3"]["test_acc_reported"] == "99.6" and rows["I3"]["params_measured"] == "14500"   # numbers stay


@pytest.mark.parametrize("spec, needle", [
    ("grid: {epochs: [1.5]}", "trial I3-epochs1.5-seed42: epochs must be int, not float (1.5)"),
    ("grid: {batch_size: [true]}", "trial I3-batch_sizeTrue-seed42: batch_size must be int, not bool (True)"),
    ("recipe: {lr: abc}", "trial I3-seed42: lr must be float, not str ('abc')"),
    ("recipe: {epochs: 2.5}", "trial I3-seed42: epochs must be int, not float (2.5)"),
    ("grid: {augment.degrees: [x]}", "augment.degrees must be float, not str ('x')"),
    ("recipe: {augment: true}", "augment must be a mapping"),
])
def test_a_sweep_specs_values_are_checked_as_the_recipe_checks_them_before_any_trial(spec, needle, tmp_path):
    from mnistkit.sweeps.spec import SweepError, load_spec

    (tmp_path / "s.yaml").write_text(f"name: s\nmodels: [I3]\n{spec}\ndata: {{dataset: synthetic, limit: 64}}\n")
    with pytest.raises(SweepError) as info:   # before: accepted, and the trial failed (or trained with True)
        load_spec(tmp_path / "s.yaml")
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_a_sweep_spec_with_a_wrong_type_is_one_line_and_writes_nothing(runner, tmp_path):
    (tmp_path / "s.yaml").write_text("name: s\nmodels: [I3]\nrecipe: {lr: abc}\ndata: {dataset: synthetic, limit: 64}\n")
    result = runner.invoke(app, ["sweep", str(tmp_path / "s.yaml"), "--runs-dir", str(tmp_path / "r")])
    assert result.exit_code == 1 and result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 's.yaml'}: trial I3-seed42: lr must be float, not str ('abc')"], result.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, name", [
    (["init", ""], "folder"),
    (["predict", "RUN", ""], "images"),
    (["predict", "", "x.png"], "target"),
    (["evaluate", ""], "target"),
    (["plot", ""], "runs"),
])
def test_an_empty_path_is_refused_not_taken_as_the_current_folder(args, name, runner, tmp_path, good_run,
                                                                  monkeypatch):
    shutil.copytree(good_run, tmp_path / "RUN")
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.exit_code, result.output)   # before: init wrote here, predict read here
    assert result.stderr.strip().splitlines() == [
        f"error: Invalid value for '{name}': an empty path; name a file or a folder ('.' for the current folder); "
        f"see 'mnistkit {args[0]} --help'"], result.stderr
    assert snapshot(tmp_path) == before


def test_init_project_refuses_an_empty_folder(tmp_path, monkeypatch):
    from mnistkit.errors import UsageError
    from mnistkit.project import init_project

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="empty path"):
        init_project("")
    assert not list(tmp_path.iterdir())
