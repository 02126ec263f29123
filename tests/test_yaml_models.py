"""A model architecture as data (mnistkit/models/architecture.py): exact against the registered I3,
every error one line naming the file, the line and the layer, and nothing allocated or run
before the file has been checked by arithmetic."""

import hashlib
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from mnistkit.models.architecture import LAYER_TYPES, MAX_PARAMS, YamlNet, load_architecture, parse_architecture
from mnistkit.errors import UsageError
from mnistkit.models import get_model

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "architectures"
HEAD = "  - gap\n  - conv: {channels: 10, kernel: 1}\n  - flatten\n"


def write(tmp_path: Path, body: str, name: str = "s1.yaml") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def refused(tmp_path: Path, body: str) -> str:
    """The one-line message a file of ``body`` is refused with."""
    path = write(tmp_path, body)
    with pytest.raises(UsageError) as info:
        load_architecture(path)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{path}"), message
    assert info.value.exit_code == 2
    return message


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# --------------------------------------------------------------------------- the examples


def test_i3_yaml_is_exactly_the_registered_i3():
    arch = load_architecture(EXAMPLES / "i3.yaml")
    i3, mine = get_model("I3"), arch.build()
    assert arch.params == trainable(i3) == trainable(mine)
    torch.manual_seed(0)
    i3.train()
    i3(torch.randn(64, 1, 28, 28))          # running statistics that are not BN's defaults
    theirs, ours = i3.state_dict(), mine.state_dict()
    assert [v.shape for v in theirs.values()] == [v.shape for v in ours.values()]
    mine.load_state_dict(dict(zip(ours, theirs.values())))
    i3.eval(), mine.eval()
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), i3(x), rtol=0, atol=0)


def receptive_field(arch) -> int:
    """Pixels one unit sees just before the first global pooling (r += (k_eff - 1) * j, j *= s)."""
    r = j = 1
    for row in arch.layers:
        if row["type"] in ("gap", "flatten"):
            break
        k = row.get("dilation", 1) * (row.get("kernel", 1) - 1) + 1
        r, j = r + (k - 1) * j, j * row.get("stride", 1)
    return r


def test_s2_is_a_small_bn_dropout_gap_model():
    arch = load_architecture(EXAMPLES / "s2.yaml")
    model = arch.build()
    assert arch.params == trainable(model) < 20_000
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    kinds = [type(m) for m in model.net]
    assert nn.BatchNorm2d in kinds and nn.Dropout in kinds and nn.AdaptiveAvgPool2d in kinds
    assert receptive_field(arch) >= 20     # before the GAP, every unit sees at least 20x20 pixels
    assert receptive_field(load_architecture(EXAMPLES / "i3.yaml")) == 22   # the recurrence, checked on I3
    assert arch.description and "\n" not in arch.description


# --------------------------------------------------------------------------- the format


EVERY_KIND = """\
description: every layer type, every argument
layers:
  - conv: {channels: 8, kernel: 5, stride: 1, padding: 2, dilation: 1, groups: 1, bias: true}
  - batchnorm
  - relu
  - conv: {channels: 12, kernel: 3, stride: 2, dilation: 2, groups: 4, bias: false}
  - bn
  - relu
  - avgpool: {kernel: 3, stride: 1, padding: 1}
  - maxpool
  - transition: {channels: 6, bias: true}
  - dropout: 0.25
  - flatten
  - linear: {features: 32, bias: false}
  - relu
  - dropout
  - linear: 10
"""


def test_arithmetic_matches_the_built_model_for_every_layer_kind(tmp_path):
    arch = load_architecture(write(tmp_path, EVERY_KIND))
    model = arch.build(dropout=0.2)
    assert {row["type"] for row in arch.layers} == set(LAYER_TYPES) - {"gap"}
    assert arch.params == trainable(model)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert [m.p for m in model.net if isinstance(m, nn.Dropout)] == [0.25, 0.2]


def test_rows_are_resolved_with_pytorch_defaults_and_inferred_inputs():
    arch = parse_architecture("layers: [conv: 8, batchnorm, relu, maxpool, dropout, flatten, linear: 10]", "x")
    conv, bn, relu, pool, drop, flat, fc = arch.layers
    assert conv == {"type": "conv", "name": "conv1", "channels": 8, "kernel": 3, "stride": 1, "padding": 0,
                    "dilation": 1, "groups": 1, "bias": True, "in_channels": 1}
    assert bn == {"type": "bn", "name": "bn1", "channels": 8}
    assert pool == {"type": "maxpool", "name": "pool1", "kernel": 2, "stride": 2, "padding": 0}
    assert drop == {"type": "dropout", "name": "drop1", "p": None}
    assert fc == {"type": "linear", "name": "fc1", "features": 10, "bias": True, "in_features": 8 * 13 * 13}
    assert arch.description == "" and arch.params == 80 + 16 + 8 * 13 * 13 * 10 + 10


