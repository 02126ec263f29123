"""summarize on models that are not a plain nn.Sequential (issue 27): functional ops in ``forward``
are rows with their mult-adds, an op with no rule is named, receptive fields follow the course's
formula through residual adds and branches (issue 36), a model that fails on a digit is one clear
error, and a summary prints."""

import io
import re

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mnistkit.errors import UsageError
from mnistkit.models import get_model, list_models
from mnistkit.introspect.summary import summarize

# ops that FlopCounterMode counts (2 FLOPs per mult-add); it leaves out BN and elementwise ops
MATMUL_LIKE = {"conv2d", "conv_transpose2d", "linear", "matmul", "mm", "addmm", "bmm"}


def rows_by_name(summary):
    return {layer.name: layer for layer in summary.layers}


class Residual(nn.Module):
    """stem -> body (two 3x3) + shortcut (1x1, called last, added in place) -> mean -> linear."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
        self.short = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        out = self.body(x)
        out += self.short(x)
        return self.head(out.mean((2, 3)))


class TwoBranches(nn.Module):
    """A 7x7 and a 3x3 branch joined by a cat (the small one runs last), a 3x3 on top, GAP, FC."""

    def __init__(self):
        super().__init__()
        self.big = nn.Conv2d(1, 4, 7, padding=3)
        self.small = nn.Conv2d(1, 4, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.cat([self.big(x), self.small(x)], 1)
        return self.fc(torch.flatten(self.gap(self.mix(x)), 1))


class Functional(nn.Module):
    """No submodules at all: its own weights through F.conv2d, F.max_pool2d, x.view and @."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.b = nn.Parameter(torch.zeros(8))
        self.fc = nn.Parameter(torch.randn(8 * 14 * 14, 10))

    def forward(self, x):
        x = F.max_pool2d(F.relu(F.conv2d(x, self.w, self.b, padding=1)), 2)
        return x.view(x.size(0), -1) @ self.fc


class StridedLinear(nn.Module):
    """A strided functional conv, then F.linear with its own weight and bias."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 1, 3, 3))
        self.fc_w = nn.Parameter(torch.randn(10, 6 * 14 * 14))
        self.fc_b = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        x = F.conv2d(x, self.w, stride=2, padding=1)
        return F.linear(torch.flatten(x, 1), self.fc_w, self.fc_b)


class Shifted(nn.Module):
    """Two crops of one map, two pixels apart, added: each unit sees 3 + 2 pixels. Its conv's weights
    are negative, so the ReLU after it is dead at every position (its real gradient is zero)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        nn.init.constant_(self.conv.weight, -1.0)
        nn.init.constant_(self.conv.bias, -1.0)

    def forward(self, x):
        y = F.relu(self.conv(x))
        return y[:, :, 2:, 2:] + y[:, :, :-2, :-2]


class PoolChain(nn.Module):
    """conv 3x3 -> functional max-pool 2 -> conv 3x3: a max-pool routes a gradient to one element."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        return self.b(F.max_pool2d(self.a(x), 2))


class Einsum(nn.Module):
    """A leaf module type with no counting rule that does compute."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(784, 10))

    def forward(self, x):
        return torch.einsum("bi,ij->bj", x, self.w)


class EinsumNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.flat = nn.Flatten()
        self.mix = Einsum()

    def forward(self, x):
        x = self.flat(x)
        return self.mix(x) + self.mix(x)


USER_MODELS = [Residual, TwoBranches, Functional, StridedLinear]


def flop_counter_flops(model):
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, 1, 28, 28))
    return counter.get_total_flops()


@pytest.mark.parametrize("build", [*(lambda n=n: get_model(n) for n in list_models()), *USER_MODELS],
                         ids=[*list_models(), *(m.__name__ for m in USER_MODELS)])
def test_conv_and_matmul_mult_adds_are_half_the_flop_counters_flops(build):
    model = build()
    s = summarize(model)
    matmul_like = sum(v for layer in s.layers for op, v in layer.ops.items() if op in MATMUL_LIKE)
    assert matmul_like > 0
    assert 2 * matmul_like == flop_counter_flops(model)
    assert s.uncounted == [] and s.output_shape == [1, 10]


