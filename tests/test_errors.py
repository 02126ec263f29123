"""Every way a user can get things wrong ends in one clear stderr line, a non-zero exit code,
no traceback and no damaged file."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mnistkit.cli import app
from mnistkit.errors import RunError
from mnistkit.recipe import DataOptions, Recipe
from mnistkit.runs.checkpoint import CHECKPOINT_VERSION, load_checkpoint, save_checkpoint
from mnistkit.runs import read_metrics
from mnistkit.training.loop import train

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(result, code=None):
    assert result.exit_code != 0, result.output
    if code is not None:
        assert result.exit_code == code, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return train("I3", Recipe(epochs=1, batch_size=128, lr=0.05), DataOptions("synthetic", limit=300),
                 device="cpu", runs_dir=runs).run_dir


# ---------------------------------------------------------------- options

def test_runs_folder_that_cannot_be_written(runner, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = runner.invoke(app, ["train", "--dataset", "synthetic", "--epochs", "1", "--limit", "100",
                                 "--runs-dir", str(blocker / "runs")])
    line = one_line_error(result, 1)
    assert "cannot create a run folder" in line and "runs folder you can write to" in line


def test_debug_shows_the_traceback(runner):
    result = runner.invoke(app, ["--debug", "summary", "NOPE"])
    assert result.exit_code != 0 and result.exception is not None and "NOPE" in str(result.exception)


def test_typer_usage_errors_exit_2(runner):
    result = runner.invoke(app, ["train", "--epochs", "many"])
    assert result.exit_code == 2 and "Traceback" not in result.output


# ---------------------------------------------------------------- data

def test_data_folder_is_a_file(runner, tmp_path):
    f = tmp_path / "mnist.txt"
    f.write_text("x")
    line = one_line_error(runner.invoke(app, ["train", "--data-dir", str(f), "--runs-dir", str(tmp_path)]), 1)
    assert "not a folder" in line


def test_truncated_idx_through_the_cli(runner, tmp_path):
    from helpers import write_fake_mnist

    write_fake_mnist(tmp_path / "d", gz=False)
    p = tmp_path / "d" / "t10k-images-idx3-ubyte"
    p.write_bytes(p.read_bytes()[:1000])
    line = one_line_error(runner.invoke(app, ["train", "--data-dir", str(tmp_path / "d"), "--epochs", "1",
                                              "--runs-dir", str(tmp_path / "r")]), 1)
    assert "t10k-images-idx3-ubyte" in line and "truncated" in line


# ---------------------------------------------------------------- experiments.yaml

@pytest.mark.parametrize("content,needle", [
    (None, "not found"), ("", "empty"), ("a: [\n", "not valid YAML"),
    ("iterations: []\ndefaults: {epochs: ten}\n", "must be int"),
    ("iterations: []\ncolour: red\n", "unknown key"),
    ("iterations:\n  - {id: I3, model: Z9}\n", "not registered"),
])
def test_bad_experiments_file_on_train(runner, tmp_path, content, needle):
    path = tmp_path / "exp.yaml"
    if content is not None:
        path.write_text(content)
    line = one_line_error(runner.invoke(app, ["train", "I3", "--experiments", str(path), "--dataset", "synthetic",
                                              "--runs-dir", str(tmp_path)]), 1)
    assert str(path) in line and needle in line


# ---------------------------------------------------------------- checkpoints

def evaluate(runner, target):
    return runner.invoke(app, ["evaluate", str(target), "--device", "cpu"])


def test_missing_checkpoint(runner, tmp_path):
    assert "does not exist" in one_line_error(evaluate(runner, tmp_path / "none.pt"), 1)
    assert "no checkpoint" in one_line_error(evaluate(runner, tmp_path), 1)


def test_truncated_checkpoint(runner, run_dir, tmp_path):
    bad = tmp_path / "cut.pt"
    bad.write_bytes((run_dir / "best.pt").read_bytes()[:3000])
    assert "truncated or corrupt" in one_line_error(evaluate(runner, bad), 1)


def test_not_a_checkpoint(runner, tmp_path):
    for name, data in (("text.pt", b"hello, I am text"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        assert "corrupt" in one_line_error(evaluate(runner, tmp_path / name), 1)
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    assert "not a mnistkit checkpoint" in one_line_error(evaluate(runner, tmp_path / "foreign.pt"), 1)


def test_checkpoint_of_another_model(runner, run_dir, tmp_path):
    ckpt = load_checkpoint(run_dir / "best.pt")
    ckpt["model"] = "I1"  # I3 weights labelled as I1, the name only: the record of its source disagrees
    torch.save(ckpt, tmp_path / "half.pt")
    assert "names model 'I1' but its model_source is 'I3'" in one_line_error(evaluate(runner, tmp_path / "half.pt"), 1)
    ckpt["model_source"] = {**ckpt["model_source"], "name": "I1", "reference": "I1"}
    torch.save(ckpt, tmp_path / "other.pt")
    assert "do not fit model I1" in one_line_error(evaluate(runner, tmp_path / "other.pt"), 1)
    ckpt["model"] = "Z9"
    ckpt["model_source"] = {**ckpt["model_source"], "name": "Z9", "reference": "Z9"}
    torch.save(ckpt, tmp_path / "unknown.pt")
    assert "registered model 'Z9', which mnistkit does not have" in one_line_error(evaluate(runner, tmp_path / "unknown.pt"), 1)


def test_checkpoint_from_a_newer_format(runner, run_dir, tmp_path):
    ckpt = load_checkpoint(run_dir / "best.pt")
    ckpt["format_version"] = CHECKPOINT_VERSION + 1
    torch.save(ckpt, tmp_path / "newer.pt")
    assert "upgrade mnistkit" in one_line_error(evaluate(runner, tmp_path / "newer.pt"), 1)


class Payload:
    """Unpickling this calls open(path, 'w'): it would create a file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_crafted_pickle_is_refused_and_never_runs(runner, tmp_path, zip_format):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"format": "mnistkit-checkpoint", "format_version": 1, "model": "I3", "x": Payload(marker)}, evil,
               _use_new_zipfile_serialization=zip_format)
    assert not marker.exists()
    line = one_line_error(evaluate(runner, evil), 1)
    assert "refused" in line and "could run code" in line and "io.open" in line
    assert not marker.exists()
    with pytest.raises(RunError):
        load_checkpoint(evil)
    assert not marker.exists()


