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
