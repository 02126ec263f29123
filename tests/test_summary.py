import pytest
import torch
from torch import nn

from mnistkit.introspect.summary import summarize
from mnistkit.models import get_model, list_models


def rows_by_name(summary):
    return {layer.name: layer for layer in summary.layers}


def test_i1_receptive_field_matches_hand_computation():
    # r_out = r_in + (k-1) * j_in, j_out = j_in * s; start r=1, j=1
    expected = {
        "net.c1.conv": (3, 1),   # 1 + 2*1
        "net.c2.conv": (5, 1),   # 3 + 2*1
        "net.pool1": (6, 2),     # 5 + 1*1, jump 2
        "net.t1": (6, 2),        # 1x1 conv changes nothing
        "net.c3.conv": (10, 2),  # 6 + 2*2
        "net.c4.conv": (14, 2),  # 10 + 2*2
        "net.pool2": (16, 4),    # 14 + 1*2, jump 4
        "net.t2": (16, 4),
        "net.flatten": (16, 4),
    }
    rows = rows_by_name(summarize(get_model("I1")))
    for name, (rf, jump) in expected.items():
        assert (rows[name].rf, rows[name].jump, rows[name].rf_global) == (rf, jump, False), name
    assert rows["net.fc"].rf_global  # after the flatten: the whole image


def test_i3_receptive_field_and_global_head():
    s = summarize(get_model("I3"))
    rows = rows_by_name(s)
    assert (rows["net.c6.conv"].rf, rows["net.c6.conv"].jump) == (22, 2)
    assert rows["net.gap"].rf_global and rows["net.classifier"].rf_global
    assert (s.rf, s.jump, s.rf_global) == (22, 2, True)
    assert s.gap_head and not s.fc_head


def test_dilation_and_stride_in_the_recurrence():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.Conv2d(2, 2, 3, dilation=2))
    s = summarize(model, input_size=(1, 1, 28, 28))
    assert [(layer.rf, layer.jump) for layer in s.layers] == [(3, 2), (3 + 4 * 2, 2)]


@pytest.mark.parametrize("name", ["I0", "I1", "I2", "I3"])
def test_totals_add_up(name):
    model = get_model(name)
    s = summarize(model)
    assert s.trainable_params == sum(p.numel() for p in model.parameters())
    assert sum(layer.params for layer in s.layers) == s.total_params
    assert s.buffers == sum(b.numel() for b in model.buffers())
    assert s.param_bytes == 4 * s.total_params
    assert s.mult_adds == sum(layer.mult_adds for layer in s.layers)


def test_bn_buffers_counted_separately_from_parameters():
    s = summarize(get_model("I1"))
    # four BatchNorm2d layers (16, 16, 24, 24 channels): mean + var per channel + a step counter each
    assert s.buffers == 2 * (16 + 16 + 24 + 24) + 4
    bn = [layer for layer in s.layers if layer.type == "BatchNorm2d"]
    assert [layer.params for layer in bn] == [32, 32, 48, 48]


def test_mult_adds_of_conv_and_linear():
    s = summarize(get_model("I1"))
    rows = rows_by_name(s)
    assert rows["net.c2.conv"].mult_adds == 16 * 28 * 28 * (16 * 3 * 3)
    assert rows["net.fc"].mult_adds == 10 * 980
    assert rows["net.c2.relu"].mult_adds == 0


class Reuse(nn.Module):
    """One conv applied twice, and two linear layers with tied weights."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        x = self.conv(self.conv(self.stem(x)))
        return self.b(self.a(self.flat(self.pool(x))))


def test_shared_parameters_counted_once():
    model = Reuse()
    s = summarize(model, input_size=(2, 1, 8, 8))
    unique = sum(p.numel() for p in model.parameters())
    assert unique == 40 + 148 + 16
    assert s.trainable_params == unique
    assert sum(layer.params for layer in s.layers) == unique
    convs = [layer for layer in s.layers if layer.name == "conv"]
    assert len(convs) == 2 and convs[0].params == 148 and convs[1].params == 0
    assert convs[1].shared_with == convs[0].index
    # the second call still costs compute, and grows the receptive field
    assert convs[0].mult_adds == convs[1].mult_adds == 4 * 8 * 8 * 36
    assert (convs[0].rf, convs[1].rf) == (5, 7)
    assert [layer.params for layer in s.layers if layer.name in "ab"] == [16, 0]


def test_frozen_parameters_are_non_trainable():
    model = get_model("I3")
    for p in model.net.c1.parameters():
        p.requires_grad_(False)
    s = summarize(model)
    assert s.non_trainable_params == 90 + 20
    assert s.trainable_params == 14_500 - 110


def test_summarize_leaves_training_mode_and_statistics_alone():
    model = get_model("I1").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summarize(model)
    assert model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_budget_verdicts():
    assert summarize(get_model("I3")).within_budget
    assert not summarize(get_model("I1")).within_budget  # 20,978 is over 20,000
    assert summarize(get_model("I1"), budget=21_000).within_budget
    assert [summarize(get_model(n)).has_batchnorm for n in list_models()] == [False, True, True, True, True, True]