def test_resume_from_a_damaged_run(runner, run_dir, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "last.pt").write_bytes(b"garbage")
    assert "corrupt" in one_line_error(runner.invoke(app, ["train", "--resume", str(copy)]), 1)
    assert "not a run folder" in one_line_error(runner.invoke(app, ["train", "--resume", str(tmp_path)]), 1)


# ---------------------------------------------------------------- atomic writes

def test_failed_checkpoint_write_leaves_the_previous_one_intact(run_dir, tmp_path, monkeypatch):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = (copy / "last.pt").read_bytes()

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        save_checkpoint(copy / "last.pt", {"model": "I3", "state_dict": {"w": torch.zeros(10)}})
    monkeypatch.undo()
    assert (copy / "last.pt").read_bytes() == before
    assert load_checkpoint(copy / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in copy.iterdir()) == [".lock", "best.pt", "config.yaml", "last.pt", "metrics.jsonl"]


# ---------------------------------------------------------------- a real Ctrl-C

def _sigint_as_a_terminal_gives_it():
    # a background job (CI, `make test &`) starts with SIGINT ignored, and a child inherits that:
    # give the child the default disposition so that Python installs its KeyboardInterrupt handler
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_sigint_writes_a_resumable_checkpoint_and_resume_matches(tmp_path):
    args = ["I2", "--dataset", "synthetic", "--epochs", "3", "--limit", "1000", "--batch-size", "128",
            "--lr", "0.05", "--device", "cpu"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    runs = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "mnistkit", "train", *args, "--runs-dir", str(runs)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            preexec_fn=_sigint_as_a_terminal_gives_it)
    deadline = time.time() + 120
    metrics = None
    while time.time() < deadline:  # wait until the first epoch is on disk, then press Ctrl-C
        found = list(runs.glob("*/metrics.jsonl"))
        if found and found[0].read_text().count("\n") >= 1:
            metrics = found[0]
            break
        time.sleep(0.05)
    assert metrics is not None, "the first epoch never finished"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    run = metrics.parent
    # two epochs (seconds of work) were left when the signal was sent: a trainer that ignored
    # Ctrl-C would finish with 0 here, and the test fails
    assert proc.returncode == 130, (proc.returncode, err)
    assert f"mnistkit train --resume {run}" in err and "Traceback" not in err
    done = len(read_metrics(run))
    assert 1 <= done < 3
    assert load_checkpoint(run / "last.pt")["epoch"] == done and f"after epoch {done} of 3" in err

    resumed = subprocess.run([sys.executable, "-m", "mnistkit", "train", "--resume", str(run), "--json",
                              "--device", "cpu"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    full = subprocess.run([sys.executable, "-m", "mnistkit", "train", *args, "--runs-dir", str(tmp_path / "full"),
                           "--json"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert full.returncode == 0, full.stderr
    strip = lambda rows: [{k: v for k, v in r.to_dict().items() if k not in ("seconds", "train_images_per_s")}
                          for r in rows]
    assert strip(read_metrics(run)) == strip(read_metrics(Path(json.loads(full.stdout)["run_dir"])))


# ---------------------------------------------------------------- divergence and strict JSON

def strict(text):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.slow
def test_a_diverging_run_exits_3_and_leaves_no_bad_checkpoint(runner, tmp_path):
    result = runner.invoke(app, ["train", "I0", "--dataset", "synthetic", "--limit", "1000", "--epochs", "1",
                                 "--lr", "1000000", "--device", "cpu", "--runs-dir", str(tmp_path), "--json"])
    assert result.exit_code == 3, result.output
    assert result.stdout == ""
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "no epoch finished with finite numbers" in line
    run = next(tmp_path.iterdir())
    assert not (run / "best.pt").exists()
    last = load_checkpoint(run / "last.pt")
    assert last["epoch"] == 0 and all(bool(torch.isfinite(t).all()) for t in last["state_dict"].values())


@pytest.mark.slow
def test_every_json_output_parses_strictly(runner, tmp_path, run_dir):
    outputs = [
        runner.invoke(app, ["summary", "I3", "--json"]),
        runner.invoke(app, ["models", "--json"]),
        runner.invoke(app, ["evaluate", str(run_dir), "--json", "--device", "cpu"]),
        runner.invoke(app, ["compare", "--runs-dir", str(run_dir.parent), "--json"]),
        runner.invoke(app, ["train", "I3", "--dataset", "synthetic", "--epochs", "1", "--limit", "256", "--seeds", "2",
                            "--runs-dir", str(tmp_path), "--device", "cpu", "--json", "--quiet"]),
    ]
    for result in outputs:
        assert result.exit_code == 0, result.output
        strict(result.stdout)
    # a never-predicted class has no precision: null, where Python's json would write NaN
    report = strict(outputs[2].stdout)
    assert all(row["precision"] is None or 0 <= row["precision"] <= 100 for row in report["per_class"])
    from mnistkit.files import strictjson

    assert strictjson.dumps({"a": float("nan"), "b": [float("inf")]}) == '{"a": null, "b": [null]}'


# ---------------------------------------------------------------- hostile files and paths

def test_gzip_bomb_is_refused_without_inflating_it(tmp_path):
    import gzip
    import resource
    import struct

    from mnistkit.data import DataError, read_idx

    path = tmp_path / "bomb-idx3-ubyte.gz"
    header = struct.pack(">HBBIII", 0, 8, 3, 60000, 28, 28)  # a valid MNIST images header
    with gzip.open(path, "wb", compresslevel=9) as fh:
        fh.write(header)
        zeros = bytes(1 << 20)
        for _ in range(256):  # 256 MiB of zeros: 47 MB are promised
            fh.write(zeros)
    assert path.stat().st_size < 1 << 20
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError, match="more data bytes than its header"):
        read_idx(path, 0x00000803)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 200  # at most the promised 47 MB (and a copy), never the 256 MiB
    big = tmp_path / "huge-idx3-ubyte"
    big.write_bytes(struct.pack(">HBBIII", 0, 8, 3, 10**6, 1000, 1000))  # promises 10^12 bytes
    with pytest.raises(DataError, match="more than any MNIST file"):
        read_idx(big)


def test_output_paths_symlinks_devices_and_modes(runner, tmp_path):
    import stat as st

    base = ["compare", "--runs-dir", str(tmp_path / "none"), "-f", "csv", "-o"]
    # a symlink is followed: the link stays a link, its target gets the report
    target = tmp_path / "target.csv"
    target.write_text("old")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert runner.invoke(app, base + [str(link)]).exit_code == 0
    assert link.is_symlink() and target.read_text().startswith("id,changes,")
    # a character device is written to, never replaced by a regular file
    result = runner.invoke(app, base + ["/dev/null"])
    assert result.exit_code == 0, result.output
    assert st.S_ISCHR(os.stat("/dev/null").st_mode)
    # a new file gets the mode open() would give it under the umask, not 0600
    old = os.umask(0o022)
    try:
        assert runner.invoke(app, base + [str(tmp_path / "new.csv")]).exit_code == 0
    finally:
        os.umask(old)
    assert st.S_IMODE(os.stat(tmp_path / "new.csv").st_mode) == 0o644
    # a folder is one clear line
    line = one_line_error(runner.invoke(app, base + [str(tmp_path)]), 1)
    assert "is a folder" in line


@pytest.mark.parametrize("name, code", [("[/]", 2), ("[bold]x", 1), ("I3[v2]", 1)])   # "[/]" is a path: a file not found
def test_user_text_is_never_read_as_markup(runner, name, code):
    line = one_line_error(runner.invoke(app, ["summary", name]), code)
    assert repr(name) in line


@pytest.mark.slow
def test_interrupt_message_prints_a_resume_command_that_works_in_a_shell(runner, tmp_path, monkeypatch):
    import shlex

    import mnistkit.training.loop as training

    real = training.train_one_epoch

    def ctrl_c_in_epoch_2(s, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return real(s, epoch, *args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", ctrl_c_in_epoch_2)
    runs = tmp_path / "my [v2] runs"
    result = runner.invoke(app, ["train", "I3", "--dataset", "synthetic", "--limit", "256", "--epochs", "3",
                                 "--device", "cpu", "--runs-dir", str(runs), "--quiet"])
    assert result.exit_code == 130, result.output
    run = next(runs.iterdir())
    line = result.stderr.strip().splitlines()[-1]
    assert line.endswith(f"Resume with: mnistkit train --resume {shlex.quote(str(run))}")  # [v2] kept, quoted
    assert shlex.split(line.split("Resume with: ")[1])[-1] == str(run)
