"""The package's shape (issue 34): no class over 250 lines, and CLAUDE.md's layout names every module."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_CLASS_LINES = 250


def test_no_class_is_longer_than_250_lines():
    long = []
    for path in sorted((ROOT / "utils").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES:
                long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"classes over {MAX_CLASS_LINES} lines: {long}; move what is not the class's own job out"


def test_the_contributors_guide_lists_every_module():
    guide = (ROOT / "CLAUDE.md").read_text()
    layout = guide[guide.index("## Layout"):guide.index("## Running things")]
    missing = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "utils").rglob("*.py"))
               if path.name != "__init__.py" and path.name not in layout]
    assert not missing, f"CLAUDE.md's layout does not name {missing}: add one sentence each"


def _package_imports() -> dict:
    """module -> the package's modules it imports, lazy imports inside functions included (packages' __init__
    files are left out: they only re-export)."""
    modules = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in sorted((ROOT / "utils").rglob("*.py"))
               if p.name != "__init__.py"}
    graph = {}
    for name, path in modules.items():
        package = name.rsplit(".", 1)[0].split(".")
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("utils")):
                continue
            base = ".".join(package[:len(package) - node.level + 1] + [node.module] if node.module else
                            package[:len(package) - node.level + 1]) if node.level else node.module
            targets |= {base} | {f"{base}.{alias.name}" for alias in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph, state, cycles = _package_imports(), {}, []

    def visit(name, trail):
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles}"
    assert "utils.training.trainer" in graph["utils.training.engine"]  # the graph is read at all
