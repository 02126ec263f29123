"""How ``mnistkit.introspect.summary`` reads a model: the rows of one forward pass, and their receptive fields.

**Rows** (``Tracer``): forward hooks see each leaf module call; a ``TorchFunctionMode`` sees each torch
call, charged to the leaf module whose ``forward`` makes it, or a row of its own outside every leaf.

**The receptive field is the course's formula**, followed from row to row along the tensors:
``r_out = r_in + (k - 1) * d * j_in`` and ``j_out = j_in * s`` for the window a row slides (``Window``:
kernel k, stride s, padding p, dilation d of a convolution or pooling, module or functional, read from
the call's arguments; on the first spatial axis). It starts at r = 1, j = 1 on the input and is never
clipped at the image: a unit of a 7x7 map at jump 4 whose formula says 36 is shown as 36, although a
28x28 digit has only 28 pixels a side. Where paths meet (``x + y``, ``torch.cat``) r is the largest of
the inputs' and j the first input's. A pooling of the whole map (``nn.AvgPool2d(7)`` on a 7x7 map,
``F.adaptive_avg_pool2d(x, 1)``, ``x.mean((2, 3))``) is one window as large as the map (k = s = n); so
is a layer on a flattened map (``nn.Linear`` after ``x.view(x.size(0), -1)``; a view, an activation or
a dropout of it changes nothing). A window that covers the whole map in one output position makes its
row, and every row after it, "global". An op that resizes without a window (``F.interpolate``, a
transposed convolution) scales the jump by the input/output side ratio (rounded, at least 1).

Limits: the formula follows the first spatial axis, and knows windows, not crops or shifts (two crops
of a map added see more than either: the formula says the larger crop's RF).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["State", "Geometry", "Window", "START", "Row", "Tracer", "op_name", "tensors", "call_geometry",
           "window", "step", "label"]


class State(NamedTuple):
    """What the formula knows of a tensor: its RF r and jump j, whether it is global, the side of the
    map it is a flattening of (0: none), and the row that made it."""

    r: int
    j: int
    glob: bool
    flat: int
    row: int | None


START = State(1, 1, False, 0, None)  # the model's input (and any tensor made in ``forward``)


Cost = Callable[[str, Sequence[Any], dict[str, Any], torch.Tensor], "int | None"]  # an op's mult-adds; None: unknown


class Geometry(NamedTuple):
    kernel: list[int]
    stride: list[int]
    padding: list[int]
    dilation: list[int]
    slides: bool  # a window that the formula applies (not a transposed convolution)


class Window(NamedTuple):
    """The window a row slides over its input map, on the first spatial axis: the course's k, s, p, d,
    and the map's side before and after (n_in, n_out)."""

    k: int
    s: int
    p: int
    d: int
    n_in: int
    n_out: int

    @property
    def whole(self) -> bool:
        """One output position that covers the whole input map."""
        return self.n_out == 1 and self.d * (self.k - 1) + 1 - self.p >= self.n_in


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
IDENTITY = {  # no window: elementwise activations, dropout, normalizations
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


def window(geom: Geometry | None, x: torch.Tensor | None, y: torch.Tensor | None, flat: int = 0, *,
           adaptive: bool = False, reduce: bool = False, passes: bool = False) -> Window | None:
    """The window a row applies to its input map, else None. ``flat``: the input is a flattened map of
    that side; ``adaptive``: an adaptive pooling; ``reduce``: a pooling or reduction; ``passes``: only
    views, reshapes and elementwise ops (nothing that mixes positions)."""
    if flat:  # a layer on a flattened map sees all of it
        return None if passes else Window(flat, flat, 0, 1, flat, 1)
    xs, ys = _spatial(x), _spatial(y)
    if not xs:
        return None
    if geom is not None and geom.slides:
        return Window(geom.kernel[0], geom.stride[0], geom.padding[0], geom.dilation[0], xs[0], ys[0] if ys else 1)
    if adaptive and ys and 0 < ys[0] <= xs[0]:
        s = xs[0] // ys[0]  # the equivalent fixed window
        return Window(xs[0] - (ys[0] - 1) * s, s, 0, 1, xs[0], ys[0])
    if reduce and y is not None and (y.dim() == 2 or ys is not None and len(ys) == len(xs) and all(v == 1 for v in ys)):
        return Window(xs[0], xs[0], 0, 1, xs[0], 1)  # a mean or max over the map
    return None


def step(states: list[State], geom: Geometry | None, x: torch.Tensor | None, y: torch.Tensor | None, *,
         adaptive: bool = False, reduce: bool = False, passes: bool = False
         ) -> tuple[int, int, bool, int, Window | None]:
    """(r, j, global, flat, window) of a row's output from its inputs' states, by the formula
    ``r_out = r_in + (k - 1) * d * j_in``, ``j_out = j_in * s`` (see ``window`` for the flags)."""
    r, j = max(st.r for st in states), states[0].j
    glob, flat = any(st.glob for st in states), max(st.flat for st in states)
    if glob:
        return r, j, True, flat, None
    w = window(geom, x, y, flat, adaptive=adaptive, reduce=reduce, passes=passes)
    if w is not None:
        return r + (w.k - 1) * w.d * j, j * w.s, w.whole, flat, w
    xs, ys = _spatial(x), _spatial(y)
    if flat or x is None or y is None or xs is None:
        return r, j, False, flat, None
    if y.dim() < x.dim() and y.numel() == x.numel():
        return r, j, False, xs[0], None  # a flatten
    if ys is not None and ys != xs and ys[0] > 0:
        j = max(1, round(j * xs[0] / ys[0]))
    return r, j, False, flat, None


def label(module: nn.Module) -> str:
    """A leaf module's type as the table shows it: ``Dropout(p=0.1)``, else its class name."""
    name = type(module).__name__
    return f"{name}(p={module.p:g})" if isinstance(module, nn.modules.dropout._DropoutNd) else name


def _op_label(name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> str:
    """A functional op's type as the table shows it: ``dropout(p=0.1)``, else its name."""
    if name.startswith("dropout") or name.endswith("alpha_dropout"):
        p = _arg(args, kwargs, 1, "p", 0.5)
        if isinstance(p, (int, float)):
            return f"{name}(p={p:g})"
    return name


# --------------------------------------------------------------------------- the rows


@dataclass
class Row:
    name: str
    type: str
    module: nn.Module | None
    label: str = ""  # the type as the table shows it (``Dropout(p=0.1)``)
    ops: dict[str, int] = field(default_factory=dict)
    uncounted: list[str] = field(default_factory=list)
    geom: Geometry | None = None
    input_shape: list[int] | None = None
    output_shape: list[int] | None = None
    params: int = 0
    trainable: int = 0
    buffers: int = 0
    state: State = START  # of its output
    r_in: int = 1  # the largest RF of its inputs, and the first input's jump
    j_in: int = 1
    window: Window | None = None  # the window the formula applied here
    shared_with: int | None = None

    def add(self, name: str, cost: int | None, geom: Geometry | None) -> None:
        if cost is None:
            self.uncounted.append(name)
        else:
            self.ops[name] = self.ops.get(name, 0) + cost
        self.geom = self.geom or geom


class Tracer(TorchFunctionMode):
    """One forward pass: leaf module calls (hooks) and the ops outside them (this mode) become rows."""

    def __init__(self, model: nn.Module, cost: Cost) -> None:
        super().__init__()
        self.model, self.cost = model, cost
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
        self.frames.append(Row(self.names.get(id(module)) or type(module).__name__, type(module).__name__, module,
                               label(module)))

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
                    row = Row(f"{owner + '.' if owner else ''}forward: {name}", name, None, _op_label(name, args, kwargs))
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
        states = [self.states[id(t)][1] for t in data] or [START]
        r, j, glob, flat, row.window = step(states, row.geom, x, y, adaptive=bool(names & ADAPTIVE),
                                            reduce=bool(names & REDUCE), passes=names <= RESHAPE | IDENTITY)
        row.r_in, row.j_in = max(st.r for st in states), states[0].j
        row.state = State(r, j, glob, flat, states[0].row)
        row.input_shape = list(x.shape) if x is not None else None
        row.output_shape = list(y.shape) if y is not None else None
        for t in ys:
            self.states[id(t)] = (t, State(r, j, glob, flat, index))
        self.rows.append(row)
