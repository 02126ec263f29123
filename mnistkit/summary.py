"""Layer-by-layer introspection of a model, computed by forward hooks.

For every leaf module call, in forward order: input/output shape, parameters (each tensor
counted once, at its first use), buffers, mult-adds per image and the receptive field with
its jump (effective stride), using the standard recurrence

    r_out = r_in + (k_eff - 1) * j_in,   j_out = j_in * s,   k_eff = d * (k - 1) + 1.

The receptive field follows tensors, not list positions: each output tensor carries the
(r, j) of the layer that made it, so branches are tracked as long as they run through
modules. After a global pooling or a flatten, every unit sees the whole image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from mnistkit.recipe import DEFAULT_BUDGET

__all__ = ["LayerInfo", "ModelSummary", "summarize", "DEFAULT_INPUT_SIZE", "DEFAULT_BUDGET"]

DEFAULT_INPUT_SIZE = (1, 1, 28, 28)


@dataclass
class LayerInfo:
    index: int
    name: str
    type: str
    kernel: list[int] | None
    stride: list[int] | None
    padding: list[int] | None
    input_shape: list[int] | None
    output_shape: list[int] | None
    params: int
    trainable_params: int
    buffers: int
    mult_adds: int
    rf: int
    jump: int
    rf_global: bool
    shared_with: int | None = None  # index of the first call of the same module


@dataclass
class ModelSummary:
    model: str
    input_size: list[int]
    layers: list[LayerInfo]
    trainable_params: int
    non_trainable_params: int
    buffers: int
    param_bytes: int
    buffer_bytes: int
    mult_adds: int
    rf: int  # receptive field of the last spatial layer
    jump: int
    rf_global: bool  # the output sees the whole image
    has_batchnorm: bool
    has_dropout: bool
    gap_head: bool
    fc_head: bool
    budget: int = DEFAULT_BUDGET
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def total_params(self) -> int:
        return self.trainable_params + self.non_trainable_params

    @property
    def within_budget(self) -> bool:
        return self.trainable_params < self.budget

    @property
    def head(self) -> str:
        kinds = [k for k, on in (("GAP", self.gap_head), ("FC", self.fc_head)) if on]
        return "+".join(kinds) or "conv"

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_size": self.input_size,
            "layers": [asdict(layer) for layer in self.layers],
            "totals": {
                "params": self.total_params,
                "trainable_params": self.trainable_params,
                "non_trainable_params": self.non_trainable_params,
                "buffers": self.buffers,
                "param_bytes": self.param_bytes,
                "buffer_bytes": self.buffer_bytes,
                "mult_adds": self.mult_adds,
                "rf": self.rf,
                "jump": self.jump,
                "rf_global": self.rf_global,
            },
            "uses": {
                "batchnorm": self.has_batchnorm,
                "dropout": self.has_dropout,
                "gap_head": self.gap_head,
                "fc_head": self.fc_head,
            },
            "budget": {
                "limit": self.budget,
                "params": self.trainable_params,
                "pass": self.within_budget,
                "margin": self.budget - self.trainable_params,
            },
        }


def _pair(value: Any) -> list[int]:
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value]
    return [int(value), int(value)]


def _geometry(module: nn.Module) -> tuple[list[int], list[int], list[int], list[int]] | None:
    """(kernel, stride, padding, dilation) of a sliding-window layer, else None."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return (list(module.kernel_size), list(module.stride), _pair(module.padding), list(module.dilation))
    if isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
        k = _pair(module.kernel_size)
        s = _pair(module.stride if module.stride is not None else module.kernel_size)
        d = _pair(getattr(module, "dilation", 1))
        return k, s, _pair(module.padding), d
    return None


