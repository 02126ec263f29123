import os

import pytest

# Tests must behave the same on any terminal: no colour, a fixed width.
os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("COLUMNS", "200")
# The core tests pin the plain backend: backend auto resolves to torch (PyTorch's own ops) in this
# process and in every process a test starts. tests/test_backends.py turns the kernel back on.
os.environ["MNISTKIT_FUSED"] = "0"
# Which model files the user has named (mnistkit/usermodels/trust.py) is recorded in the user's state folder:
# never the real one in tests, one fresh folder per test session (and its child processes)
if "MNISTKIT_TEST_STATE" not in os.environ:
    import tempfile

    os.environ["MNISTKIT_TEST_STATE"] = os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="mnistkit-state-")


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()


@pytest.fixture(autouse=True)
def _quick_tests_neither_train_nor_start_processes(request, monkeypatch):
    """A test not marked slow (the quick loop, ``make quick``) may not train a model or start a
    process: it fails here naming what it did, so that it gets the mark and the loop stays quick."""
    if request.node.get_closest_marker("slow") is not None:
        return
    import subprocess

    from mnistkit.training import loop

    def refuse(what):
        def call(*args, **kwargs):
            pytest.fail(f"a test not marked slow {what}: mark it @pytest.mark.slow", pytrace=False)
        return call

    monkeypatch.setattr(loop, "train_step", refuse("trains a model (a training step)"))   # train, resume, lr-find
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse("starts a process"))
