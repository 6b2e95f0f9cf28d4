"""The package as a whole: one import name (vjepa_fast, with its kernels and data pipelines as subpackages), the
shipped configs, and no import circles between its modules."""
import ast
import os
import subprocess
import sys
from pathlib import Path

from vjepa_fast.config import CONFIG_DIR, load_config

PACKAGE = Path(__file__).resolve().parents[1] / "vjepa_fast"


def _modules() -> dict[str, Path]:
    """Every module of the package (through the links to kernels/ and dali_pipelines/), by dotted name."""
    modules = {}
    paths = [Path(folder) / f for folder, _, files in os.walk(PACKAGE, followlinks=True) for f in files]
    for path in sorted(p for p in paths if p.suffix == ".py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("vjepa_fast", *parts))
        modules[name.removesuffix(".__init__")] = path
    return modules


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` but those under `if TYPE_CHECKING:` (imports for annotations, never run)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            yield from (n for child in node.orelse for n in [child, *_runtime_nodes(child)])
            continue
        yield node
        yield from _runtime_nodes(node)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that `name` imports anywhere in its code (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from X import y` imports X.y when y is a module, else X
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules and t != name}
    return found


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, on_stack, stack, out, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert "vjepa_fast.kernels.pack_tokens" in graph and "vjepa_fast.dali_pipelines.loader" in graph
    assert "vjepa_fast.model" in graph["vjepa_fast.checkpoint"]  # the walk sees imports at all
    assert _cycles(graph) == []


def test_the_recorder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_vjepa_fast_name_is_imported():
    """Every module imports the kernels, the data pipelines and the benchmark code as vjepa_fast subpackages: no
    top-level `kernels` (a PyPI package of that name exists), `dali_pipelines` or `bench` gets loaded."""
    code = ("import importlib, sys\n"
            f"for name in {sorted(_modules())!r}:\n"
            "    if not name.endswith('__main__'):\n"
            "        importlib.import_module(name)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('kernels', 'dali_pipelines', 'bench')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PACKAGE.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_shipped_configs_load_by_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"demo", "vitl16", "vith16", "vith16_384", "synthetic_gpu"} <= set(names)
    for name in names:
        assert load_config(name).name == name
