"""The summary speaks the course's language (issue 36, goal 6): the receptive field by the formula
r_out = r_in + (k - 1) * d * j_in, j_out = j_in * s (never clipped at the 28x28 image; the largest
branch where paths merge), ``summary MODEL --rf`` prints the course's table (``--format markdown``
to paste into a README), Dropout shows its p, a pooling of the whole 7x7 map is a GAP head, a class
without a docstring is not described by nn.Module's, and the totals say how many parameters sit in
layers forward never calls. The models are written the way course notebooks write them; every
expected figure is computed by hand below, as a literal."""

import json

import pytest

from mnistkit.cli import app

MODELS_PY = '''
import torch
import torch.nn.functional as F
from torch import nn


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.block1 = nn.Sequential(
            nn.Conv2d(1, 8, 5, padding=2), nn.ReLU(), nn.BatchNorm2d(8),
            nn.Conv2d(8, 8, 5, padding=2), nn.ReLU(), nn.BatchNorm2d(8),
        )
        self.pool1 = nn.MaxPool2d(2)
        self.block2 = nn.Sequential(nn.Conv2d(8, 16, 5, padding=2), nn.ReLU(), nn.BatchNorm2d(16))
        self.pool2 = nn.MaxPool2d(2)
        self.block3 = nn.Sequential(nn.Conv2d(16, 10, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(10))
        self.drop = nn.Dropout(0.1)
        self.gap = nn.AvgPool2d(7)
        self.fc = nn.Linear(10, 10)   # left over from an FC head: forward no longer calls it

    def forward(self, x):
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.gap(self.drop(self.block3(x)))
        x = x.view(x.size(0), -1)
        return F.log_softmax(x, dim=1)


class Residual(nn.Module):
    """A residual block whose 1x1 shortcut comes first in the sum."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8))
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.BatchNorm2d(8),
                                  nn.Conv2d(8, 8, 3, padding=1))
        self.short = nn.Conv2d(8, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.conv = nn.Conv2d(8, 10, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(self.short(x) + self.body(x))
        x = self.conv(self.pool(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return F.log_softmax(torch.flatten(x, 1), dim=1)


class Dilated(nn.Module):
    """A strided conv, a dilated one, a 1x1, the mean over the map."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2)
        self.conv3 = nn.Conv2d(8, 10, 1)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.dropout(F.relu(self.conv2(x)), 0.25, training=self.training)
        return F.log_softmax(self.conv3(x).mean((2, 3)), dim=1)


class FunctionalPool(nn.Module):
    """Two pools to 7x7, then F.avg_pool2d(x, 7)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 10, 3, padding=1)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.log_softmax(F.avg_pool2d(x, 7).view(-1, 10), dim=1)


class FcHead(nn.Module):
    """A 2x2 max-pooling that leaves 3x3 of a 7x7 map, then a Linear: no GAP head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=4, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4 * 3 * 3, 10)

    def forward(self, x):
        x = self.pool(F.relu(self.conv(x)))
        return F.log_softmax(self.fc(x.view(x.size(0), -1)), dim=1)


class Base(nn.Module):
    """My base class for every model."""


class Child(Base):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(784, 10)

    def forward(self, x):
        return self.fc(x.view(x.size(0), -1))
'''

CHANGELOG = '''
constraints: {max_params: 20000, batchnorm: true, dropout: true, gap_head: true, max_epochs: 20, min_test_acc: 99.4}
iterations:
  - id: C1
    model: models.py:Chain
    changes: 5x5 convs and an AvgPool2d(7) head
    target: 99.4%
    analysis: not trained yet
    recipe: {epochs: 1}
'''

COURSE_COLUMNS = ("layer", "n_in", "n_out", "k", "p", "s", "r_in", "r_out", "j_in", "j_out")


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "models.py").write_text(MODELS_PY)
    (tmp_path / "experiments.yaml").write_text(CHANGELOG)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def invoke(runner, *args):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def summary_json(runner, reference):
    return json.loads(invoke(runner, "summary", reference, "--json"))


def course_rows(data):
    return [tuple(row[c] for c in COURSE_COLUMNS) for row in data["receptive_field"]]


