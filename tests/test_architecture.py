"""docs/architecture.md's module table against the code: every module has a row, and a row's
"depends on" names every freelm module its files import at run time (at the top or lazily;
imports under ``if TYPE_CHECKING:`` are annotations, not dependencies)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"


def rows() -> list[tuple[list[str], str]]:
    """(the freelm paths a row is about, its "depends on" cell), for each row naming a freelm path."""
    out = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`freelm/"):
            continue
        paths = [p for p in re.findall(r"`([^`]+)`", cells[0]) if p.startswith("freelm/") and not p.endswith(".txt")]
        out.append((paths, cells[-1]))
    return out


def files(path: str) -> list[Path]:
    target = ROOT / path
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


def module_name(file: Path) -> str:
    parts = list(file.relative_to(ROOT / "freelm").with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(file: Path) -> set[str]:
    """The freelm modules ``file`` imports, as dotted names below ``freelm``."""
    names = set()
    package = module_name(file).rsplit(".", 1)[0] if file.name != "__init__.py" else module_name(file)
    tree = ast.parse(file.read_text())
    type_only = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for n in ast.walk(block)
    }
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("freelm.")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                names.add("freelm." + ".".join(base + ([node.module] if node.module else [])))
            elif node.module and node.module.startswith("freelm"):
                if node.module == "freelm":
                    names |= {f"freelm.{a.name}" for a in node.names}
                else:
                    names.add(node.module)
    return {n.removeprefix("freelm.") for n in names}


def covered(name: str, deps: str, own: set[str]) -> bool:
    """Whether the row's own modules or its "depends on" cell account for ``name``."""
    if any(name == o or name.startswith(o + ".") for o in own):
        return True
    words = set(re.findall(r"[A-Za-z_]\w*(?:\.\w+)*(?:\.\*)?", deps))
    parts = name.split(".")
    prefixes = {".".join(parts[:i]) for i in range(1, len(parts) + 1)}
    return (
        "everything" in words
        or bool(prefixes & words)
        or any(w.endswith(".*") and name.startswith(w[:-1]) for w in words)
    )


def test_every_module_has_a_row():
    documented = {f for paths, _ in rows() for p in paths for f in files(p)}
    missing = [str(f.relative_to(ROOT)) for f in sorted((ROOT / "freelm").rglob("*.py")) if f not in documented]
    assert not missing, f"{DOC.name}: no row holds {missing}"


def test_each_row_names_what_its_modules_import():
    wrong = []
    for paths, deps in rows():
        own = {module_name(f) for p in paths for f in files(p)} | {
            p.removeprefix("freelm/").removesuffix(".py").replace("/", ".") for p in paths
        }
        for p in paths:
            for f in files(p):
                for name in sorted(imported(f)):
                    if not covered(name, deps, own):
                        wrong.append(
                            f"{f.relative_to(ROOT)} imports freelm.{name}, not in the row's 'depends on' ({deps})"
                        )
    assert not wrong, f"{DOC.name}:\n" + "\n".join(wrong)