def test_functional_ops_are_rows_with_shapes_params_and_mult_adds():
    model = Functional()
    s = summarize(model)
    assert [(layer.name, layer.type) for layer in s.layers] == [
        ("forward: conv2d", "conv2d"), ("forward: relu", "relu"), ("forward: max_pool2d", "max_pool2d"),
        ("forward: view", "view"), ("forward: matmul", "matmul")]
    conv, relu, pool, view, mm = s.layers
    assert (conv.kernel, conv.stride, conv.padding, conv.output_shape) == ([3, 3], [1, 1], [1, 1], [1, 8, 28, 28])
    assert conv.params == 80 and conv.mult_adds == 8 * 28 * 28 * 9
    assert (pool.kernel, pool.stride, pool.output_shape) == ([2, 2], [2, 2], [1, 8, 14, 14])
    assert relu.mult_adds == pool.mult_adds == view.mult_adds == 0
    assert mm.params == 1568 * 10 and mm.mult_adds == 1568 * 10
    assert s.trainable_params == sum(p.numel() for p in model.parameters()) == sum(layer.params for layer in s.layers)
    assert s.mult_adds == conv.mult_adds + mm.mult_adds
    # the matmul on the flattened 14x14 map is one 14x14 window: 4 + 13 * 2 = 30 (issue 36: not clipped to 28)
    assert [(layer.rf, layer.jump, layer.rf_global) for layer in s.layers] == [
        (3, 1, False), (3, 1, False), (4, 2, False), (4, 2, False), (30, 28, True)]
    assert s.fc_head and not s.gap_head


def test_a_strided_functional_conv_has_its_jump_and_f_linear_its_mult_adds():
    s = summarize(StridedLinear())
    rows = rows_by_name(s)
    conv = rows["forward: conv2d"]
    assert (conv.stride, conv.rf, conv.jump, conv.output_shape) == ([2, 2], 3, 2, [1, 6, 14, 14])
    assert rows["forward: linear"].mult_adds == 10 * 6 * 14 * 14 and rows["forward: linear"].params == 11_770


def test_residual_block_rows_and_receptive_fields():
    s = summarize(Residual())
    rows = rows_by_name(s)
    assert [layer.name for layer in s.layers] == [
        "stem", "forward: relu", "body.0", "body.1", "body.2", "short", "forward: add", "forward: mean", "head"]
    # stem 3; body 3+2=5, 5+2=7; the 1x1 shortcut sees the stem's 3; the sum sees the larger branch
    assert [(rows[n].rf, rows[n].jump) for n in ("stem", "body.0", "body.2", "short", "forward: add")] == [
        (3, 1), (5, 1), (7, 1), (3, 1), (7, 1)]
    assert rows["forward: add"].mult_adds == 4 * 28 * 28  # one per output element
    assert rows["forward: mean"].rf_global and rows["head"].rf_global
    assert (s.rf, s.rf_global, s.gap_head, s.fc_head) == (7, True, True, True)


def test_two_branch_cat_sees_through_its_larger_branch():
    s = summarize(TwoBranches())
    rows = rows_by_name(s)
    assert [(rows[n].rf, rows[n].jump) for n in ("big", "small", "forward: cat", "mix")] == [
        (7, 1), (3, 1), (7, 1), (9, 1)]
    assert rows["forward: cat"].output_shape == [1, 8, 28, 28] and rows["forward: cat"].mult_adds == 0
    assert rows["gap"].rf_global and s.rf == 9


def test_the_formula_knows_windows_not_crops_and_no_weight_changes_it():
    # issue 36: the course's formula, not the gradient pass: the sum of two crops takes the larger
    # input's RF (3; the unit depends on a 5x5 patch, a limit the docs state), dead ReLU or not
    rows = rows_by_name(summarize(Shifted()))
    assert rows["conv"].rf == 3 and rows["forward: relu"].rf == 3
    assert rows["forward: add"].rf == 3 and rows["forward: add"].jump == 1


def test_a_functional_max_pool_does_not_shrink_the_receptive_field():
    s = summarize(PoolChain())
    assert [(layer.name, layer.rf, layer.jump) for layer in s.layers] == [
        ("a", 3, 1), ("forward: max_pool2d", 4, 2), ("b", 8, 2)]


# figures from before issue 27 (the layer recurrence, module rules): they must not move
REGISTERED = {
    "I0": (3_150_112, "3/1 3/1 5/1 5/1 6/2 10/2 10/2 12/4 12/4 12/4 12/4 g"),
    "I1": (3_548_776, "3/1 3/1 3/1 5/1 5/1 5/1 6/2 6/2 6/2 10/2 10/2 10/2 14/2 14/2 14/2 16/4 16/4 16/4 16/4 g"),
    "I2": (3_532_900, "3/1 3/1 3/1 5/1 5/1 5/1 6/2 6/2 6/2 10/2 10/2 10/2 14/2 14/2 14/2 16/4 16/4 16/4 16/4 g"),
    "I3": (2_179_632, "3/1 3/1 3/1 5/1 5/1 5/1 5/1 6/2 6/2 10/2 10/2 10/2 14/2 14/2 14/2 18/2 18/2 18/2 18/2 "
                      "22/2 22/2 22/2 g g g"),
    "I4": (690_004, "3/1 3/1 3/1 5/1 5/1 5/1 5/1 6/2 6/2 10/2 10/2 10/2 14/2 14/2 14/2 14/2 18/2 18/2 18/2 g g g"),
    # I5 (0.11): its YAML twin's summary gives the same mult-adds; receptive fields 3, 5, 6 (the pooling), then
    # +4 per 3x3 depthwise conv at jump 2: 10, 14, 18, 22
    "I5": (695_264, "3/1 3/1 3/1 5/1 5/1 5/1 5/1 6/2 6/2 " + " ".join(f"{rf}/2" for rf in [10] * 6 + [14] * 7
                                                                    + [18] * 6 + [22] * 6) + " g g g"),
}


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_registered_models_keep_their_figures(name):
    s = summarize(get_model(name))
    mult_adds, rfs = REGISTERED[name]
    assert s.mult_adds == mult_adds
    assert " ".join("g" if l.rf_global else f"{l.rf}/{l.jump}" for l in s.layers) == rfs
    assert all(l.type[0].isupper() for l in s.layers)  # module rows only: a Sequential has no op of its own
    assert s.uncounted == []  # ReLU, Dropout, MaxPool, Flatten, GAP are known zero-cost layers


