"""Sweeps: the spec is checked before anything runs; trials run in local workers or as Ray
tasks with the same results; failures are recorded and the sweep goes on; --resume runs only
what is missing."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from mnistkit.cli import app
from mnistkit.errors import SweepError
from mnistkit.runs import read_metrics
from mnistkit.sweeps.sweep import load_spec, run_sweep

SPEC = """name: syn
models: [I3]
seeds: [1, 2]
grid: {lr: [0.05, 0.1]}
recipe: {epochs: 1, batch_size: 128}
data: {dataset: synthetic, limit: 300}
"""


def write(tmp_path: Path, text: str = SPEC) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def strip(rows):
    return [{k: v for k, v in r.to_dict().items() if k not in ("seconds", "train_images_per_s")} for r in rows]


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.replace("name: syn", "name: ../up"), "name must be a folder name"),
    (lambda s: s + "colour: red\n", "unknown key 'colour'"),
    (lambda s: s.replace("grid: {lr: [0.05, 0.1]}", "grid: {learning_rate: [1]}"), "'learning_rate' is not a recipe key"),
    (lambda s: s.replace("grid: {lr: [0.05, 0.1]}", "grid: {lr: [0.05, -1]}"), "lr must be a positive number"),
    (lambda s: s.replace("models: [I3]", "models: [I9]"), "unknown model 'I9'"),
    (lambda s: s.replace("seeds: [1, 2]", "seeds: [1, 1]"), "seeds must be"),
    (lambda s: s.replace("grid: {lr: [0.05, 0.1]}", "random: {n: 2}"), "give at least one range"),
    (lambda s: s + "random: {n: 2, lr: {min: 0.1, max: 0.2}}\n", "grid or random, not both"),
    (lambda s: s.replace("dataset: synthetic", "dataset: cifar"), "dataset must be one of"),
    # issue 29, item 3: two trials of one folder name, or of one recipe spelled twice
    (lambda s: s.replace("grid: {lr: [0.05, 0.1]}", "grid: {lr: [1, 1.0]}"), "train the same recipe"),
    (lambda s: s.replace("models: [I3]", "models: [I3, i3]"), "train the same recipe"),
    (lambda s: s.replace("grid: {lr: [0.05, 0.1]}", "grid: {epochs: [1, 2], lr: [0.1, 0.1]}"), "train the same recipe"),
    # issue 29, item 9: counted before anything is built (this grid is 10**6 trials)
    (lambda s: s.replace("grid: {lr: [0.05, 0.1]}", "grid: {" + ", ".join(
        f"{k}: [{', '.join(str(0.01 * (i + 1)) for i in range(10))}]"
        for k in ("lr", "weight_decay", "label_smoothing", "dropout", "ema", "grad_clip")) + "}"),
     "2,000,000 trials; a sweep runs at most 1,000"),
    # keys of 0.8 get what replaced them, fixed or varied
    (lambda s: s.replace("grid: {lr: [0.05, 0.1]}", "grid: {shards: [1, 2]}"), "grid: shards was removed in 0.9"),
    (lambda s: s.replace("recipe: {epochs: 1,", "recipe: {bn_relu: fused, epochs: 1,"),
     "recipe: bn_relu was replaced by backend in 0.9"),
    # issue 29, item 11: tracebacks before
    (lambda s: s.replace("name: syn", "name: " + "x" * 300), "a sweep's name is at most 100 bytes"),
    (lambda s: s.replace("grid: {lr: [0.05, 0.1]}", "random: {n: 2, seed: [1, 2], lr: {min: 0.1, max: 0.2}}"),
     "random: seed must be a whole number"),
    (lambda s: s.replace("grid: {lr: [0.05, 0.1]}", "random: {n: 2, epochs: {min: 1, max: .inf}}"),
     "of finite numbers"),
    # issue 29, item 10: typos under data: were silently ignored
    (lambda s: s.replace("dataset: synthetic", "dataset: synthetic, vall: 50"), "data: unknown key 'vall'; known keys"),
    (lambda s: s.replace("dataset: synthetic", "dataset: synthetic, limt: 100"), "data: unknown key 'limt'"),
    (lambda s: "a: [\n", "not valid YAML"),
])
def test_a_bad_spec_is_one_line_before_anything_runs(runner, tmp_path, edit, needle):
    path = write(tmp_path, edit(SPEC))
    result = runner.invoke(app, ["sweep", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output, result.stderr
    assert not (tmp_path / "runs").exists()


def test_random_search_is_reproducible(tmp_path):
    text = SPEC.replace("grid: {lr: [0.05, 0.1]}", "random: {n: 3, seed: 7, lr: {min: 0.01, max: 0.3, log: true}, "
                                                   "label_smoothing: {min: 0, max: 0.1}}")
    a, b = load_spec(write(tmp_path, text)), load_spec(write(tmp_path, text))
    assert [t.name for t in a.trials] == [t.name for t in b.trials] and len(a.trials) == 6
    assert all(0.01 <= dict(t.overrides)["lr"] <= 0.3 for t in a.trials)


@pytest.mark.slow
def test_failing_trial_is_recorded_and_resume_runs_only_what_is_missing(runner, tmp_path):
    text = SPEC.replace("models: [I3]", "models: [I0]").replace("grid: {lr: [0.05, 0.1]}", "grid: {lr: [0.05, 1000000]}")
    text = text.replace("recipe: {epochs: 1, batch_size: 128}", "recipe: {epochs: 1, batch_size: 64, scheduler: none}")
    text = text.replace("limit: 300", "limit: 1000")
    path = write(tmp_path, text)
    runs = tmp_path / "runs"
    result = runner.invoke(app, ["sweep", str(path), "--runs-dir", str(runs), "--workers", "1", "--json"])
    assert result.exit_code == 1, result.output  # some trials did not finish: said, and the exit code says so
    report = json.loads(result.stdout)
    rows = {r["config"]: r for r in report["configs"]}
    assert rows["I0 lr=0.05"]["done"] == 2 and rows["I0 lr=1000000"]["failed"] == 2
    assert rows["I0 lr=0.05"]["trained_on"] == {"dataset": "synthetic", "train_samples": 1000, "val_samples": 0,
                                                "epochs": 1}
    assert "diverged" in result.stderr and result.stderr.strip().splitlines()[-1].startswith("error: 2 of 4 trials")
    # again without --resume: refused; with --resume: the finished trials are skipped
    again = runner.invoke(app, ["sweep", str(path), "--runs-dir", str(runs)])
    assert again.exit_code == 2 and "--resume" in again.stderr
    spec = load_spec(path)
    good = [t for t in spec.trials if dict(t.overrides)["lr"] == 0.05]
    import shutil

    shutil.rmtree(runs / "syn" / good[0].name)
    records = run_sweep(spec, runs, workers=1, resume=True)
    by_name = {r["trial"]: r for r in records}
    assert by_name[good[0].name]["status"] == "finished" and not by_name[good[0].name]["skipped"]
    assert by_name[good[1].name]["skipped"]
    assert {by_name[t.name]["status"] for t in spec.trials if t not in good} == {"diverged"}


@pytest.mark.slow
def test_ray_gives_the_same_results_as_local_workers(tmp_path):
    ray = pytest.importorskip("ray")
    spec = load_spec(write(tmp_path))
    local = run_sweep(spec, tmp_path / "local", workers=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(spec, tmp_path / "ray", ray="auto", workers=2)
    finally:
        ray.shutdown()
    assert [r["status"] for r in local] == [r["status"] for r in remote] == ["finished"] * 4
    for t in spec.trials:
        a, b = read_metrics(tmp_path / "local" / "syn" / t.name), read_metrics(tmp_path / "ray" / "syn" / t.name)
        assert strip(a) == strip(b)
        assert (tmp_path / "ray" / "syn" / t.name / "best.pt").is_file()  # the whole run folder came back


def test_ray_missing_is_one_clear_line(runner, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    result = runner.invoke(app, ["sweep", str(write(tmp_path)), "--runs-dir", str(tmp_path / "r"), "--ray", "auto"])
    assert result.exit_code == 1 and "mnistkit[ray]" in result.stderr.strip().splitlines()[-1]


def test_augmentation_keys_can_vary(tmp_path):
    from mnistkit.experiments import find_experiments
    from mnistkit.sweeps.sweep import trial_recipe

    spec = load_spec(write(tmp_path, SPEC.replace("grid: {lr: [0.05, 0.1]}", "grid: {augment.degrees: [5, 10]}")))
    assert [t.name for t in spec.trials] == ["I3-augment.degrees5-seed1", "I3-augment.degrees5-seed2",
                                             "I3-augment.degrees10-seed1", "I3-augment.degrees10-seed2"]
    recipe = trial_recipe(find_experiments(), "I3", spec.recipe, dict(spec.trials[0].overrides), 1)
    assert recipe.augment.degrees == 5 and recipe.augment.translate == 0.05 and recipe.batch_size == 128
    with pytest.raises(SweepError, match="augment.degrees must be in"):
        load_spec(write(tmp_path, SPEC.replace("grid: {lr: [0.05, 0.1]}", "grid: {augment.degrees: [500]}")))


@pytest.mark.parametrize("spec_path", sorted((Path(__file__).resolve().parents[1] / "examples").glob("sweep-*.yaml")),
                         ids=lambda p: p.name)
def test_example_specs_load(spec_path):
    """The specs the README tells users to run are valid; the results table's spec trains every
    iteration of the change-log with its own recipe, on the whole training set, at the README's seeds."""
    spec = load_spec(spec_path)
    assert spec.trials and spec.data.dataset == "mnist"
    if spec_path.name == "sweep-readme.yaml":
        assert [(t.model, t.seed) for t in spec.trials] == [(m, s) for m in ("I0", "I1", "I2", "I3", "I4", "I5")
                                                             for s in (1, 2, 3, 42)]
        assert spec.recipe == {} and spec.varied == () and spec.data.val == 0


