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