def test_an_op_with_no_rule_is_named_never_silently_zero():
    s = summarize(EinsumNet())
    mix = [layer for layer in s.layers if layer.name == "mix"]
    assert len(mix) == 2 and all(l.type == "Einsum" and l.uncounted == ["einsum"] for l in mix)
    assert mix[0].params == 7840 and mix[1].shared_with == mix[0].index
    assert s.uncounted == ["einsum"] and s.uncounted_calls == {"einsum": 2}
    totals = s.to_dict()["totals"]
    assert totals["uncounted"] == ["einsum"] and totals["uncounted_calls"] == {"einsum": 2}
    assert s.mult_adds == 10  # the add is counted; the einsums are not, and are said to be not
    assert "not counted: einsum (2 calls)" in str(s)


def test_a_leaf_module_without_a_rule_is_counted_from_the_ops_it_calls():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.ones(1, 3, 1, 1))

        def forward(self, x):
            return F.linear(x * self.g, torch.ones(5, 28))

    s = summarize(nn.Sequential(nn.Conv2d(1, 3, 1), Scale()))
    scale = s.layers[1]
    assert scale.type == "Scale" and scale.ops == {"mul": 3 * 28 * 28, "linear": 3 * 28 * 5 * 28}
    assert scale.mult_adds == 3 * 28 * 28 + 3 * 28 * 5 * 28 and s.uncounted == []


def test_a_model_that_fails_on_a_digit_is_one_clear_error():
    class WrongHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 9)
            self.fc = nn.Linear(500, 10)

        def forward(self, x):
            return self.fc(self.conv(x).flatten(1))

    model = WrongHead().train()
    with pytest.raises(UsageError) as caught:
        summarize(model)
    message = str(caught.value)
    assert len(message.splitlines()) == 1
    assert message.startswith("WrongHead fails on a [1, 1, 28, 28] input (RuntimeError: mat1 and mat2 shapes")
    assert "1x28x28" in message and model.training  # and the model is left as it was


def test_an_output_that_is_not_ten_logits_is_reported_not_refused():
    s = summarize(nn.Sequential(nn.Flatten(), nn.Linear(784, 5)))
    assert s.output_shape == [1, 5] and s.to_dict()["output_shape"] == [1, 5]
    assert summarize(get_model("I3")).output_shape == [1, 10]


def test_a_summary_prints_as_its_table():
    s = summarize(get_model("I3"), name="I3")
    text = str(s)
    assert "\x1b" not in text  # plain text, no colour
    for expected in ("c1.conv", "c6.conv", "classifier", "22 (j2)", "global", "Parameters: 14,500",
                     "Mult-adds per image: 2,179,632", "Budget: 14,500 trainable params < 20,000: PASS"):
        assert expected in text, expected
    assert max(len(line) for line in text.splitlines()) <= 120
    out = io.StringIO()
    Console(file=out, width=120).print(s)  # __rich_console__: the same table
    assert "c6.conv" in out.getvalue() and "Budget" in out.getvalue()


def test_to_markdown_is_a_github_table_with_totals_and_the_budget():
    s = summarize(get_model("I1"), name="I1")
    md = s.to_markdown()
    lines = md.splitlines()
    table = [line for line in lines if line.startswith("|")]
    assert table[0] == "| # | Layer | Type | Kernel | Output | Params | Mult-adds | RF |"
    assert re.fullmatch(r"\|(:?-+:?\|){8}", table[1])
    assert len(table) == 2 + len(s.layers)
    assert {row.count("|") for row in table} == {9}
    fc = next(row for row in table if "| fc |" in row)
    assert "| Linear |" in fc and "| 9,810 |" in fc and "| 40 (global) |" in fc  # 16 + (7 - 1) * 4 on the 7x7 map
    assert "| 3x3/1/1 |" in table[2] and "| 3 (j1) |" in table[2]
    assert "20,978 parameters" in md and "3,548,776 mult-adds per image" in md
    assert "**Budget:** 20,978 trainable params < 20,000: FAIL (978 over)" in md