def test_an_anchor_reuses_a_layers_arguments():
    arch = parse_architecture("layers:\n  - conv: &c {channels: 8, bias: false}\n  - relu\n  - conv: *c\n" + HEAD, "x")
    assert arch.layers[0]["channels"] == arch.layers[2]["channels"] == 8 and not arch.layers[2]["bias"]
    assert arch.layers[2]["in_channels"] == 8 and arch.params == 72 + 576 + 90


def test_build_is_flat_named_and_deterministic():
    a, b = (load_architecture(EXAMPLES / "i3.yaml") for _ in range(2))
    one, two = a.build(), b.build()
    assert [(k, v.shape) for k, v in one.state_dict().items()] == [(k, v.shape) for k, v in two.state_dict().items()]
    assert list(one.state_dict())[:2] == ["net.conv1.weight", "net.bn1.weight"]
    assert all(not list(m.children()) for m in one.net)          # one flat nn.Sequential
    assert type(one).__name__ == "YamlNet" and type(one.net) is nn.Sequential
    layers = list(one.net)
    for n, m in enumerate(layers):                                # the fused backend's BN + ReLU pairs
        if isinstance(m, nn.BatchNorm2d):
            assert isinstance(layers[n + 1], nn.ReLU) and layers[n + 1].inplace
    assert isinstance(pickle.loads(pickle.dumps(one)), YamlNet)


def test_text_and_sha256_are_the_bytes_read(tmp_path):
    path = write(tmp_path, (EXAMPLES / "s2.yaml").read_text() + "# \u00e9t\u00e9\r\n")
    arch = load_architecture(path)
    assert arch.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert arch.text.encode("utf-8") == path.read_bytes() and arch.path == str(path)
    assert parse_architecture(arch.text, "copy").sha256 == arch.sha256
    assert parse_architecture(path.read_bytes(), "copy").sha256 == arch.sha256


def test_an_inplace_relu_never_changes_the_callers_input():
    model = parse_architecture("layers: [dropout, flatten, relu, relu, linear: 10, relu]", "x").build()
    x = torch.randn(2, 1, 28, 28)
    before = x.clone()
    for mode in (True, False):   # Dropout hands its input on unchanged in eval mode, Flatten a view
        model.train(mode)(x)
        assert torch.equal(x, before)
    assert [m.inplace for m in model.net if isinstance(m, nn.ReLU)] == [False, True, True]


# --------------------------------------------------------------------------- errors


