import pytest
import torch
from torch import nn

import mnistkit
from mnistkit.errors import UnknownModelError
from mnistkit.models import get_model, list_models, model_info, register_model

# The change-log's exact trainable parameter counts.
EXPECTED_PARAMS = {"I0": 18_060, "I1": 20_978, "I2": 19_494, "I3": 14_500, "I4": 4_964, "I5": 2_882}


def test_registry_lists_the_iterations_in_order():
    assert list_models() == ["I0", "I1", "I2", "I3", "I4", "I5"]
    assert list_models("I[23]") == ["I2", "I3"]
    assert list_models("nothing*") == []


@pytest.mark.parametrize("name,expected", sorted(EXPECTED_PARAMS.items()))
def test_exact_parameter_counts(name, expected):
    model = get_model(name)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_output_shape_and_backward(name):
    model = get_model(name)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    out.sum().backward()  # every parameter must be reachable from the output
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_each_model_has_a_one_line_description(name):
    assert model_info(name).description
    assert "\n" not in model_info(name).description


def test_assignment_features():
    def has(model, kind):
        return any(isinstance(m, kind) for m in model.modules())

    assert not has(get_model("I0"), nn.BatchNorm2d) and not has(get_model("I0"), nn.Dropout)
    for name in ("I1", "I2", "I3"):
        assert has(get_model(name), nn.BatchNorm2d) and has(get_model(name), nn.Dropout)
    assert has(get_model("I3"), nn.AdaptiveAvgPool2d) and not has(get_model("I3"), nn.Linear)


def test_dropout_rate_is_configurable():
    model = get_model("I3", dropout=0.2)
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.2}


def test_unknown_model_lists_known_names():
    with pytest.raises(UnknownModelError) as info:
        get_model("I9")
    message = str(info.value)
    assert "I9" in message
    for name in EXPECTED_PARAMS:
        assert name in message


def test_lookup_is_case_insensitive():
    assert type(get_model("i3")).__name__ == "I3"


def test_register_model_rejects_duplicates():
    with pytest.raises(ValueError):
        register_model("i1")(lambda: nn.Identity())


def test_every_public_name_resolves_to_the_object_its_module_defines():
    # the lazy table names a module for each public name: one that moved (0.12's sub-packages)
    # or was renamed must not leave `mnistkit.NAME` broken
    import importlib

    for name, module in mnistkit._LAZY.items():
        assert getattr(mnistkit, name) is getattr(importlib.import_module(module), name), name
    assert mnistkit.get_model is get_model
    with pytest.raises(AttributeError):
        mnistkit.no_such_thing


def test_i4_meets_its_constraints():
    from mnistkit.introspect.summary import summarize

    s = summarize(get_model("I4"), name="I4", budget=5000)
    assert s.trainable_params == 4_964 < 5_000 and s.within_budget
    assert s.has_batchnorm and s.has_dropout and s.gap_head and not s.fc_head and s.rf_global


def test_i5_meets_its_constraints():
    from mnistkit.experiments import PACKAGED_PATH, load_experiments
    from mnistkit.introspect.summary import summarize

    s = summarize(get_model("I5"), name="I5", budget=3000)
    assert s.trainable_params == 2_882 < 3_000 and s.within_budget
    assert s.has_batchnorm and s.has_dropout and s.gap_head and not s.fc_head and s.rf_global
    assert not any(isinstance(m, nn.Linear) for m in get_model("I5").modules())
    i5 = next(it for it in load_experiments(PACKAGED_PATH).iterations if it.id == "I5")
    assert i5.model == "I5" and i5.recipe["epochs"] <= 19 and i5.reported["params"] == 2_882


def test_i5_is_the_searched_yaml_architecture_layer_for_layer():
    """The sweep searched examples/i5/c-sep16.yaml; the registered I5 must be that model: the same
    parameters in the same order, so that one seed initialises both alike and they compute alike."""
    from pathlib import Path

    from mnistkit.models.architecture import load_architecture

    yaml_path = Path(__file__).resolve().parents[1] / "examples" / "i5" / "c-sep16.yaml"
    torch.manual_seed(7)
    registered = get_model("I5", dropout=0.01)
    torch.manual_seed(7)
    searched = load_architecture(yaml_path).build(dropout=0.01)
    a, b = list(registered.parameters()), list(searched.parameters())
    assert len(a) == len(b) == 33
    assert all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
    assert [m.p for m in registered.modules() if isinstance(m, nn.Dropout)] == \
           [m.p for m in searched.modules() if isinstance(m, nn.Dropout)] == [0.01, 0.01]
    x = torch.randn(8, 1, 28, 28)
    registered.eval(), searched.eval()
    with torch.no_grad():
        assert torch.equal(registered(x), searched(x))


