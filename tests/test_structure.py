"""The package's shape: no import cycle (module-level or inside functions), no file over 500 lines,
hook names built in one place (the vocabulary module)."""

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("workbench", "hooks")
MAX_LINES = 500
VOCABULARY = "workbench/hook_names.py"
# Files another branch (issue 21, the widgets) is converting to hook_names.act_name; remove each entry
# once it lands. Listed by name so that any NEW hand-built name elsewhere fails.
PENDING_ELSEWHERE: set = set()


def _modules() -> dict:
    """Dotted module name -> path, for every .py file under the packages."""
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            rel = path.relative_to(REPO).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: pathlib.Path, known: dict) -> dict:
    """Internal modules imported by ``module`` (anywhere in the file) -> line of the first import.

    ``import a.b.c`` / ``from a.b import c`` also run the ``__init__`` of the packages ``a`` and
    ``a.b``, so those count as edges too — except the packages ``module`` itself belongs to, which
    are already being imported when it runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    targets = {}

    def add(name: str, line: int) -> None:
        parts = name.split(".")
        for i in range(1, len(parts) + 1):
            prefix = ".".join(parts[:i])
            if prefix in known and prefix != module and not module.startswith(prefix + "."):
                targets.setdefault(prefix, line)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node)
            add(base, node.lineno)
            for alias in node.names:                       # "from . import offload" imports a module
                add(f"{base}.{alias.name}", node.lineno)
    return targets


def _graph() -> dict:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_graph_is_built_from_real_imports():
    graph = _graph()
    assert "workbench.hook_points" in graph["workbench.model"]
    assert "workbench.model" in graph["workbench.analysis.logit_lens"]
    assert "workbench.hook_names" in graph["hooks.patch"]
    # the checker sees a cycle when there is one
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {}}) == [["a", "b", "c"]]


def test_no_import_cycle():
    cycles = _cycles(_graph())
    assert cycles == [], f"import cycles (counting imports inside functions): {cycles}"


def test_no_private_imports_across_modules():
    graph_modules = _modules()
    bad = []
    for module, path in graph_modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = _resolve(module, path.name == "__init__.py", node)
                if base.split(".")[0] not in PACKAGES:
                    continue
                bad += [f"{path.relative_to(REPO)}:{node.lineno} {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert bad == []


@pytest.mark.parametrize("pkg", PACKAGES)
def test_no_file_over_500_lines(pkg):
    long = {str(p.relative_to(REPO)): n for p in (REPO / pkg).rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_hook_names_built_only_in_the_vocabulary():
    offenders = []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            rel = str(path.relative_to(REPO))
            if rel == VOCABULARY or rel in PENDING_ELSEWHERE:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if 'f"blocks.{' in line or "f'blocks.{" in line:
                    offenders.append(f"{rel}:{n}")
    assert offenders == [], "build hook names with workbench.hook_names.act_name / block_name"