def _mult_adds(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-accumulates for one call, for the whole batch."""
    if isinstance(module, nn.modules.conv._ConvNd):
        per_output = module.in_channels // module.groups
        for k in module.kernel_size:
            per_output *= k
        return output.numel() * per_output
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return output.numel()  # one multiply-add per element once folded: y = a*x + b
    return 0


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)):
        for item in obj:
            found = _first_tensor(item)
            if found is not None:
                return found
    if isinstance(obj, dict):
        return _first_tensor(list(obj.values()))
    return None


def summarize(
    model: nn.Module,
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
    name: str | None = None,
    budget: int = DEFAULT_BUDGET,
) -> ModelSummary:
    """Run one forward pass of zeros through ``model`` and describe every leaf layer call."""
    input_size = [int(v) for v in input_size]
    batch = input_size[0]
    image_side = max(input_size[2:]) if len(input_size) > 2 else 1
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    names = {id(m): n or type(m).__name__ for n, m in leaves}

    layers: list[LayerInfo] = []
    seen_params: set[int] = set()
    seen_buffers: set[int] = set()
    first_call: dict[int, int] = {}
    # receptive field state per tensor (keyed by id, with the tensor kept alive)
    state: dict[int, tuple[torch.Tensor, int, int, bool, bool]] = {}
    last: list[tuple[int, int, bool, bool]] = [(1, 1, False, False)]  # r, j, global, flat

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        x, y = _first_tensor(inputs), _first_tensor(output)
        entry = state.get(id(x)) if x is not None else None
        r, j, is_global, flat = (entry[1:] if entry is not None and entry[0] is x else last[0])

        geom = _geometry(module)
        if is_global or flat and not isinstance(module, nn.Flatten):
            is_global = True
        elif geom is not None:
            k, s, _, d = geom
            r, j = r + (d[0] * (k[0] - 1)) * j, j * s[0]
        elif isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and y is not None:
            if y.dim() >= 3 and y.shape[-1] == 1 and y.shape[-2] == 1:
                is_global = True
            elif x is not None:  # equivalent fixed window
                s = x.shape[-1] // y.shape[-1]
                k = x.shape[-1] - (y.shape[-1] - 1) * s
                r, j = r + (k - 1) * j, j * s
        if isinstance(module, nn.Flatten):
            flat = True

        params = trainable = 0
        for p in module.parameters(recurse=False):
            if id(p) not in seen_params:
                seen_params.add(id(p))
                params += p.numel()
                trainable += p.numel() if p.requires_grad else 0
        nbuf = 0
        for b in module.buffers(recurse=False):
            if id(b) not in seen_buffers:
                seen_buffers.add(id(b))
                nbuf += b.numel()

        index = len(layers)
        kernel = stride = padding = None
        if geom is not None:
            kernel, stride, padding = geom[0], geom[1], geom[2]
        layers.append(
            LayerInfo(
                index=index,
                name=names[id(module)],
                type=type(module).__name__,
                kernel=kernel,
                stride=stride,
                padding=padding,
                input_shape=list(x.shape) if x is not None else None,
                output_shape=list(y.shape) if y is not None else None,
                params=params,
                trainable_params=trainable,
                buffers=nbuf,
                mult_adds=_mult_adds(module, y) // batch if y is not None else 0,
                rf=image_side if is_global else r,
                jump=j,
                rf_global=is_global,
                shared_with=first_call.get(id(module)),
            )
        )
        first_call.setdefault(id(module), index)
        last[0] = (r, j, is_global, flat)
        if y is not None:
            state[id(y)] = (y, r, j, is_global, flat)

    handles = [m.register_forward_hook(hook) for _, m in leaves]
    was_training = model.training
    try:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    # parameters that no leaf call used (held directly by a container, or in an unused
    # module) still count: give them a row so the table adds up to the totals
    for mod_name, module in model.named_modules():
        leftover = [p for p in module.parameters(recurse=False) if id(p) not in seen_params]
        if leftover:
            for p in leftover:
                seen_params.add(id(p))
            layers.append(
                LayerInfo(len(layers), mod_name or "(model)", type(module).__name__ + " (not called)",
                          None, None, None, None, None, sum(p.numel() for p in leftover),
                          sum(p.numel() for p in leftover if p.requires_grad), 0, 0,
                          last[0][0], last[0][1], last[0][2])
            )

    unique_params = list(model.parameters())  # parameters() already de-duplicates shared tensors
    unique_buffers = list(model.buffers())
    spatial = [layer for layer in layers if not layer.rf_global]
    modules = list(model.modules())
    return ModelSummary(
        model=name or type(model).__name__,
        input_size=input_size,
        layers=layers,
        trainable_params=sum(p.numel() for p in unique_params if p.requires_grad),
        non_trainable_params=sum(p.numel() for p in unique_params if not p.requires_grad),
        buffers=sum(b.numel() for b in unique_buffers),
        param_bytes=sum(p.numel() * p.element_size() for p in unique_params),
        buffer_bytes=sum(b.numel() * b.element_size() for b in unique_buffers),
        mult_adds=sum(layer.mult_adds for layer in layers),
        rf=spatial[-1].rf if spatial else 1,
        jump=spatial[-1].jump if spatial else 1,
        rf_global=bool(layers) and layers[-1].rf_global,
        has_batchnorm=any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules),
        has_dropout=any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in modules),
        gap_head=any(
            layer.type in ("AdaptiveAvgPool2d", "AdaptiveMaxPool2d", "AvgPool2d", "MaxPool2d")
            and layer.rf_global and layer.output_shape is not None and layer.output_shape[-1] == 1
            for layer in layers
        ),
        fc_head=any(isinstance(m, nn.Linear) for m in modules),
        budget=budget,
    )