def test_rf_of_a_chain_of_5x5_convs_and_pools_is_the_hand_computed_table(runner, project):
    data = json.loads(invoke(runner, "summary", "models.py:Chain", "--rf", "--json"))
    # by hand, from r = 1, j = 1 on the 28x28 input:
    assert course_rows(data) == [
        ("block1.0", 28, 28, 5, 2, 1, 1, 5, 1, 1),      # 1 + 4*1
        ("block1.3", 28, 28, 5, 2, 1, 5, 9, 1, 1),      # 5 + 4*1
        ("pool1", 28, 14, 2, 0, 2, 9, 10, 1, 2),        # 9 + 1*1, j 1*2
        ("block2.0", 14, 14, 5, 2, 1, 10, 18, 2, 2),    # 10 + 4*2
        ("pool2", 14, 7, 2, 0, 2, 18, 20, 2, 4),        # 18 + 1*2, j 2*2
        ("block3.0", 7, 7, 3, 1, 1, 20, 28, 4, 4),      # 20 + 2*4: the whole 28x28 image
        ("gap", 7, 1, 7, 0, 7, 28, 52, 4, 28),          # 28 + 6*4: not clipped at the image
    ]
    assert [row["global"] for row in data["receptive_field"]] == [False] * 5 + [True, True]
    layers = {layer["name"]: layer for layer in data["layers"]}
    assert (layers["block3.0"]["rf"], layers["block3.0"]["jump"], layers["block3.0"]["rf_global"]) == (28, 4, True)
    assert (layers["pool2"]["rf"], layers["pool2"]["rf_global"]) == (20, False)
    assert (layers["gap"]["rf_in"], layers["gap"]["rf"], layers["gap"]["jump"]) == (28, 52, 28)
    assert layers["gap"]["window"] == {"k": 7, "s": 7, "p": 0, "d": 1, "n_in": 7, "n_out": 1}
    totals = data["totals"]
    assert (totals["rf"], totals["jump"], totals["rf_global"], totals["rf_output"]) == (28, 4, True, 52)

    table = invoke(runner, "summary", "models.py:Chain", "--rf")
    assert "receptive field by the course's formula" in table
    header = next(line for line in table.splitlines() if "r_out" in line)
    assert [cell.strip() for cell in header.strip("┃│ ").split("┃")] == list(COURSE_COLUMNS)
    gap = next(line for line in table.splitlines() if line.strip("│ ").startswith("gap"))
    assert gap.replace("│", " ").split() == ["gap", "7", "1", "7", "0", "7", "28", "52", "4", "28"]
    assert "Global from block3.0 on" in " ".join(table.split())


def test_rf_as_markdown_to_paste_into_a_readme(runner, project):
    md = invoke(runner, "summary", "models.py:Chain", "--rf", "--format", "markdown")
    assert md.splitlines()[:9] == [
        "| layer | n_in | n_out | k | p | s | r_in | r_out | j_in | j_out |",
        "|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        "| block1.0 | 28 | 28 | 5 | 2 | 1 | 1 | 5 | 1 | 1 |",
        "| block1.3 | 28 | 28 | 5 | 2 | 1 | 5 | 9 | 1 | 1 |",
        "| pool1 | 28 | 14 | 2 | 0 | 2 | 9 | 10 | 1 | 2 |",
        "| block2.0 | 14 | 14 | 5 | 2 | 1 | 10 | 18 | 2 | 2 |",
        "| pool2 | 14 | 7 | 2 | 0 | 2 | 18 | 20 | 2 | 4 |",
        "| block3.0 | 7 | 7 | 3 | 1 | 1 | 20 | 28 | 4 | 4 |",
        "| gap | 7 | 1 | 7 | 0 | 7 | 28 | 52 | 4 | 28 |",
    ]
    assert "\x1b" not in md and "┃" not in md
    assert invoke(runner, "summary", "models.py:Chain", "--rf", "-f", "markdown") == md
    # without --rf, --format markdown is the whole layer table
    full = invoke(runner, "summary", "models.py:Chain", "--format", "markdown")
    assert full.startswith("| # | Layer | Type | Kernel | Output | Params | Mult-adds | RF |")
    assert "| 52 (global) |" in full


def test_where_paths_merge_r_in_is_the_largest_branch(runner, project):
    data = summary_json(runner, "models.py:Residual")
    assert course_rows(data) == [
        ("stem.0", 28, 28, 3, 1, 1, 1, 3, 1, 1),
        ("short", 28, 28, 1, 0, 1, 3, 3, 1, 1),         # the 1x1 shortcut sees the stem's 3
        ("body.0", 28, 28, 3, 1, 1, 3, 5, 1, 1),
        ("body.3", 28, 28, 3, 1, 1, 5, 7, 1, 1),
        ("pool", 28, 14, 2, 0, 2, 7, 8, 1, 2),          # short + body: max(3, 7) = 7, not the first input's 3
        ("conv", 14, 14, 3, 1, 1, 8, 12, 2, 2),
        ("forward: adaptive_avg_pool2d", 14, 1, 14, 0, 14, 12, 38, 2, 28),  # the whole 14x14 map: 12 + 13*2
    ]
    add = next(layer for layer in data["layers"] if layer["name"] == "forward: add")
    assert (add["rf_in"], add["rf"], add["window"]) == (7, 7, None)
    assert data["uses"]["gap_head"] and not data["uses"]["fc_head"]


def test_dilation_is_in_the_formula_and_gets_its_column(runner, project):
    data = summary_json(runner, "models.py:Dilated")
    assert [(row["layer"], row["k"], row["d"], row["r_in"], row["r_out"], row["j_in"], row["j_out"])
            for row in data["receptive_field"]] == [
        ("conv1", 3, 1, 1, 3, 1, 2),          # stride 2
        ("conv2", 3, 2, 3, 11, 2, 2),         # 3 + (3 - 1) * 2 * 2
        ("conv3", 1, 1, 11, 11, 2, 2),
        ("forward: mean", 14, 1, 11, 37, 2, 28),  # x.mean((2, 3)) of the 14x14 map: 11 + 13*2
    ]
    md = invoke(runner, "summary", "models.py:Dilated", "--rf", "--format", "markdown").splitlines()
    assert md[0] == "| layer | n_in | n_out | k | p | s | d | r_in | r_out | j_in | j_out |"
    assert md[3] == "| conv2 | 14 | 14 | 3 | 2 | 1 | 2 | 3 | 11 | 2 | 2 |"


