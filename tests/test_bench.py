"""The benchmark scripts run end to end on tiny data, so they cannot rot."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import write_fake_mnist
from mnistkit.backends import kernel


ROOT = Path(__file__).resolve().parent.parent
STUDENT = "bench/models/relu_before_bn.py:Net"   # a student-style model of the benchmark's own
COMPILER = kernel._compiler() if sys.platform.startswith("linux") else None


def kernel_env() -> dict[str, str]:
    """This process's environment without conftest's MNISTKIT_FUSED=0: the child may use the kernel
    (where a C compiler is, it must build and pass; the tests that need it skip only without one)."""
    if COMPILER is None:
        pytest.skip("no C compiler here: the kernel cannot be built")
    return {k: v for k, v in os.environ.items() if k != "MNISTKIT_FUSED"}


def run_bench(script: str, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``bench/SCRIPT`` with ``args`` from the repository root (in ``env``, default this
    process's environment); its stdout, once it succeeded."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True,
                         timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
def test_throughput_benchmark_runs_end_to_end(tmp_path):
    write_fake_mnist(tmp_path / "mnist", n_train=64, n_test=32)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "throughput.py"), "--data-dir", str(tmp_path / "mnist"),
         "--models", f"I3,{STUDENT}", "--steps", "2", "--repeats", "2", "--batch-size", "16", "--workers", "0",
         "--limit", "64", "--cli-repeats", "1", "--whole-process", STUDENT, "--whole-repeats", "1", "--whole-torch",
         "--json",
         "--baseline", str(ROOT)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    r = data["models"]["I3"]
    assert r["reference_images_per_s"] > 0 and r["mnistkit_images_per_s"] > 0
    assert data["machine"]["reference_process"] == "own"   # timed with malloc as a user's script has it
    # the speedup is computed from unrounded rates; the printed rates are rounded to 0.1 img/s, which
    # moves their ratio by up to 0.05/rate relatively (a contended CI run: 17.69 vs 17.716 from rounded rates)
    want = r["mnistkit_images_per_s"] / r["reference_images_per_s"]
    slack = want * 0.05 * (1 / r["mnistkit_images_per_s"] + 1 / r["reference_images_per_s"])
    assert r["speedup"] == pytest.approx(want, abs=0.011 + slack)
    assert len(r["reference_runs"]) == len(r["mnistkit_runs"]) == 2
    # the default backend, resolved (the tests turn the kernel off: torch), and the other one
    # beside it only where the kernel runs
    assert r["mnistkit_backend"] == "torch" and r["mnistkit_other_backend"] is None
    assert r["mnistkit_other_runs"] == [] and r["mnistkit_other_images_per_s"] is None
    assert r["mult_adds"] == 2_179_632  # the model's counted mult-adds, as `mnistkit summary I3` shows
    # each step is set against the matmul ceiling of its own precision, measured in this run
    ceilings = data["matmul_gflops"]
    assert ceilings["fp32"] > 0 and r["ceiling"] == r["mnistkit_precision"] and ceilings[r["ceiling"]] > 0
    assert len(data["matmul_samples"]["fp32"]) == 6  # per model: one per repeat, and one after the last
    for key, gflops, ceiling in (("fraction_of_matmul", r["train_gflops"], ceilings[r["ceiling"]]),
                                 ("fraction_of_matmul_fp32", r["train_gflops_fp32"], ceilings["fp32"])):
        assert r[key] is None or r[key] == pytest.approx(gflops / ceiling, abs=0.01) and 0 < r[key] <= 1
    # a model of the user's own, by its reference (the baseline worker builds registered models only)
    student = data["models"][STUDENT]
    assert student["mult_adds"] == 1_279_296 and student["mnistkit_images_per_s"] > 0
    assert "baseline_runs" not in student
    [w] = data["whole_process"]
    assert w["model"] == str(ROOT / STUDENT.split(":")[0]) + ":Net"
    assert w["mnistkit_seconds"] > 0 and w["reference_seconds"] > 0 and w["baseline_seconds"] > 0
    assert w["fused_over_torch"] == pytest.approx(w["torch_seconds"] / w["mnistkit_seconds"], abs=0.02)
    assert w["speedup"] == pytest.approx(w["reference_seconds"] / w["mnistkit_seconds"], abs=0.02)
    assert set(data["cli_seconds"]) == {"mnistkit --help", "mnistkit summary I3"}
    # a baseline (here this very tree) timed in its own process, in the same repeats
    assert data["settings"]["baseline"] == str(ROOT)
    assert len(r["baseline_runs"]) == 2 and r["baseline_images_per_s"] > 0
    assert r["baseline_speedup"] == pytest.approx(r["baseline_images_per_s"] / r["reference_images_per_s"],
                                                  rel=0.005, abs=0.011)   # from unrounded rates
    assert r["vs_baseline"] == pytest.approx(r["mnistkit_images_per_s"] / r["baseline_images_per_s"], rel=0.005,
                                             abs=0.011)
    assert w["baseline_seconds"] > 0 and len(w["baseline_runs"]) == 1


@pytest.mark.slow
def test_bn_check_runs_end_to_end():
    text = run_bench("bn_check.py", "--reps", "1", "--rounds", "1", "--grad-batch", "4", env=kernel_env())
    assert "kernel: available" in text
    rows = [line for line in text.splitlines() if line.startswith("| I")]
    assert [r.split(" | ")[0] for r in rows] == ["| I1", "| I2", "| I3", "| I4"]
    for row in rows:  # the kernel's gradients are fp32-exact: within 1e-4 of float64
        assert float(row.strip(" |").split(" | ")[-1]) < 1e-4, row


@pytest.mark.slow
def test_accuracy_benchmark_runs_end_to_end(tmp_path):
    write_fake_mnist(tmp_path / "mnist", n_train=64, n_test=32)
    out = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "accuracy.py"), "--data-dir", str(tmp_path / "mnist"),
         "--models", "I0,I3", "--runs-dir", str(tmp_path / "runs"), "--device", "cpu"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| I")]
    assert [r.split("|")[1].strip() for r in rows] == ["I0", "I3"]
    assert "| 14,500 | 42 | 15 |" in rows[1]  # I3 trained with its own recipe (15 epochs), seed 42
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_a_fraction_of_the_ceiling_is_never_above_one():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import throughput
    finally:
        sys.path.pop(0)
    assert throughput.fraction(50.0, 200.0) == 0.25
    assert throughput.fraction(250.0, 200.0) is None  # a disturbed ceiling: no impossible figure
    assert throughput.fraction(50.0, None) is None


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "fused"])
def test_profile_benchmark_runs_end_to_end(tmp_path, backend):
    write_fake_mnist(tmp_path / "mnist", n_train=128, n_test=32)
    text = run_bench("profile_step.py", "--data-dir", str(tmp_path / "mnist"), "--models", "I3", "--steps", "2",
                     "--batch-size", "32", "--floor-repeats", "1", "--backend", backend,
                     env=kernel_env() if backend == "fused" else None)
    head = next(line for line in text.splitlines() if line.startswith("## I3: batch 32"))
    assert f"backend {backend}:" in head   # the backend as prepared, and its note
    assert "wall time" in text and "| batch preparation |" in text
    assert ("| _BNReLU |" in text) == (backend == "fused")   # the kernel's forward among the ops
    # the floor: one row per convolution (8) and per BatchNorm (6) of I3, and their sums
    rows = {line.split(" | ")[0].lstrip("| "): float(line.split(" | ")[1].split()[0].strip("*"))
            for line in text.splitlines() if line.startswith(("| conv ", "| BN + ReLU ", "| **"))}
    convs = [v for k, v in rows.items() if k.startswith("conv ")]
    bns = [v for k, v in rows.items() if k.startswith("BN + ReLU ")]
    assert len(convs) == 8 and len(bns) == 6
    assert all(" [32, " in k for k in rows if k.startswith(("conv ", "BN ")))   # the step's shapes
    assert rows["**convolutions**"] == pytest.approx(sum(convs), abs=0.08)
    assert rows["**BN + ReLU**"] == pytest.approx(sum(bns), abs=0.08)
    floor = next(v for k, v in rows.items() if k.startswith("**floor of the step** (their sum"))
    assert floor == pytest.approx(
        rows["**convolutions**"] + rows["**BN + ReLU**"], abs=0.08)


@pytest.mark.slow
def test_kept_memory_benchmark_runs_end_to_end(tmp_path):
    write_fake_mnist(tmp_path / "mnist", n_train=256, n_test=32)
    text = run_bench("kept_memory.py", "--data-dir", str(tmp_path / "mnist"), "--steps", "3", "--batch-size", "64",
                     "--pairs", "1")
    assert "pair 1: glibc's default" in text and "kept" in text
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert "[on]" in text   # the worker with MNISTKIT_KEEP_MEMORY=1 kept memory
    assert "backend torch, medians of 1 pairs" in text and "(kept faster in " in text   # conftest: no kernel
