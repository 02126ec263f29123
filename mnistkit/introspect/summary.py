"""Layer-by-layer introspection of any model, from one forward pass.

A row is a leaf module call or a functional op called outside every leaf module (``x + y``,
``F.conv2d``, ``x.view(...)``, ``x @ w``: named ``forward: add``, or ``block.forward: add`` in a
submodule's ``forward``, its type the op's name), in forward order. Each row has its input and
output shapes, parameters (each tensor counted once, at its first use, by a module or as an op's
argument), buffers, mult-adds per image and its receptive field with its jump (effective stride), by
the course's formula ``r_out = r_in + (k - 1) * d * j_in``, ``j_out = j_in * s``: see
``mnistkit.introspect.receptive`` for how these are followed through a model and where that reaches its limits.
``ModelSummary.rf_rows()`` is the course's table of it (``mnistkit summary MODEL --rf``).

Mult-adds are counted op by op (a ``TorchFunctionMode`` sees every torch call, inside a leaf
module's ``forward`` as well as in the model's own code), per image, by these rules:

* convolution: output elements x (input channels per group x kernel elements); a transposed
  convolution: input elements x (output channels per group x kernel elements);
* ``linear``, ``matmul``, ``@``, ``mm``, ``bmm``, ``addmm``...: output elements x the contracted size;
* BatchNorm and the other normalizations: one per element (once folded: y = a*x + b);
* elementwise arithmetic (``add``, ``sub``, ``mul``, ``div``, ``pow``): one per output element;
* zero, and known to be zero: views, reshapes, indexing, ``cat``, activations, dropout, pooling
  and reductions (max, average, mean, sum: they add, they do not multiply), comparisons, new tensors.

An op with no rule (``einsum``, an RNN, attention...) is never silently zero: its name goes into
``ModelSummary.uncounted`` (and the row's ``uncounted``), shown under the table and in ``to_dict()``.
``FlopCounterMode`` counts 2 FLOPs per convolution or matmul mult-add (the tests check that).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from math import prod
from typing import Any, Sequence

import torch
from torch import nn

from mnistkit.introspect import receptive
from mnistkit.errors import UsageError
from mnistkit.introspect.receptive import CONV, CONV_T, IDENTITY, REDUCE, RESHAPE
from mnistkit.recipe import DEFAULT_BUDGET

__all__ = ["LayerInfo", "ModelSummary", "summarize", "DEFAULT_INPUT_SIZE", "DEFAULT_BUDGET", "MATMUL_OPS"]

DEFAULT_INPUT_SIZE = (1, 1, 28, 28)

NORM = {"batch_norm", "instance_norm", "group_norm", "layer_norm", "rms_norm", "local_response_norm"}
ELEMENTWISE = {"add", "sub", "mul", "div", "pow", "square", "addcmul", "addcdiv", "lerp"}
MATMUL_OPS = CONV | CONV_T | {"linear", "bilinear", "matmul", "mm", "bmm", "mv", "dot", "vdot", "inner",
                              "addmm", "baddbmm", "addmv"}
FREE = (IDENTITY - NORM) | RESHAPE | REDUCE | set("""
    permute transpose t T mT H mH swapaxes swapdims movedim moveaxis expand expand_as narrow select getitem setitem
    index_select gather take masked_select chunk split tensor_split unbind cat stack hstack vstack flip roll rot90 pad
    clone detach to type type_as float double half bfloat16 int long bool cpu cuda data repeat tile repeat_interleave
    masked_fill where fill zero copy pixel_shuffle pixel_unshuffle channel_shuffle embedding one_hot softmax log_softmax
    softmin glu exp log sqrt rsqrt reciprocal neg abs sign argmax argmin topk sort argsort eq ne gt lt ge le isnan
    isfinite all any logical_not logical_and logical_or nonzero zeros_like ones_like empty_like full_like rand_like
    randn_like new_zeros new_ones new_empty new_full""".split())


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
    rf: int  # the receptive field of its output by the formula (never clipped at the image)
    jump: int
    rf_global: bool  # it covers the whole input: rf >= the input's side, or after a pooling of the whole map
    shared_with: int | None = None  # index of the first call of the same module
    ops: dict[str, int] = field(default_factory=dict)  # mult-adds per image of each counted op in the row
    uncounted: list[str] = field(default_factory=list)  # ops in the row with no counting rule
    rf_in: int = 1  # the largest RF of its inputs (where paths merge, the largest branch)
    jump_in: int = 1  # the jump of its (first) input
    window: dict[str, int] | None = None  # what the formula applied: k, s, p, d, n_in, n_out; None: no window
    called: bool = True  # False: a module that forward never calls (its parameters still count)
    label: str = ""  # the type as the table shows it: ``Dropout(p=0.1)``, ``dropout(p=0.25)``; else the type


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
    output_shape: list[int] | None = None  # of the model's (first) output tensor, batch included
    uncounted: list[str] = field(default_factory=list)  # ops not in mult_adds, in order of first call
    uncounted_calls: dict[str, int] = field(default_factory=dict)  # how many calls of each
    rf_output: int = 1  # the formula's RF at the model's output (rf, jump: of the last layer with a map)
    uncalled_params: int = 0  # parameters in layers that forward never calls (or never uses)

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

    def rf_rows(self) -> list[dict[str, Any]]:
        """The course's receptive-field table: one row per layer that applies a window (a convolution, a
        pooling, a pooling of the whole map, a layer on a flattened map), with n_in, n_out (the map's
        side), k, p, s, d, r_in, r_out, j_in, j_out."""
        return [{"index": layer.index, "layer": layer.name, "type": layer.type,
                 "n_in": w["n_in"], "n_out": w["n_out"], "k": w["k"], "p": w["p"], "s": w["s"], "d": w["d"],
                 "r_in": layer.rf_in, "r_out": layer.rf, "j_in": layer.jump_in, "j_out": layer.jump,
                 "global": layer.rf_global}
                for layer in self.layers if (w := layer.window) is not None]

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "input_size": self.input_size,
            "output_shape": self.output_shape,
            "layers": [asdict(layer) for layer in self.layers],
            "totals": {
                "params": self.total_params,
                "uncalled_params": self.uncalled_params,
                "trainable_params": self.trainable_params,
                "non_trainable_params": self.non_trainable_params,
                "buffers": self.buffers,
                "param_bytes": self.param_bytes,
                "buffer_bytes": self.buffer_bytes,
                "mult_adds": self.mult_adds,
                "uncounted": list(self.uncounted),
                "uncounted_calls": dict(self.uncounted_calls),
                "rf": self.rf,
                "jump": self.jump,
                "rf_global": self.rf_global,
                "rf_output": self.rf_output,
            },
            "receptive_field": self.rf_rows(),
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

    # Printing is presentation: mnistkit.render owns every table and text format. It is reached
    # only here, when a summary is printed, and loaded by name so that importing this module
    # never imports Rich or the render package.
    def __rich_console__(self, console: Any, options: Any) -> Any:
        yield importlib.import_module("mnistkit.render.models").summary_table(self, console)

    def __str__(self) -> str:
        return importlib.import_module("mnistkit.render.models").summary_text(self)

    def to_markdown(self) -> str:
        """The layer table as GitHub Markdown, then the totals and the budget check."""
        return importlib.import_module("mnistkit.render.models").summary_markdown(self)

    def rf_markdown(self) -> str:
        """The course's receptive-field table (``rf_rows``) as GitHub Markdown, to paste into a README."""
        return importlib.import_module("mnistkit.render.models").rf_markdown(self)

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # IPython and Jupyter show the table
        printer.text(str(self))


