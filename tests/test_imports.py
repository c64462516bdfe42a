"""No import cycle among vqgpt's modules, counting the imports hidden inside functions.

The graph is read from the source with `ast`, not from sys.modules, so an import that only runs on some call
(`from .pipeline import TextToImage` inside a function) counts as much as one at the top of a module. An edge
A -> B means that A can execute B: `import vqgpt.x`, `from . import x` (x a submodule), `from .x import y`, and
`from . import name` (a name defined in the package's __init__), plus the packages above B that A is not
inside of (importing vqgpt.data.shapes runs vqgpt/data/__init__.py first).
"""

import ast
import importlib.util
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "vqgpt"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for the package's modules and those of its subpackages, one level down."""
    base = root / package
    files = {}
    for path in sorted([*base.glob("*.py"), *base.glob("*/*.py")]):
        parts = [package, *path.relative_to(base).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return name in files and files[name].name == "__init__.py"


def _is_inside(module: str, package: str) -> bool:
    return module.startswith(package + ".")


def _is_submodule(name: str, files: dict[str, Path]) -> bool:
    """Is `name` a module rather than a name defined in its package? One of our files, or, inside one of our
    packages, a module installed elsewhere (vqgpt.kernels maps to the top-level kernels/ folder)."""
    if name in files:
        return True
    if not _is_package(name.rpartition(".")[0], files):
        return False  # a name of a plain module, or of a package that is not ours
    try:
        return importlib.util.find_spec(name) is not None  # imports the package itself, not the name
    except (ImportError, ValueError):
        return False


def _targets(module: str, node: ast.Import | ast.ImportFrom, files: dict[str, Path]) -> list[str]:
    """The modules an import statement in `module` names: `import a.b` names a.b; `from B import n` names
    B.n when that is a module, else B itself (n is a name of B's namespace). Relative bases are resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module if _is_package(module, files) else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{a.name}" if _is_submodule(f"{base}.{a.name}", files) else base for a in node.names]


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, dict[str, int]]:
    """module -> {module it can execute: line of the first import that does}, over our modules only."""
    files = module_files(root, package)
    graph: dict[str, dict[str, int]] = {}
    for module, path in files.items():
        edges = graph.setdefault(module, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in _targets(module, node, files):
                parts = target.split(".")
                above = [".".join(parts[:i]) for i in range(1, len(parts))]
                # the target itself, and each package above it that `module` is not already inside of
                for name in [target] + [p for p in above if not _is_inside(module, p)]:
                    if name in files and name != module:
                        edges.setdefault(name, node.lineno)
    return graph


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle for each strongly connected component that has one (Tarjan), as a closed path [a, b, ..., a]."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
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
            if len(component) > 1 or v in graph.get(v, {}):
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(sorted(c), graph) for c in components]


def _cycle_in(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest closed path through the component's first module: breadth-first search inside it."""
    start, members = component[0], set(component)
    parent: dict[str, str | None] = {start: None}
    queue = [start]
    for v in queue:
        for w in sorted(graph[v]):
            if w == start:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w in members and w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle through {start} in {component}")


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    """'a -> b -> a', then one line per step with the line of the import that makes it."""
    steps = [f"  {a} -> {b}  (line {graph[a][b]} of {a})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def test_vqgpt_has_no_import_cycle():
    graph = import_graph()
    assert "vqgpt.pipeline" in graph and "vqgpt.tokenizer" in graph["vqgpt.pipeline"]  # the graph is read at all
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among vqgpt's modules:\n" + "\n".join(describe(c, graph) for c in cycles)


# --- the detector itself, on a package made for it -----------------------------------------------------------
def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_detector_finds_a_cycle_hidden_in_a_function(tmp_path):
    _write(
        tmp_path,
        {
            "cyc/__init__.py": "",
            "cyc/a.py": "from .b import f\n",
            "cyc/b.py": "def f():\n    if True:\n        from cyc.c import g\n",
            "cyc/c.py": "def g():\n    from . import a\n",
            "cyc/d.py": "import cyc.a\n",
        },
    )
    graph = import_graph(tmp_path, "cyc")
    assert graph["cyc.b"] == {"cyc.c": 3} and graph["cyc.c"] == {"cyc.a": 2} and graph["cyc.d"] == {"cyc.a": 1}
    cycles = find_cycles(graph)
    assert cycles == [["cyc.a", "cyc.b", "cyc.c", "cyc.a"]]
    assert "cyc.c -> cyc.a  (line 2 of cyc.c)" in describe(cycles[0], graph)


def test_detector_reads_package_names_and_parent_packages(tmp_path):
    """`from cyc import name` reads cyc/__init__.py unless name is a submodule; importing cyc.sub.x runs
    cyc/sub/__init__.py too, unless the importer is inside cyc.sub."""
    _write(
        tmp_path,
        {
            "cyc/__init__.py": "from .tok import Tok\nVERSION = 1\n",
            "cyc/tok.py": "def save():\n    from .hub import card\n",
            "cyc/hub.py": "def card():\n    from cyc import VERSION\n",
            "cyc/sub/__init__.py": "from .x import y\n",
            "cyc/sub/x.py": "from . import z\nfrom .z import w\n",
            "cyc/sub/z.py": "w = 1\n",
            "cyc/user.py": "from cyc import tok\nfrom cyc.sub.x import y\n",
        },
    )
    graph = import_graph(tmp_path, "cyc")
    assert graph["cyc.hub"] == {"cyc": 2}  # VERSION is a name of the package, not a module
    assert graph["cyc.user"] == {"cyc.tok": 1, "cyc.sub": 2, "cyc.sub.x": 2}
    assert graph["cyc.sub.x"] == {"cyc.sub.z": 1}  # inside cyc.sub: its __init__ is not run again
    assert find_cycles(graph) == [["cyc", "cyc.tok", "cyc.hub", "cyc"]]


def test_detector_passes_a_tree_without_cycles(tmp_path):
    _write(tmp_path, {"cyc/__init__.py": "", "cyc/a.py": "import os\nfrom .b import f\n", "cyc/b.py": "f = 1\n"})
    assert find_cycles(import_graph(tmp_path, "cyc")) == []
