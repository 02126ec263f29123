import os

import pytest

# Tests must behave the same on any terminal: no colour, a fixed width.
os.environ.setdefault("NO_COLOR", "1")
os.environ.setdefault("COLUMNS", "200")


@pytest.fixture
def runner():
    from typer.testing import CliRunner

    return CliRunner()