@pytest.mark.parametrize("name", ["I1", "I2", "I3", "I4", "I5"])
def test_folding_batchnorm_into_the_convolutions_keeps_the_logits(name):
    from mnistkit.training.evaluation import fold_batchnorm

    torch.manual_seed(0)
    model = get_model(name).to(memory_format=torch.channels_last)
    with torch.no_grad():  # statistics and affine parameters that are not the identity
        for _ in range(3):
            model(torch.randn(64, 1, 28, 28))
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.2, 0.2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0 and model.training  # untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    x = torch.randn(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_a_model_without_conv_bn_pairs_is_evaluated_as_it_is():
    from mnistkit.training.evaluation import fold_batchnorm

    model = get_model("I0")
    assert fold_batchnorm(model) is model


@pytest.mark.parametrize("name", ["I1", "I2", "I3", "I4", "I5"])
def test_dropout_after_every_conv_block_moves_dropout_and_keeps_the_parameters(name):
    def is_block(m):
        return isinstance(m, nn.Sequential) and isinstance(getattr(m, "bn", None), nn.BatchNorm2d)

    default, moved = get_model(name, dropout=0.1), get_model(name, dropout=0.1, dropout_at="convs")
    layers = list(moved.net.named_children())
    blocks = [n for n, m in layers if is_block(m)]
    drops = [(n, m.p) for n, m in layers if isinstance(m, nn.Dropout)]
    # one Dropout right after each conv block, none where the model had its own
    assert drops == [(f"drop_{b}", 0.1) for b in blocks]
    for i, (n, m) in enumerate(layers):
        if is_block(m):
            assert layers[i + 1][0] == f"drop_{n}"
    assert not any(n.startswith("drop") and not n.startswith("drop_") for n, _ in layers)
    assert [n for n, _ in default.net.named_children() if n.startswith("drop")] != [n for n, _ in drops]
    # Dropout has no parameters: the same count and the same checkpoint keys, so a state loads
    assert sum(p.numel() for p in moved.parameters()) == EXPECTED_PARAMS[name]
    moved.load_state_dict(default.state_dict())
    x = torch.randn(4, 1, 28, 28)
    assert torch.equal(moved.eval()(x), default.eval()(x))  # no Dropout at evaluation


def test_dropout_at_rejects_unknown_places():
    from mnistkit.errors import UsageError
    from mnistkit.recipe import Recipe

    with pytest.raises(UsageError, match="dropout_at"):
        Recipe(dropout_at="everywhere")
    with pytest.raises(ValueError, match="dropout_at"):
        get_model("I1", dropout_at="everywhere")


@pytest.mark.slow
def test_i5_trains_step_for_step_as_the_searched_yaml(tmp_path):
    """With the change-log's recipe (backend torch, as the sweep trained the YAML model), the
    registered I5 and examples/i5/c-sep16.yaml reach the same weights from one seed: the
    validation search's figures are I5's."""
    from pathlib import Path

    import mnistkit
    from mnistkit.runs.checkpoint import load_checkpoint
    from mnistkit.experiments import PACKAGED_PATH, load_experiments, resolve_recipe

    recipe = resolve_recipe("I5", load_experiments(PACKAGED_PATH)).replace(epochs=1, batch_size=32, teacher="")
    assert recipe.backend == "torch" and recipe.dropout == 0.01   # the architecture's test: no teacher
    data = mnistkit.DataOptions("synthetic", limit=128)
    yaml_path = Path(__file__).resolve().parents[1] / "examples" / "i5" / "c-sep16.yaml"
    runs = [mnistkit.train(m, recipe, data, device="cpu", runs_dir=tmp_path / name)
            for name, m in (("registered", "I5"), ("searched", str(yaml_path)))]
    assert runs[0].metrics[-1].train_loss == runs[1].metrics[-1].train_loss
    states = [load_checkpoint(r.run_dir / "last.pt")["state_dict"] for r in runs]
    assert all(torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values()))
