"""The shape of the code, checked: data flows cli -> library -> render, never back; speed lives
behind one seam (mnistkit.backends, asked only by the session); no module is a big room; and the
library's module-level imports form no cycle."""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "mnistkit"


def imports(path: Path, top_level_only: bool) -> set[str]:
    """The mnistkit modules ``path`` imports: import statements, and (all levels) module names
    given to ``importlib.import_module`` as string constants."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnistkit"):
            for a in node.names:   # ``from mnistkit.cli import models`` imports the module mnistkit.cli.models
                sub = f"{node.module}.{a.name}"
                found.add(sub if module_path(sub) is not None else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mnistkit")}
        elif (not top_level_only and isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", ""))
              == "import_module" and node.args and isinstance(node.args[0], ast.Constant)
              and str(node.args[0].value).startswith("mnistkit")):
            found.add(node.args[0].value)
    return {m for m in found if module_path(m) is not None}


def module_path(name: str) -> Path | None:
    rel = PKG.joinpath(*name.split(".")[1:])
    for path in (rel.with_suffix(".py"), rel / "__init__.py"):
        if path.exists():
            return path
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(PKG.rglob("*.py"))


# the one exception, stated: a summary printed in a notebook (``print(s)``, Jupyter, ``s.to_markdown()``)
# reaches its table in render, only when printed (importing the summary imports neither Rich nor render)
PRINTS_ITSELF = {"mnistkit.introspect.summary": {"mnistkit.render.models"}}


def test_no_library_module_imports_cli_or_render():
    for path in MODULES:
        name = module_name(path)
        if name.startswith(("mnistkit.cli", "mnistkit.render")) or name == "mnistkit.__main__":
            continue
        bad = {m for m in imports(path, top_level_only=False) if m == "mnistkit.cli" or m.startswith("mnistkit.render")}
        assert not bad - PRINTS_ITSELF.get(name, set()), f"{path.name} imports {bad}"
        assert not bad & set(imports(path, top_level_only=True)), f"{path.name} imports {bad} when imported"


def test_speed_lives_behind_one_seam():
    # the core reaches a backend only through mnistkit.backends.prepare, called by the session;
    # the CLI alone asks for kept memory; the models are plain PyTorch
    for path in MODULES:
        name = module_name(path)
        if name.startswith("mnistkit.backends"):
            continue
        used = {m for m in imports(path, top_level_only=False) if m.startswith("mnistkit.backends")}
        allowed = {"mnistkit.training.session": {"mnistkit.backends"}, "mnistkit.cli.training": {"mnistkit.backends.memory"},
                   "mnistkit.sweeps.sweep": {"mnistkit.backends.memory"}}.get(name, set())
        assert used <= allowed, f"{name} imports {used - allowed}"


def test_no_module_is_over_400_lines_and_training_reads_in_one_sitting():
    sizes = {module_name(p): len(p.read_text().splitlines()) for p in MODULES}
    assert max(sizes.values()) <= 400, {k: v for k, v in sizes.items() if v > 400}
    assert sizes["mnistkit.training.loop"] <= 300


def test_module_level_imports_have_no_cycle():
    graph = {module_name(p): imports(p, top_level_only=True) for p in MODULES}
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in graph.get(node, ()):
            assert state.get(nxt) != 1, " -> ".join(stack + [nxt])
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_recipe_module_does_not_import_torch():
    assert not any(n.startswith("torch") for n in _all_imports(PKG / "recipe.py"))


def _all_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
    return out


@pytest.mark.slow   # starts processes or builds a whole report: not the quick loop's
def test_a_training_run_imports_neither_torchvision_nor_dynamo(tmp_path):
    """torchvision costs a process about a second to import, torch._dynamo 1.3 s (torch's
    optimizer wrappers import it); training needs neither (torchvision only to download)."""
    import subprocess
    import sys

    code = ("import sys; from mnistkit import train, DataOptions, Recipe; "
            f"train('I3', Recipe(epochs=1, batch_size=128), DataOptions('synthetic', limit=256), device='cpu', "
            f"runs_dir={str(tmp_path)!r}); print('torchvision' in sys.modules, 'torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "False False"


@pytest.mark.slow   # starts processes or builds a whole report: not the quick loop's
def test_mnistkits_sgd_calls_torchs_update_once_even_after_a_torch_sgd_was_made():
    # a torch.optim.SGD made first wraps SGD.step in its profiling hook; ours must still reach
    # the update itself (no double hooks, no dynamo wrapper)
    import subprocess
    import sys

    code = ("import torch; torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1); "
            "from mnistkit.training.optim import SGD; f = SGD._sgd_step; "
            "print(f.__code__.co_filename.endswith('sgd.py'), getattr(f, 'hooked', False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True False"


def test_the_module_map_in_the_docs_names_every_module_and_no_other():
    """docs/development.md's map of the package is checked, never trusted to be kept by hand (it
    had drifted: six modules missing, line counts of an older tree): one row per sub-package
    naming each of its modules, one per top-level module."""
    import re

    text = (PKG.parent / "docs" / "development.md").read_text()
    rows = [row.split("|") for row in text.splitlines() if row.startswith("| `")]
    named = {re.findall(r"`([^`]+)`", r[1])[0]: set(re.findall(r"`([^`/]+\.(?:py|c))`", r[2])) for r in rows}
    top = {p.name for p in PKG.glob("*.py")} - {"__init__.py", "__main__.py"}
    packages = {p.name + "/": {f.name for f in p.iterdir() if f.suffix in (".py", ".c") and f.name != "__init__.py"}
                for p in PKG.iterdir() if (p / "__init__.py").is_file()}
    assert set(named) == top | set(packages), "the rows of docs/development.md's map"
    for pkg, modules in packages.items():
        assert named[pkg] == modules, f"docs/development.md's row for {pkg}"


LIBRARY = {"models", "usermodels", "introspect", "data", "training", "runs", "results", "inference", "sweeps",
           "backends"}
# which packages a package may not import (lower layers never reach up): data flows
# cli -> library -> render, and inside the library runs/models/... -> training -> results/inference -> sweeps
NEVER = {
    "files": {"runs", "models", "introspect", "usermodels", "data", "backends", "training", "results", "inference",
              "sweeps"},
    "runs": {"training", "results", "inference", "sweeps", "data", "introspect"},
    "models": {"training", "results", "inference", "sweeps", "data", "usermodels"},
    "introspect": {"training", "results", "inference", "sweeps", "data", "runs"},
    "usermodels": {"training", "results", "inference", "sweeps", "data", "runs"},
    "data": {"training", "results", "inference", "sweeps", "usermodels", "introspect"},
    "training": {"results", "inference", "sweeps"},
    "inference": {"results", "sweeps"},
    "results": {"sweeps"},
}


def test_each_package_imports_only_the_layers_below_it():
    for path in MODULES:
        name = module_name(path)
        parts = name.split(".")
        if len(parts) < 2 or parts[1] not in NEVER:
            continue
        reached = {m.split(".")[1] for m in imports(path, top_level_only=False) - PRINTS_ITSELF.get(name, set())
                   if m.count(".") >= 1}
        bad = reached & (NEVER[parts[1]] | {"cli", "render"})
        assert not bad, f"{name} imports {bad}"


def test_the_layering_check_sees_imports_made_through_importlib(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib\n\ndef f():\n    return importlib.import_module('mnistkit.render.models')\n")
    assert "mnistkit.render.models" in imports(probe, top_level_only=False)