# --------------------------------------------------------------------------- counting


def op_mult_adds(name: str, args: Sequence[Any], kwargs: dict[str, Any], y: torch.Tensor) -> int | None:
    """Mult-adds of one op call (whole batch) by the rules above; None: no rule for it."""
    def arg(i: int, key: str) -> Any:
        return args[i] if len(args) > i else kwargs[key]

    try:
        if name in FREE:
            return 0
        if name in NORM or name in ELEMENTWISE:
            return y.numel()
        if name in CONV:
            return y.numel() * prod(arg(1, "weight").shape[1:])
        if name in CONV_T:
            return arg(0, "input").numel() * prod(arg(1, "weight").shape[1:])
        if name == "linear":
            return y.numel() * arg(1, "weight").shape[-1]
        if name == "bilinear":
            return y.numel() * prod(arg(2, "weight").shape[1:])
        if name in MATMUL_OPS:
            a = arg(1, "mat1") if name in ("addmm", "baddbmm", "addmv") else arg(0, "input")
            return y.numel() * a.shape[-1]
    except (IndexError, KeyError, AttributeError, TypeError):
        pass
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def summarize(
    model: nn.Module,
    input_size: Sequence[int] = DEFAULT_INPUT_SIZE,
    name: str | None = None,
    budget: int = DEFAULT_BUDGET,
) -> ModelSummary:
    """Run one forward pass of zeros through ``model`` and describe every leaf layer call and
    functional op. A model that fails on the input is a ``UsageError`` naming what went wrong."""
    input_size = [int(v) for v in input_size]
    label = name or type(model).__name__
    batch = max(1, input_size[0])
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    recorder = receptive.Tracer(model, op_mult_adds)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            output = recorder.run(torch.zeros(input_size, device=device, dtype=dtype))
    except Exception as error:
        raise UsageError(f"{label} fails on a {input_size} input ({_first_line(error)}); mnistkit's models "
                         f"take MNIST's 1x28x28 digits") from error
    finally:
        model.train(was_training)
    rows = recorder.rows
    side = max(input_size[2:], default=1)  # a unit whose RF is this wide sees the whole input
    layers = [LayerInfo(
        index, row.name, row.type, row.geom.kernel if row.geom else None, row.geom.stride if row.geom else None,
        row.geom.padding if row.geom else None, row.input_shape, row.output_shape, row.params, row.trainable,
        row.buffers, sum(row.ops.values()) // batch, row.state.r, row.state.j, row.state.glob or row.state.r >= side,
        row.shared_with, {k: v // batch for k, v in row.ops.items()}, list(dict.fromkeys(row.uncounted)),
        row.r_in, row.j_in, row.window._asdict() if row.window else None, label=row.label or row.type)
        for index, row in enumerate(rows)]
    # parameters that no row used (held by a module that was never called, or never used) still
    # count: give them a row so the table adds up to the totals
    last = layers[-1] if layers else None
    for mod_name, module in model.named_modules():
        leftover = [p for p in module.parameters(recurse=False) if id(p) not in recorder.seen]
        if leftover:
            recorder.seen.update(id(p) for p in leftover)
            layers.append(LayerInfo(
                len(layers), mod_name or "(model)", type(module).__name__ + " (not called)", None, None, None, None,
                None, sum(p.numel() for p in leftover), sum(p.numel() for p in leftover if p.requires_grad), 0, 0,
                last.rf if last else 1, last.jump if last else 1, last.rf_global if last else False,
                rf_in=last.rf if last else 1, jump_in=last.jump if last else 1, called=False,
                label=type(module).__name__ + " (not called)"))

    calls: dict[str, int] = {}
    for row in rows:
        for op in row.uncounted:
            calls[op] = calls.get(op, 0) + 1
    unique_params = list(model.parameters())  # parameters() already de-duplicates shared tensors
    unique_buffers = list(model.buffers())
    spatial = [layer for layer in layers if layer.output_shape is not None and len(layer.output_shape) == len(input_size)
               and any(v > 1 for v in layer.output_shape[2:])]  # the layers whose output is a map
    modules = list(model.modules())
    used = {op for layer in layers for op in layer.ops}
    out = receptive.tensors(output)
    return ModelSummary(
        model=label,
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
        has_batchnorm=any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules) or "batch_norm" in used,
        has_dropout=any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in modules)
        or any(layer.module is None and layer.type.startswith("dropout") for layer in rows),
        gap_head=any(  # a pooling that covers the whole map in one value per channel (GAP, AvgPool2d(7) on 7x7)
            set(row.ops) & (REDUCE - {"sum"}) and row.window is not None and row.window.whole
            and not row.state.flat for row in rows
        ),
        fc_head=any(isinstance(row.module, nn.Linear) for row in rows)  # a Linear that forward calls
        or any(layer.rf_global and set(layer.ops) & (MATMUL_OPS - CONV - CONV_T) for layer in layers),
        budget=budget,
        extra={"receptive_field": "formula"},
        output_shape=list(out[0].shape) if out else None,
        uncounted=list(calls),
        uncounted_calls=calls,
        rf_output=rows[-1].state.r if rows else 1,
        uncalled_params=sum(layer.params for layer in layers if not layer.called),
    )