BLOCK = "layers:\n  - conv: {channels: 8}\n  - bn\n  - relu\n"
ERRORS = [
    ("- conv: 8\n", None, "must be a mapping with 'layers'"),
    ("", None, "the file is empty"),
    ("description: x\n", None, "no 'layers'"),
    ("layers: relu\n", 1, "layers must be a non-empty list"),
    ("layers: []\n", 1, "layers must be a non-empty list"),
    ("model: I3\nlayers: [flatten, linear: 10]\n", 1, "unknown key 'model'; known keys: description, layers"),
    ("description: [a]\nlayers: [flatten, linear: 10]\n", 1, "description must be one line"),
    (BLOCK + "  - conv3d: 8\n", 5, "layers[3]: unknown layer 'conv3d' (did you mean conv?); known layers: avgpool, "
                                   "bn, conv, dropout, flatten, gap, linear, maxpool, relu, transition"),
    (BLOCK + "  - swish\n", 5, "layers[3]: unknown layer 'swish'; known layers: avgpool, bn, conv, dropout, "),
    (BLOCK + "  - Conv2d: 8\n", 5, "unknown layer 'Conv2d' (did you mean conv?)"),
    (BLOCK + "  - 3\n", 5, "layers[3] must be a layer such as relu"),
    (BLOCK + "  - conv: {channels: 8, kernal: 3}\n", 5, "layers[3] (conv): unknown argument 'kernal'; conv takes: "
                                                       "channels, kernel, stride, padding, dilation, groups, bias"),
    (BLOCK + "  - relu: {inplace: true}\n", 5, "layers[3] (relu): unknown argument 'inplace'; relu takes no arg"),
    (BLOCK + "  - bn: 8\n", 5, "layers[3] (bn): bn takes no arguments, not 8"),
    (BLOCK + "  - conv: {kernel: 3}\n", 5, "layers[3] (conv): conv needs channels"),
    (BLOCK + "  - conv:\n    channels: 8\n", 5, "layers[3] (conv): channels belongs to conv: indent it under"),
    (BLOCK + "  - relu\n    bn\n", 5, "layers[3]: unknown layer 'relu bn';"),
    (BLOCK + "  - {relu: null, bn: null}\n", 5, "layers[3] is one layer"),
    (BLOCK + "  - conv:\n      channels: 1000000\n", 6, "layers[3] (conv): channels must be a whole number from 1 "
                                                    "to 1024, not 1000000"),
    (BLOCK + "  - conv: 8.0\n", 5, "layers[3] (conv): channels must be a whole number from 1 to 1024, not 8.0"),
    (BLOCK + "  - conv: {channels: true}\n", 5, "channels must be a whole number from 1 to 1024, not True"),
    (BLOCK + "  - conv: {channels: 8, kernel: -1}\n", 5, "kernel must be a whole number from 1 to 28, not -1"),
    (BLOCK + "  - conv: {channels: 8, stride: 0}\n", 5, "stride must be a whole number from 1 to 28, not 0"),
    (BLOCK + "  - conv: {channels: 8, padding: 15}\n", 5, "padding must be a whole number from 0 to 14, not 15"),
    (BLOCK + "  - conv: {channels: 8, dilation: 99}\n", 5, "dilation must be a whole number from 1 to 14"),
    (BLOCK + "  - conv: {channels: 8, bias: 'no'}\n", 5, "bias must be true or false, not 'no'"),
    (BLOCK + "  - conv: {channels: 6, groups: 3}\n", 5, "layers[3] (conv): groups 3 must divide the in channels (8) "
                                                       "and the out channels (6)"),
    (BLOCK + "  - dropout: 1\n", 5, "layers[3] (dropout): dropout p must be a number from 0 to below 1, not 1"),
    (BLOCK + "  - dropout: {p: .nan}\n", 5, "dropout p must be a number from 0 to below 1, not nan"),
    (BLOCK + "  - maxpool: {kernel: 2, padding: 2}\n", 5, "layers[3] (maxpool): padding 2 is more than half"),
    (BLOCK + "  - linear: 10\n", 5, "layers[3] (linear): linear needs a flatten (or gap + flatten) before it"),
    (BLOCK + "  - flatten\n  - bn\n", 6, "layers[4] (bn): bn needs an image (channels x height x width), not the "
                                        "5,408 features after layers[3] (flatten)"),
    (BLOCK + "  - flatten\n  - linear: 10\n  - conv: 8\n", 7, "layers[5] (conv): conv needs an image"),
    (BLOCK + "  - linear: {features: 5000}\n", 5, "features must be a whole number from 1 to 4096"),
    (BLOCK + "  - gap\n  - maxpool: 2\n", 6, "layers[4] (maxpool): its 1x1 input is too small for a 2x2 window"),
    (BLOCK + "  - conv: {channels: 8, kernel: 28}\n", 5, "its 26x26 input is too small for a 28x28 window"),
    (BLOCK + "  - conv: {channels: 8, kernel: 9, dilation: 4}\n", 5, "too small for a 33x33 window (kernel 9, "
                                                                     "dilation 4)"),
    (BLOCK + "  - conv: {channels: 1024, kernel: 1, padding: 14}\n  - conv: {channels: 1024, kernel: 1, padding: 14}"
     "\n", 6, "layers[4] (conv): its output, 1024x82x82 = 6,885,376 values per image, is more than mnistkit builds"),
    # 256 layers of 8,330 parameters whose padding grows the map (5.4 GB for a summary of one image in 0.11):
    # bounded by arithmetic before anything is allocated
    ("layers:\n" + "  - conv: {channels: 8, kernel: 1, padding: 14}\n" * 3 + "  - conv: {channels: 8, kernel: 1}\n" * 250
     + "  - gap\n  - flatten\n  - linear: 10\n", 86, "layers[84] (conv): up to here the layers output 8,410,752 values "
     "per image in all, more than mnistkit builds (8,388,608)"),
    (BLOCK + "  - conv: 16\n", 5, "layers[3] (conv): the architecture ends in 16x24x24 values per image, not 10 class "
                                  "scores: end with gap, a 1x1 conv to 10 channels and flatten, or flatten and "
                                  "linear: 10"),
    (BLOCK + "  - gap\n  - conv: {channels: 10, kernel: 1}\n", 6, "ends in 10x1x1 values per image, not 10 class "
                                                                   "scores: end with flatten"),
    (BLOCK + "  - flatten\n", 5, "ends in 5,408 values per image, not 10 class scores: end with linear: 10"),
    (BLOCK + "  - conv: {channels: 1024, padding: 1}\n  - flatten\n  - linear: 1000\n  - linear: 10\n", 7,
     "the architecture has 692,309,858 parameters; mnistkit builds models up to 5,000,000 (layers[5] (linear) has "
     "692,225,000 of them)"),
    ("layers:\n" + "  - relu\n" * 257, 1, "257 layers; mnistkit builds models of up to 256 layers"),
    ("layers: [flatten, linear: 10]\nlayers: [relu]\n", 2, "duplicate key 'layers'"),
    ("layers: [conv: {channels: 8}\n", 2, "not valid YAML"),
    (BLOCK + "  - conv: &c {channels: 8}\n  - conv: {<<: *c}\n", 6, "a merge key (<<) is not supported"),
]


