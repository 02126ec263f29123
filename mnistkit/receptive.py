"""How ``mnistkit.summary`` reads a model: the rows of one forward pass, and their receptive fields.

**Rows** (``Tracer``): forward hooks see each leaf module call; a ``TorchFunctionMode`` sees each torch
call, charged to the leaf module whose ``forward`` makes it, or a row of its own outside every leaf.

**The recurrence** follows tensors from row to row: ``r_out = r_in + (k_eff - 1) * j_in``,
``j_out = j_in * s``, ``k_eff = d * (k - 1) + 1`` for each sliding window (a convolution or pooling,
module or functional: the geometry comes from the call's arguments). It gives each row's jump
(effective stride). Where inputs meet (``x + y``, ``torch.cat``) it takes the largest RF and the
first input's jump; an op that resizes without a window (``F.interpolate``) scales the jump by the
input/output side ratio (rounded, at least 1). After a global pooling (adaptive to 1x1, a mean or
max over the spatial dimensions) a unit sees the whole image ("global"); a flatten keeps the RF of
the map it flattens, and every layer after it is global.

**The gradient** sets the RF of each row with a spatial output, as the extent of the input pixels a
unit depends on: a second pass, on a float64 copy made linear, backpropagates the centre unit of
the row's output (summed over channels) to the input; the extent of the non-zero gradient (the
larger of rows and columns) is the RF, clipped by the image (a unit that sees it all has RF = its
side, and is not "global" unless a global pooling or a flatten made it so). It is right where the
recurrence is not: residual adds, branches of different kernels joined by a cat, crops, shifts.
The copy is linear so that no gradient is zero by accident (a ReLU at a negative input, a saturated
tanh, a max-pool routing to one element): parameters positive (1/fan-in for a weight, 1 for a
vector), input ones, activations, dropout and normalizations (their statistics are no spatial
dependency) the identity, max-pools (module or functional) average pools of the same window.
Limits: a dilated max-pool keeps its max (its RF may come out too small); an op whose gradient is
zero (rounding, sign, comparisons, argmax) or an exact cancellation hides a dependency; a model
that cannot run in float64 on the CPU, or that takes another path the second time, keeps the
recurrence's RF (``ModelSummary.extra["receptive_field"]`` says which).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["State", "Geometry", "START", "Row", "Tracer", "op_name", "tensors", "call_geometry", "step",
           "linear_copy", "linearized", "probe", "measure"]


class State(NamedTuple):
    """What the recurrence knows of a tensor: RF, jump, global, flattened, and the row that made it."""

    r: int
    j: int
    glob: bool
    flat: bool
    row: int | None


START = State(1, 1, False, False, None)  # the model's input (and any tensor made in ``forward``)


Cost = Callable[[str, Sequence[Any], dict[str, Any], torch.Tensor], "int | None"]  # an op's mult-adds; None: unknown


class Geometry(NamedTuple):
    kernel: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    slides: bool  # a window that the recurrence applies (not a transposed convolution)


CONV = {"conv1d", "conv2d", "conv3d"}
CONV_T = {"conv_transpose1d", "conv_transpose2d", "conv_transpose3d"}
MAX_POOL = {f"max_pool{n}d{tail}" for n in (1, 2, 3) for tail in ("", "_with_indices")}
AVG_POOL = {"avg_pool1d", "avg_pool2d", "avg_pool3d"}
ADAPTIVE = {f"adaptive_{kind}_pool{n}d{tail}" for kind in ("avg", "max") for n in (1, 2, 3)
            for tail in ("", "_with_indices")}
RESHAPE = {"view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "unsqueeze", "contiguous"}
REDUCE = MAX_POOL | AVG_POOL | ADAPTIVE | {"mean", "sum", "amax", "amin", "max", "min", "logsumexp"}
_ALIASES = {"radd": "add", "iadd": "add", "rsub": "sub", "isub": "sub", "subtract": "sub", "rmul": "mul",
            "imul": "mul", "multiply": "mul", "truediv": "div", "rtruediv": "div", "itruediv": "div",
            "true_divide": "div", "divide": "div", "rpow": "pow", "ipow": "pow", "rmatmul": "matmul",
            "imatmul": "matmul", "concat": "cat", "concatenate": "cat", "clamp_min": "clamp", "clamp_max": "clamp"}
IDENTITY = {  # the identity in the RF pass: elementwise activations, dropout, normalizations
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid", "tanh",
    "hardtanh", "hardswish", "hardsigmoid", "softplus", "softsign", "logsigmoid", "threshold", "prelu",
    "rrelu", "clamp", "clip", "hardshrink", "softshrink", "tanhshrink",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "batch_norm", "instance_norm", "group_norm", "layer_norm", "local_response_norm", "rms_norm",
}


def _arg(args: Sequence[Any], kwargs: dict[str, Any], i: int, key: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(key, default)


def _ints(value: Any, n: int) -> list[int]:
    if isinstance(value, (tuple, list)):
        values = [int(v) for v in value]
        return values if len(values) == n else (values * n)[:n]
    return [int(value)] * n


def _padding(value: Any, kernel: list[int], dilation: list[int]) -> list[int]:
    if value == "valid":
        return [0] * len(kernel)
    if value == "same":
        return [d * (k - 1) // 2 for k, d in zip(kernel, dilation)]
    return _ints(value, len(kernel))


def call_geometry(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Geometry | None:
    """Kernel, stride, padding and dilation of a functional convolution or pooling, else None."""
    if name in CONV or name in CONV_T:
        w = _arg(args, kwargs, 1, "weight")
        if not isinstance(w, torch.Tensor) or w.dim() < 3:
            return None
        k, n = list(w.shape[2:]), w.dim() - 2
        d = _ints(_arg(args, kwargs, 5 if name in CONV else 7, "dilation", 1), n)
        s = _ints(_arg(args, kwargs, 3, "stride", 1), n)
        return Geometry(k, s, _padding(_arg(args, kwargs, 4, "padding", 0), k, d), d, name in CONV)
    if name in MAX_POOL or name in AVG_POOL:
        n = int(name.split("_pool")[1][0])
        k = _ints(_arg(args, kwargs, 1, "kernel_size"), n)
        stride = _arg(args, kwargs, 2, "stride")
        s = k if stride is None or stride == [] or stride == () else _ints(stride, n)
        d = _ints(_arg(args, kwargs, 4, "dilation", 1), n) if name in MAX_POOL else [1] * n
        return Geometry(k, s, _ints(_arg(args, kwargs, 3, "padding", 0), n), d, True)
    return None


def op_name(func: Any) -> str:
    """``torch.Tensor.__radd__`` -> ``add``, ``torch.relu_`` -> ``relu``, ``Tensor.T.__get__`` -> ``T``."""
    name = getattr(func, "__name__", "") or type(func).__name__
    if name in ("__get__", "__set__"):
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    name = name.strip("_")
    return _ALIASES.get(name, name)


def tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (tuple, list)):
        return [t for item in obj for t in tensors(item)]
    return []


def _spatial(t: torch.Tensor | None) -> list[int] | None:
    return list(t.shape[2:]) if t is not None and t.dim() >= 3 else None


def step(states: list[State], geom: Geometry | None, x: torch.Tensor | None, y: torch.Tensor | None, *,
         adaptive: bool = False, reduce: bool = False, reshape: bool = False) -> tuple[int, int, bool, bool]:
    """(r, j, global, flat) of a row's output from its inputs' states. ``adaptive``: an adaptive
    pooling; ``reduce``: a pooling or reduction; ``reshape``: only views and reshapes."""
    r, j = max(st.r for st in states), states[0].j
    glob, flat = any(st.glob for st in states), any(st.flat for st in states)
    if glob or flat and not reshape:
        return r, j, True, flat
    if geom is not None and geom.slides:
        k, s, d = geom.kernel[0], geom.stride[0], geom.dilation[0]
        return r + d * (k - 1) * j, j * s, False, flat
    xs, ys = _spatial(x), _spatial(y)
    if x is None or y is None or xs is None:
        return r, j, False, flat
    if adaptive and ys is not None:
        if all(v == 1 for v in ys):
            return r, j, True, flat
        s = xs[-1] // ys[-1]  # the equivalent fixed window
        k = xs[-1] - (ys[-1] - 1) * s
        return r + (k - 1) * j, j * s, False, flat
    if y.dim() < x.dim() and y.numel() == x.numel():
        return r, j, False, True  # a flatten
    if reduce and (y.dim() < x.dim() or ys is not None and all(v == 1 for v in ys)):
        return r, j, True, flat  # a mean or max over the spatial dimensions
    if ys is not None and ys != xs and ys[0] > 0:
        j = max(1, round(j * xs[0] / ys[0]))
    return r, j, False, flat


# --------------------------------------------------------------------------- the gradient pass


def linear_copy(model: nn.Module) -> nn.Module:
    """A float64 CPU copy in eval mode, every parameter positive and frozen (see the module doc)."""
    twin = copy.deepcopy(model).to("cpu", torch.float64).eval()
    with torch.no_grad():
        for p in twin.parameters():
            if p.is_floating_point():
                p.fill_(1.0 / max(1, p[0].numel()) if p.dim() >= 2 else 1.0)
            p.requires_grad_(False)
    return twin


def linearized(name: str, func: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """The op's stand-in in the RF pass, or None where the op itself runs."""
    x = _arg(args, kwargs, 0, "input")
    if not isinstance(x, torch.Tensor):
        return None
    if name in IDENTITY:
        return x.clone()
    if name in MAX_POOL:
        g = call_geometry(name, args, kwargs)
        if g is None or any(d != 1 for d in g.dilation):
            return None
        ceil = bool(_arg(args, kwargs, 5, "ceil_mode", False))
        avg = getattr(F, f"avg_pool{len(g.kernel)}d")(x, g.kernel, g.stride, g.padding, ceil)
    elif name in ADAPTIVE and name.startswith("adaptive_max"):
        avg = getattr(F, f"adaptive_avg_pool{name.split('pool')[1][0]}d")(x, _arg(args, kwargs, 1, "output_size"))
    else:
        return None
    with_indices = name.endswith("_with_indices") or bool(_arg(args, kwargs, 6 if name in MAX_POOL else 2,
                                                                "return_indices", False))
    return (avg, func(*args, **kwargs)[1]) if with_indices else avg


