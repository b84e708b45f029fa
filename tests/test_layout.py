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


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_imports() -> dict:
    """module -> the package's modules it imports, lazy imports inside functions included. A package's
    ``__init__`` is a node named by the package: importing a subpackage's contract runs its ``__init__``, which
    imports its inner modules."""
    paths = {_module_name(p): p for p in sorted((ROOT / "utils").rglob("*.py"))}
    bound = {name: {alias.asname or alias.name for node in ast.parse(path.read_text()).body
                    if isinstance(node, ast.ImportFrom) for alias in node.names}
             for name, path in paths.items() if path.name == "__init__.py"}  # a package's names: not modules
    graph = {}
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not (node.level or (node.module or "").startswith("utils")):
                continue
            base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            if not node.level:
                base = node.module
            aliases = {f"{base}.{alias.name}" for alias in node.names if alias.name not in bound.get(base, ())}
            targets |= aliases if node.module is None else {base} | aliases  # "from . import x" imports x only
        graph[name] = {t for t in targets if t in paths and t != name}
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


def test_no_module_imports_another_subpackages_inner_module():
    """A subpackage's ``__init__`` is its contract: code outside ``utils/training/<seam>/`` imports the names
    the ``__init__`` exports, never the modules inside, so a seam can rearrange its inside freely."""
    training = ROOT / "utils" / "training"
    seams = {f"utils.training.{p.name}" for p in training.iterdir() if (p / "__init__.py").exists()}
    crossings = []
    for name, targets in _package_imports().items():
        for target in targets:
            seam = next((s for s in seams if target.startswith(s + ".")), None)
            if seam and not (name == seam or name.startswith(seam + ".")):
                crossings.append(f"{name} imports {target}")
    assert not crossings, f"imports of another seam's inner module (import from its __init__ instead): {crossings}"
    assert len(seams) >= 4


def test_the_top_level_of_training_is_small():
    training = ROOT / "utils" / "training"
    modules = [p.name for p in training.glob("*.py") if p.name != "__init__.py"]
    seams = [p.name for p in training.iterdir() if (p / "__init__.py").exists()]
    assert len(modules) <= 15 and len(seams) >= 4, (
        f"utils/training/ holds {len(modules)} modules beside {len(seams)} subpackages: a module belongs in the "
        f"subpackage of its seam")