@pytest.mark.parametrize("body, line, expected", ERRORS, ids=[e[2][:40] for e in ERRORS])
def test_every_error_is_one_line_naming_the_file_line_and_layer(tmp_path, body, line, expected):
    message = refused(tmp_path, body)
    assert expected in message
    path = tmp_path / "s1.yaml"
    assert message.startswith(f"{path}, line {line}: " if line else f"{path}: ")


ABSURD = [
    BLOCK + "  - conv: {channels: 1000000}\n" + HEAD,
    BLOCK + "  - conv: {channels: 1024, kernel: 26}\n  - conv: {channels: 1024, kernel: 1}\n" + HEAD,
    BLOCK + "  - flatten\n  - linear: 4096\n  - linear: 4096\n  - linear: 10\n",
    BLOCK + "  - conv: {channels: 1024, kernel: 1, padding: 14}\n" * 3 + HEAD,
]


@pytest.mark.parametrize("body", ABSURD)
def test_absurd_sizes_are_refused_by_arithmetic_before_anything_is_allocated(tmp_path, monkeypatch, body):
    def allocate(*args, **kwargs):
        raise AssertionError("allocated before the architecture was checked")

    for name in ("Conv2d", "BatchNorm2d", "Linear", "MaxPool2d", "Dropout", "ReLU"):
        monkeypatch.setattr(torch.nn, name, allocate)
    monkeypatch.setattr(torch, "empty", allocate)
    start = time.perf_counter()
    message = refused(tmp_path, body)
    assert time.perf_counter() - start < 0.5
    assert "layers[" in message and ("whole number" in message or f"{MAX_PARAMS:,}" in message
                                     or "values per image" in message), message


def test_a_python_tag_is_refused_and_runs_nothing(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda cmd: calls.append(cmd) or 0)
    marker = tmp_path / "ran"
    for text in (f'layers: !!python/object/apply:os.system ["echo hi > {marker}"]\n',
                 f'layers:\n  - !!python/object/apply:os.system ["touch {marker}"]\n',
                 "layers: [!!python/name:os.system relu]\n"):
        with pytest.raises(UsageError) as info:
            parse_architecture(text, "task.yaml")
        message = str(info.value)
        assert "\n" not in message and message.startswith("task.yaml, line ")
        assert "the tag !!python/" in message and "is not allowed" in message
    assert calls == [] and not marker.exists()


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    bomb = "a: &a [relu, relu, relu, relu, relu, relu, relu, relu, relu, relu]\n"
    for i in range(1, 9):
        bomb += f"{chr(97 + i)}: &{chr(97 + i)} [" + ", ".join(f"*{chr(96 + i)}" for _ in range(10)) + "]\n"
    start = time.perf_counter()
    message = refused(tmp_path, bomb + "layers: *i\n")
    assert time.perf_counter() - start < 2 and "expands to more than" in message
    assert "expands to more than" in refused(tmp_path, "layers: &x [relu, *x]\n")   # a recursive alias


def test_files_that_are_not_architectures(tmp_path):
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    big = write(tmp_path, "# " + "x" * (300 * 1024) + "\nlayers: [flatten, linear: 10]\n", "big.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00layers")
    deep = write(tmp_path, "layers: " + "[" * 5000 + "]" * 5000 + "\n", "deep.yaml")
    for path, expected in ((tmp_path / "nope.yaml", "not found"), (folder, "is a folder"),
                           (big, "is larger than"), (binary, "is not UTF-8 text"), (deep, "nested too deeply")):
        with pytest.raises(UsageError) as info:
            load_architecture(path)
        assert expected in str(info.value) and "\n" not in str(info.value) and str(path) in str(info.value)
    with pytest.raises(UsageError, match="larger than"):
        parse_architecture(big.read_bytes(), "copy")
    with pytest.raises(UsageError, match="dropout must be"):
        load_architecture(EXAMPLES / "s2.yaml").build(dropout=1.5)
