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


MAX_PARAMETERS = 8
# The front door's public signatures (and the previous module's helpers) keep the keywords callers pass.
FRONT_DOOR = {("utils/tier3_training_utilities.py", name) for name in
              ("test_fine_tuning", "test_hyperparameter_search", "_run_validation_epoch", "_compute_loss_and_backward")}


def test_no_function_takes_more_than_8_parameters():
    wide = []
    for path in sorted((ROOT / "utils").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
                count = len(names) - (names[:1] in (["self"], ["cls"])) + bool(args.vararg) + bool(args.kwarg)
                if count > MAX_PARAMETERS and (str(path.relative_to(ROOT)), node.name) not in FRONT_DOOR:
                    wide.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({count})")
    assert not wide, f"functions over {MAX_PARAMETERS} parameters (pass an object holding what goes together): {wide}"


def _top_level_names(path: Path) -> set:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names |= {t.id for t in (target.elts if isinstance(target, ast.Tuple) else [target])
                          if isinstance(t, ast.Name)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_every_name_has_one_import_path():
    """A module imports a name from the module that defines it, or from a seam's ``__init__`` (its contract): no
    module passes on a name it imported, so each name has one home (``to_device`` once had two)."""
    paths = {_module_name(p): p for p in sorted((ROOT / "utils").rglob("*.py"))}
    relayed = []
    for name, path in paths.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.level or not node.module:
                continue
            target = ".".join(package[:len(package) - node.level + 1] + [node.module])
            if target not in paths or paths[target].name == "__init__.py":
                continue
            defined = _top_level_names(paths[target])
            relayed += [f"{name} imports {alias.name} from {target}" for alias in node.names
                        if alias.name not in defined and f"{target}.{alias.name}" not in paths]
    assert not relayed, f"names imported from a module that only passes them on: {relayed}"


def test_no_warning_counts_its_stack_levels():
    """A counted ``stacklevel=N`` breaks when a call is added between the user and the warning:
    ``warn.caller_stacklevel()`` walks the stack to the user's line instead."""
    counted = [f"{path.relative_to(ROOT)}:{node.lineno}" for path in sorted((ROOT / "utils").rglob("*.py"))
               for node in ast.walk(ast.parse(path.read_text()))
               if isinstance(node, ast.keyword) and node.arg == "stacklevel" and isinstance(node.value, ast.Constant)]
    assert not counted, f"counted stacklevels: {counted}; pass stacklevel=caller_stacklevel()"