def probe(y: Any, image_dims: int) -> torch.Tensor | None:
    """The centre unit of a row's spatial output, summed over channels (None if not spatial)."""
    if not (isinstance(y, torch.Tensor) and y.dim() == image_dims >= 3 and y.requires_grad
            and y.is_floating_point() and y.shape[0] > 0 and all(s > 0 for s in y.shape[1:])):
        return None
    centre = tuple(s // 2 for s in y.shape[2:])
    return y[(0, slice(None)) + centre].sum()


def measure(x: torch.Tensor, probes: list[torch.Tensor | None]) -> list[int | None]:
    """The RF of each probe: the extent of its gradient on the first image (None: no gradient)."""
    out: list[int | None] = []
    for unit in probes:
        try:
            grad = None if unit is None else torch.autograd.grad(unit, x, retain_graph=True, allow_unused=True)[0]
        except RuntimeError:  # e.g. a tensor the backward needs was changed in place: this row keeps the recurrence
            grad = None
        seen = grad[0].ne(0).any(0) if grad is not None else None  # the pixels that matter, as a map
        if seen is None or not bool(seen.any()):
            out.append(None)
            continue
        extents = []
        for axis in range(seen.dim()):
            others = tuple(a for a in range(seen.dim()) if a != axis)
            line = (seen.any(dim=others) if others else seen).nonzero().flatten()
            extents.append(int(line[-1] - line[0]) + 1)
        out.append(max(extents))
    return out


# --------------------------------------------------------------------------- the rows


@dataclass
class Row:
    name: str
    type: str
    module: nn.Module | None
    ops: dict[str, int] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)
    geom: Geometry | None = None
    input_shape: list[int] | None = None
    output_shape: list[int] | None = None
    params: int = 0
    trainable: int = 0
    buffers: int = 0
    state: State = START
    shared_with: int | None = None
    probe: torch.Tensor | None = None

    def add(self, name: str, cost: int | None, geom: Geometry | None) -> None:
        if cost is None:
            self.uncounted.append(name)
        else:
            self.ops[name] = self.ops.get(name, 0) + cost
        self.geom = self.geom or geom