def test_trials_close_in_value_get_folders_of_their_own(tmp_path):
    # issue 29, item 3: lr 0.1 and 0.1000001 were both I3-lr0.1-seed1: one never trained
    spec = load_spec(write(tmp_path, SPEC.replace("grid: {lr: [0.05, 0.1]}", "grid: {lr: [0.1, 0.1000001]}")))
    names = [t.name for t in spec.trials]
    assert len(set(names)) == len(names) == 4
    assert "I3-lr0.1-seed1" in names and "I3-lr0.1000001-seed1" in names


def test_a_runs_folder_that_cannot_hold_the_sweep_is_one_line(runner, tmp_path):
    # issue 29, item 11: --runs-dir a file (or a read-only folder) was a traceback
    path = write(tmp_path)
    (tmp_path / "afile").write_text("x")
    result = runner.invoke(app, ["sweep", str(path), "--runs-dir", str(tmp_path / "afile")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()[-1:]
    assert "cannot create the sweep folder" in line and "choose a runs folder you can write to" in line


USER_SPEC = """name: widths
models: [models.py:build]
seeds: [1]
grid: {model_args.width: [4, 6]}
recipe: {epochs: 1, batch_size: 128}
data: {dataset: synthetic, limit: 300}
"""

USER_MODELS = '''
from torch import nn


def build(width=4):
    """A GAP net whose width a sweep varies."""
    return nn.Sequential(nn.Conv2d(1, width, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(width, 10, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
'''


@pytest.mark.slow
def test_a_sweep_over_a_users_model_args_runs_in_local_workers_and_on_ray_from_the_source_it_hashed(tmp_path):
    """An architecture search: a grid over the model's own arguments. The source travels with
    the trials (the file is gone by the time they run), and Ray's results equal the local ones."""
    ray = pytest.importorskip("ray")
    (tmp_path / "models.py").write_text(USER_MODELS)
    spec = load_spec(write(tmp_path, USER_SPEC))
    assert [t.name for t in spec.trials] == ["build-width4-seed1", "build-width6-seed1"]
    (tmp_path / "models.py").unlink()
    local = run_sweep(spec, tmp_path / "local", workers=2)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        remote = run_sweep(spec, tmp_path / "ray", ray="auto", workers=2)
    finally:
        ray.shutdown()
    assert [r["status"] for r in local] == [r["status"] for r in remote] == ["finished"] * 2, (local, remote)
    import yaml
    params = []
    for t in spec.trials:
        a, b = read_metrics(tmp_path / "local" / "widths" / t.name), read_metrics(tmp_path / "ray" / "widths" / t.name)
        assert strip(a) == strip(b)
        config = yaml.safe_load((tmp_path / "ray" / "widths" / t.name / "config.yaml").read_text())
        assert config["model_source"]["args"] == {"width": dict(t.overrides)["model_args.width"]}
        assert (tmp_path / "ray" / "widths" / t.name / "model.py").read_text() == USER_MODELS
        params.append(config["params"])
    assert params[0] < params[1]


def test_a_sweep_over_model_args_the_model_does_not_take_is_one_line_before_anything_runs(runner, tmp_path):
    (tmp_path / "models.py").write_text(USER_MODELS)
    path = write(tmp_path, USER_SPEC.replace("model_args.width", "model_args.depth"))
    result = runner.invoke(app, ["sweep", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code != 0 and "takes no argument 'depth'" in result.output, result.output
    assert not (tmp_path / "runs").exists()


def test_model_args_over_a_yaml_architecture_are_refused_not_ignored(runner, tmp_path):
    shutil.copy(Path(__file__).resolve().parents[1] / "examples" / "architectures" / "s2.yaml", tmp_path / "s2.yaml")
    path = write(tmp_path, USER_SPEC.replace("models.py:build", "s2.yaml"))
    result = runner.invoke(app, ["sweep", str(path), "--runs-dir", str(tmp_path / "runs")])
    assert result.exit_code != 0 and "s2.yaml is a YAML architecture, which takes no model_args (width)" in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_sweep_on_a_ray_head_started_as_the_readme_says(tmp_path):
    """`ray start --head` (token authentication on by default since Ray 2.59), then
    `mnistkit sweep --ray 127.0.0.1:PORT` as written: 2 trials finish, and none of Ray's log
    lines reach the user. The head's token lives in this test's own HOME."""
    pytest.importorskip("ray")
    import os
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray_cli = Path(sys.executable).with_name("ray")
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS"):
        env.pop(key, None)
    (tmp_path / "home").mkdir()
    spec = write(tmp_path, SPEC.replace("seeds: [1, 2]", "seeds: [1]"))
    # a token in ~/.ray/auth_token makes the head require it, as on a user's machine that has one
    token = subprocess.run([str(ray_cli), "get-auth-token", "--generate"], env=env, capture_output=True, text=True,
                           timeout=120)
    assert token.returncode == 0 and (tmp_path / "home" / ".ray" / "auth_token").is_file(), token.stderr[-2000:]
    started = subprocess.run([str(ray_cli), "start", "--head", "--port", str(port), "--num-cpus", "2",
                              "--include-dashboard=false", "--disable-usage-stats"], env=env, capture_output=True,
                             text=True, timeout=120)
    try:
        assert started.returncode == 0 and "Token authentication is enabled" in started.stderr, started.stderr[-2000:]
        result = subprocess.run([sys.executable, "-m", "mnistkit", "sweep", str(spec), "--ray", f"127.0.0.1:{port}",
                                 "--runs-dir", str(tmp_path / "runs"), "--json"], env=env, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        configs = json.loads(result.stdout)["configs"]
        assert [(c["trials"], c["done"]) for c in configs] == [(1, 1), (1, 1)]
        assert "[2/2]" in result.stderr and "failed" not in result.stderr
        noise = [line for line in result.stderr.splitlines() if re.search(r"\b(WARNING|INFO|W \d|I \d)", line)]
        assert not noise, noise
    finally:
        subprocess.run([str(ray_cli), "stop", "--force"], env=env, capture_output=True, timeout=120)


LONG_SPEC = """name: long
models: [I4]
seeds: [1, 2, 3, 4]
recipe: {epochs: 30, batch_size: 128}
data: {dataset: synthetic, limit: 1500}
"""


def _sweep_workers(main_pid: int) -> list[int]:
    """The sweep's worker processes (spawned children running trials; not the resource tracker)."""
    import subprocess

    pids = subprocess.run(["pgrep", "-P", str(main_pid)], capture_output=True, text=True).stdout.split()
    workers = []
    for pid in map(int, pids):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                workers.append(pid)
        except OSError:
            pass
    return workers


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _start_long_sweep(tmp_path):
    import os
    import subprocess
    import time

    spec = write(tmp_path, LONG_SPEC)
    runs = tmp_path / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "mnistkit", "sweep", str(spec), "--workers", "2", "--runs-dir",
                             str(runs)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MNISTKIT_FUSED": "0"}, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:   # both workers are training (an epoch of each is on disk)
        done = [p for p in (runs / "long").glob("*/metrics.jsonl") if p.stat().st_size > 0]
        if len(done) >= 2:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("the sweep's trials did not start")
    workers = _sweep_workers(proc.pid)
    assert len(workers) == 2
    return proc, runs / "long", workers


@pytest.mark.slow
def test_workers_die_with_a_killed_sweep_and_start_no_other_trial(tmp_path):
    import signal
    import time

    proc, folder, workers = _start_long_sweep(tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(w) for w in workers), "a worker outlived its sweep"
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["I4-seed1", "I4-seed2"]  # 3 and 4 never began


@pytest.mark.slow
@pytest.mark.parametrize("how", ["SIGTERM to the sweep", "Ctrl-C (SIGINT to the process group)"])
def test_sigterm_or_ctrl_c_stops_every_trial_cleanly_and_says_how_to_resume_once(tmp_path, how):
    import os
    import signal

    from mnistkit.runs import summarize_run

    proc, folder, workers = _start_long_sweep(tmp_path)
    if how.startswith("SIGTERM"):
        proc.send_signal(signal.SIGTERM)
    else:
        os.killpg(proc.pid, signal.SIGINT)   # what a terminal does on Ctrl-C
    out, err = proc.communicate(timeout=120)
    code, first = (143, "error: terminated (SIGTERM)") if how.startswith("SIGTERM") else (130, "error: interrupted")
    assert proc.returncode == code, err
    assert not any(_alive(w) for w in workers)
    assert err.count("--resume") == 1 and err.strip().splitlines()[-1].startswith(first), err
    assert "Traceback" not in err and "leaked" not in err, err
    trials = sorted(p for p in folder.iterdir() if p.is_dir())
    assert [t.name for t in trials] == ["I4-seed1", "I4-seed2"]
    assert all(summarize_run(t).state == "interrupted" for t in trials)   # consistent, resumable
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert len(progress) == len(set(progress))   # each trial's line once



@pytest.mark.slow
def test_a_stop_while_a_worker_is_idle_keeps_the_other_workers_clean_stop(tmp_path):
    """One worker has finished its trial and waits; the other trains. Stopping the sweep must not
    kill the idle one (that broke the pool, and the trainer was killed mid-stop, unreported)."""
    import os
    import signal
    import subprocess
    import time

    driver = f"""
import json, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from mnistkit.sweeps.workers import run_in_workers
from tests.fake_trials import fake_trial
got = []
try:
    run_in_workers(fake_trial, [{{"id": 0, "sleep": 0.1, "folder": {str(tmp_path)!r}}},
                                {{"id": 1, "sleep": 60, "folder": {str(tmp_path)!r}}}], 2, got.append)
except KeyboardInterrupt:
    print(json.dumps(got))
"""
    proc = subprocess.Popen([sys.executable, "-c", driver], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "done-0").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)   # worker 0 is idle now, worker 1 sleeps in its "training"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    reported = json.loads(out)
    assert sorted(r["trial"] for r in reported) == [0, 1], (reported, err)
    assert (tmp_path / "stopped-1").read_text() == "cleanly"
    assert "BrokenProcessPool" not in err and "Traceback" not in err, err
