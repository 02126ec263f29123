"""Definitions only: the part of a model file mnistkit runs.

A model file is often a whole script: the classes, then `model = Net(); train(model)` with no
`if __name__ == "__main__":` guard. mnistkit runs only what the model needs: the file's imports,
class and function definitions, and the module-level assignments the model uses (found name by
name, through the globals each function refers to, and for a class those its class-level
statements and the methods ``__init__``/``forward`` reach refer to: a ``fit`` method's data
loader is not the model's); every other top-level statement (a call, a loop, a training) is
left out. What only such a statement sets, where the model needs it, is refused in one line;
a module-level value changed in place by a loop or a call (``for c in ...: CHANNELS.append(c)``)
is not seen: set it in one assignment.
"""

from __future__ import annotations

import ast
import symtable
from typing import Any

from mnistkit.errors import ModelCodeError, UsageError

__all__ = ["definitions"]

_DEFS = (ast.Import, ast.ImportFrom, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_SCOPES = (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_ENTRY = ("__init__", "forward", "__call__")   # where a model's methods start; others count where these use them


def _bound(node: ast.stmt) -> set[str]:
    """The module-level names a top-level statement binds or changes (``cfg["w"] = 16`` changes cfg)."""
    if isinstance(node, _SCOPES):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"}
    inner = [getattr(node, f, []) for f in ("body", "orelse", "finalbody")] + [h.body for h in getattr(node, "handlers", [])]
    heads = [node.target] if isinstance(node, (ast.For, ast.AsyncFor, ast.AugAssign, ast.AnnAssign)) else \
        list(getattr(node, "targets", [])) + [i.optional_vars for i in getattr(node, "items", []) if i.optional_vars]
    if not any(inner):   # a simple statement: the names it stores, and the object an attribute or item is set on
        heads += [n for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del))]
    out = set()
    for head in heads:
        while isinstance(head, (ast.Attribute, ast.Subscript, ast.Starred)):
            head = head.value
        out |= {n.id for n in ast.walk(head) if isinstance(n, ast.Name)}
    return out.union(*(_bound(s) for block in inner for s in block))


def _loads(nodes: list[Any]) -> set[str]:
    return {n.id for node in nodes if node is not None for n in ast.walk(node)
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}


def _globals(table: symtable.SymbolTable) -> set[str]:
    """The global names a function or class body (and what it nests) refers to."""
    out = {s.get_name() for s in table.get_symbols() if s.is_global() and s.is_referenced()}
    for child in table.get_children():
        out |= _globals(child)
    return out


def _class_uses(node: ast.ClassDef, table: symtable.SymbolTable | None) -> set[str]:
    """The globals a model class needs: its class-level statements', and its methods' where
    ``__init__``/``forward`` reach them (``self.block(x)``); a ``fit`` or ``train`` method's
    globals (a data loader, an optimizer) are not the model's."""
    methods = {s.name: s for s in node.body if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))}
    tables = {(t.get_name(), t.get_lineno()): t for t in (table.get_children() if table is not None else [])}
    out = _loads([s for s in node.body if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))])
    todo, reached = [m for m in _ENTRY if m in methods], set()
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        reached.add(name)
        fn = methods[name]
        t = tables.get((fn.name, fn.lineno))
        out |= _loads([*fn.decorator_list, *fn.args.defaults, *fn.args.kw_defaults])
        out |= _globals(t) if t is not None else _loads(fn.body)
        todo += [a.attr for a in ast.walk(fn) if isinstance(a, ast.Attribute) and isinstance(a.value, ast.Name)
                 and a.value.id in ("self", "cls", node.name) and a.attr in methods]
    return out


def _plain(node: ast.stmt) -> bool:
    """A statement that only binds names: an assignment, or an if/try made of such statements and
    definitions (``try: import x except ImportError: x = None``), never ``if __name__ == ...``."""
    if isinstance(node, (*_DEFS, ast.Assign, ast.AugAssign, ast.Pass)) or \
            (isinstance(node, ast.AnnAssign) and node.value is not None):
        return True
    if isinstance(node, ast.If):
        return "__name__" not in _loads([node.test]) and all(_plain(s) for s in node.body + node.orelse)
    if isinstance(node, ast.Try):
        return all(_plain(s) for s in node.body + node.orelse + node.finalbody + [s for h in node.handlers
                                                                               for s in h.body])
    return False


def _defines(node: ast.stmt, name: str) -> bool:
    """``node`` defines a class or function ``name`` (itself, or inside an if/try of definitions)."""
    if isinstance(node, _SCOPES):
        return node.name == name
    inner = [getattr(node, f, []) for f in ("body", "orelse", "finalbody")] + [h.body for h in getattr(node, "handlers", [])]
    return isinstance(node, (ast.If, ast.Try)) and any(_defines(s, name) for block in inner for s in block)


def definitions(text: str, path: str, needed: str | None) -> ast.Module:
    """The part of a model file that defines ``needed`` (a top-level class or function; None:
    each of its classes): imports, classes, functions, and the assignments the model uses. A
    name the model needs that only a left-out statement sets is refused in one line, never run."""
    try:
        tree = ast.parse(text, path)
        tables = {(t.get_name(), t.get_lineno()): t for t in symtable.symtable(text, path, "exec").get_children()}
    except SyntaxError as exc:
        raise ModelCodeError(f"importing {path} failed: {path}, line {exc.lineno}: SyntaxError: {exc.msg}") from None
    body = tree.body

    def uses(s: ast.stmt) -> set[str]:
        if isinstance(s, ast.ClassDef):   # what the definition itself evaluates, then what the model's methods use
            return _loads([*s.decorator_list, *s.bases, *(k.value for k in s.keywords)]) | \
                _class_uses(s, tables.get((s.name, s.lineno)))
        if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef)):
            table = tables.get((s.name, s.lineno))
            return _loads([*s.decorator_list, *s.args.defaults, *s.args.kw_defaults]) | \
                (_globals(table) if table is not None else _loads(s.body))
        return _loads([s])

    imported = set().union(set(), *(_bound(s) for s in body if isinstance(s, (ast.Import, ast.ImportFrom))))
    if needed and needed not in imported and any(needed in _bound(s) for s in body) and \
            not any(_defines(s, needed) for s in body):
        raise UsageError(f"{path}: {needed} is a variable, not a class or a function the file defines; mnistkit builds "
                         f"a model from a class or a function (def build(): return ...)", key="model")
    wanted = {needed} if needed else {s.name for s in body if isinstance(s, ast.ClassDef)}
    keep = [isinstance(s, _DEFS) for s in body]
    todo, seen = set(wanted), set()
    while todo:   # what the model needs, name by name
        name = todo.pop()
        seen.add(name)
        for i, s in enumerate(body):
            if name in _bound(s) and _plain(s):
                keep[i] = True
                todo |= uses(s) - seen
    defined = set().union(set(), *(_bound(s) for s, k in zip(body, keep) if k))
    for s, k in zip(body, keep):
        late = sorted((_bound(s) & seen) - defined) if not k else []
        if late:
            raise UsageError(f"{path}, line {s.lineno}: the model needs {late[0]!r}, which only this statement sets; "
                             "mnistkit runs only a model file's imports, classes, functions and the assignments they "
                             "use: set it in an assignment or inside the model", key="model")
    tree.body = [s for s, k in zip(body, keep) if k]
    return tree