def test_dropout_shows_its_p(runner, project):
    chain = invoke(runner, "summary", "models.py:Chain")
    assert "Dropout(p=0.1)" in chain
    dilated = summary_json(runner, "models.py:Dilated")
    assert [(layer["type"], layer["label"]) for layer in dilated["layers"] if layer["type"] == "dropout"] == [
        ("dropout", "dropout(p=0.25)")]   # the type stays the op's (or module's class) name
    assert dilated["uses"]["dropout"]
    assert "| dropout(p=0.25) |" in invoke(runner, "summary", "models.py:Dilated", "--format", "markdown")


def test_a_pooling_of_the_whole_map_is_a_gap_head(runner, project):
    heads = {reference: (data["uses"]["gap_head"], data["uses"]["fc_head"], data["head"])
             for reference in ("models.py:Chain", "models.py:FunctionalPool", "models.py:Residual",
                               "models.py:Dilated", "models.py:FcHead")
             for data in [summary_json(runner, reference)]}
    assert heads == {
        "models.py:Chain": (True, False, "GAP"),           # nn.AvgPool2d(7) on the 7x7 map (its Linear is never called)
        "models.py:FunctionalPool": (True, False, "GAP"),  # F.avg_pool2d(x, 7) on the 7x7 map
        "models.py:Residual": (True, False, "GAP"),        # F.adaptive_avg_pool2d(x, 1)
        "models.py:Dilated": (True, False, "GAP"),         # x.mean((2, 3))
        "models.py:FcHead": (False, True, "FC"),           # a 2x2 max-pooling of a 7x7 map, then a Linear
    }


def test_an_avgpool7_head_passes_the_gap_head_check(runner, project):
    result = runner.invoke(app, ["check", "--static", "--iteration", "C1", "--json"])
    cases = {case["check"]: case for case in json.loads(result.stdout)["cases"]}
    assert cases["gap_head"]["passed"], cases["gap_head"]
    assert "Uses: BatchNorm yes, Dropout yes, GAP head yes, FC head no" in invoke(runner, "summary", "C1")


def test_a_class_without_a_docstring_is_not_described_by_nn_modules(runner, project):
    # none of its own: Chain's is its change-log entry's changes (it is iteration C1), Child's nothing,
    # though its parent has one
    for reference, described in (("models.py:Chain", "5x5 convs and an AvgPool2d(7) head"), ("models.py:Child", "")):
        data = summary_json(runner, reference)
        assert data["description"] == described and data["source"].get("description", "") == "", reference
        first = invoke(runner, "summary", reference).splitlines()[0]
        assert "Base class" not in first and "My base class" not in first
        assert first.startswith(reference.split(":")[1])
    assert summary_json(runner, "models.py:Residual")["description"] == \
        "A residual block whose 1x1 shortcut comes first in the sum."


def test_the_totals_say_how_many_parameters_forward_never_calls(runner, project):
    data = summary_json(runner, "models.py:Chain")
    # convs 208 + 1,608 + 3,216 + 1,450, BatchNorms 16 + 16 + 32 + 20, the Linear 110 (never called)
    assert data["totals"]["params"] == 6_676 and data["totals"]["uncalled_params"] == 110
    assert [(layer["name"], layer["type"], layer["params"]) for layer in data["layers"] if "not called" in layer["type"]] \
        == [("fc", "Linear (not called)", 110)]
    text = invoke(runner, "summary", "models.py:Chain")
    assert "Parameters: 6,676, of which 110 in layers forward never calls" in text
    md = invoke(runner, "summary", "models.py:Chain", "--format", "markdown")
    assert "**Totals:** 6,676 parameters, of which 110 in layers forward never calls (6,676 trainable)" in md
    assert summary_json(runner, "models.py:Residual")["totals"]["uncalled_params"] == 0
    assert "never calls" not in invoke(runner, "summary", "models.py:Residual")


def test_rf_and_format_need_a_model_and_agree_with_json(runner, project):
    for args, needle in ((["summary", "--rf"], "describe one model: name it"),
                         (["summary", "--format", "markdown"], "describe one model: name it"),
                         (["summary", "models.py:Chain", "--rf", "--json", "--format", "markdown"], "disagree"),
                         (["summary", "models.py:Chain", "--rf", "--format", "csv"], "choose one of: table, markdown, json")):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and result.stderr.startswith("error: "), (args, result.output)
        assert needle in result.stderr, (args, result.stderr)
    assert json.loads(invoke(runner, "summary", "--format", "json"))["models"]  # the registered models, as --json