class Tracer(TorchFunctionMode):
    """One forward pass: leaf module calls (hooks) and the ops outside them (this mode) become rows."""

    def __init__(self, model: nn.Module, image_dims: int, cost: Cost, linearize: bool = False) -> None:
        super().__init__()
        self.model, self.image_dims, self.cost, self.linearize = model, image_dims, cost, linearize
        self.rows: list[Row] = []
        self.frames: list[Row] = []  # leaf calls in progress
        self.owners: list[str] = []  # non-leaf modules in progress
        self.states: dict[int, tuple[torch.Tensor, State]] = {}  # by id, the tensor kept alive
        self.seen: set[int] = set()
        self.first_call: dict[int, int] = {}
        self.params = {id(p): p for p in model.parameters()}
        self.buffer_ids = {id(b) for b in model.buffers()}
        self.names = {id(m): n for n, m in model.named_modules()}
        user_root = not type(model).__module__.startswith("torch.")
        self.leaves = {id(m) for m in model.modules() if not list(m.children()) and not (m is model and user_root)}
        self.busy = False

    def run(self, x: torch.Tensor) -> Any:
        self.states[id(x)] = (x, START)
        handles = []
        for module in self.model.modules():
            leaf = id(module) in self.leaves
            handles.append(module.register_forward_pre_hook(self._enter_leaf if leaf else self._enter))
            handles.append(module.register_forward_hook(self._leave_leaf if leaf else self._leave))
        try:
            with self:
                return self.model(x)
        finally:
            for h in handles:
                h.remove()

    def _enter(self, module: nn.Module, inputs: Any) -> None:
        self.owners.append(self.names.get(id(module), type(module).__name__))

    def _leave(self, module: nn.Module, inputs: Any, output: Any) -> None:
        self.owners.pop()

    def _enter_leaf(self, module: nn.Module, inputs: Any) -> None:
        self.frames.append(Row(self.names.get(id(module)) or type(module).__name__, type(module).__name__, module))

    def _leave_leaf(self, module: nn.Module, inputs: Any, output: Any) -> None:
        row = self.frames.pop()
        self.busy = True
        try:
            self._add_row(row, tensors(inputs), tensors(output))
        finally:
            self.busy = False

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if self.busy:
            return func(*args, **kwargs)
        name = op_name(func)
        out = linearized(name, func, args, kwargs) if self.linearize else None
        if out is None:
            out = func(*args, **kwargs)
        self.busy = True
        try:
            ys = tensors(out)
            ins = tensors((args, kwargs))
            # a call that returns no tensor (x.size(0)) or makes one from nothing (torch.ones) is no op
            if ys and ins:
                cost = self.cost(name, args, kwargs, ys[0])
                geom = call_geometry(name, args, kwargs)
                if self.frames:
                    self.frames[-1].add(name, cost, geom)
                else:  # outside every leaf: a row of its own
                    owner = self.owners[-1] if self.owners else ""
                    row = Row(f"{owner + '.' if owner else ''}forward: {name}", name, None)
                    row.add(name, cost, geom)
                    self._add_row(row, ins, ys)
        finally:
            self.busy = False
        return out

    def _add_row(self, row: Row, ins: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        index = len(self.rows)
        if row.module is not None:
            own_params, own_buffers = list(row.module.parameters(recurse=False)), list(row.module.buffers(recurse=False))
            row.shared_with = self.first_call.get(id(row.module))
            self.first_call.setdefault(id(row.module), index)
        else:
            own_params = [self.params[id(t)] for t in ins if id(t) in self.params]
            own_buffers = [t for t in ins if id(t) in self.buffer_ids]
        for t in own_params + own_buffers:
            if id(t) not in self.seen:
                self.seen.add(id(t))
                if id(t) in self.params:
                    row.params += t.numel()
                    row.trainable += t.numel() if t.requires_grad else 0
                else:
                    row.buffers += t.numel()
        data = [t for t in ins if id(t) in self.states and self.states[id(t)][0] is t]
        x = data[0] if data else next((t for t in ins if id(t) not in self.params), None)
        y = ys[0] if ys else None
        names = set(row.ops) | set(row.uncounted)
        r, j, glob, flat = step(
            [self.states[id(t)][1] for t in data] or [START], row.geom, x, y,
            adaptive=bool(names & ADAPTIVE), reduce=bool(names & REDUCE),
            reshape=not names or names <= RESHAPE)
        row.state = State(r, j, glob, flat, self.states[id(data[0])][1].row if data else None)
        row.input_shape = list(x.shape) if x is not None else None
        row.output_shape = list(y.shape) if y is not None else None
        if self.linearize:
            row.probe = probe(y, self.image_dims)
        for t in ys:
            self.states[id(t)] = (t, State(r, j, glob, flat, index))
        self.rows.append(row)
