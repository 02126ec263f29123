"""The shape of the code, checked: data flows cli -> library -> render, never back, and the
library's module-level imports form no cycle."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "mnistkit"


def imports(path: Path, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mnistkit"):
            if node.module == "mnistkit":
                found |= {f"mnistkit.{a.name}" for a in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("mnistkit")}
    return {m for m in found if (PKG / (m.split(".", 1)[1] + ".py")).exists()} if found else set()


def test_no_library_module_imports_cli_or_render():
    for path in PKG.glob("*.py"):
        if path.stem in ("cli", "__main__", "render"):
            continue
        bad = imports(path, top_level_only=False) & {"mnistkit.cli", "mnistkit.render"}
        assert not bad, f"{path.name} imports {bad}"


def test_module_level_imports_have_no_cycle():
    graph = {f"mnistkit.{p.stem}": imports(p, top_level_only=True) for p in PKG.glob("*.py")}
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


def test_mnistkits_sgd_calls_torchs_update_once_even_after_a_torch_sgd_was_made():
    # a torch.optim.SGD made first wraps SGD.step in its profiling hook; ours must still reach
    # the update itself (no double hooks, no dynamo wrapper)
    import subprocess
    import sys

    code = ("import torch; torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1); "
            "from mnistkit.training import SGD; f = SGD._sgd_step; "
            "print(f.__code__.co_filename.endswith('sgd.py'), getattr(f, 'hooked', False))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True False"
