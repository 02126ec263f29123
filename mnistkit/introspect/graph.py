"""A model's data flow as a small graph for the write-up's architecture diagram: the nodes are
the summary's leaf layers and the functional ops between them (``x + y``, ``torch.cat``), the
edges what feeds what, read with ``torch.fx``. A model fx cannot trace (data-dependent control
flow) is drawn as the chain of its summary's rows, and says so."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = ["Node", "ModelGraph", "model_graph"]

MAX_NODES = 300


@dataclass(frozen=True)
class Node:
    id: str
    op: str                # input, output, layer (a summary row), or a function's name (add, cat, ...)
    layer: int | None      # the summary row of a layer node
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class ModelGraph:
    nodes: tuple[Node, ...]
    traced: bool  # False: fx could not trace the model, drawn as the chain of its layers
    why: str = ""


def model_graph(model: nn.Module, summary: Any) -> ModelGraph:
    """The graph of ``model``; ``summary`` (``mnistkit.summarize(model)``) gives the labels."""
    layers = {layer.name: layer for layer in summary.layers}
    try:
        import torch.fx

        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any failure of tracing user code means: draw the chain
        chain = [Node("input", "input", None, ())]
        for layer in summary.layers[:MAX_NODES]:
            chain.append(Node(f"n{layer.index}", "layer", layer.index, (chain[-1].id,)))
        return ModelGraph(tuple(chain), False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    nodes: list[Node] = []
    ids: dict[str, str] = {}
    for n in graph.nodes:
        if len(nodes) >= MAX_NODES:
            break
        inputs = tuple(ids[a.name] for a in n.all_input_nodes if a.name in ids)
        layer = None
        if n.op in ("placeholder", "output"):
            op = "input" if n.op == "placeholder" else "output"
        elif n.op == "call_module" and str(n.target) in layers:
            op, layer = "layer", layers[str(n.target)].index
        elif n.op == "get_attr":
            continue
        else:
            op = str(getattr(n.target, "__name__", n.target))
        ids[n.name] = re.sub(r"\W", "_", n.name)
        nodes.append(Node(ids[n.name], op, layer, inputs))
    return ModelGraph(tuple(nodes), True)
