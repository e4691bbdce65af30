"""docs/architecture.md's module table against the code: every module has a row, and a row's
"depends on" names every freelm module its files import at run time (at the top or lazily;
imports under ``if TYPE_CHECKING:`` are annotations, not dependencies)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from repo_paths import REPO

DOC = REPO / "docs" / "architecture.md"


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
    target = REPO / path
    return sorted(target.rglob("*.py")) if target.is_dir() else [target]


def module_name(file: Path) -> str:
    parts = list(file.relative_to(REPO / "freelm").with_suffix("").parts)
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
    missing = [str(f.relative_to(REPO)) for f in sorted((REPO / "freelm").rglob("*.py")) if f not in documented]
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
                            f"{f.relative_to(REPO)} imports freelm.{name}, not in the row's 'depends on' ({deps})"
                        )
    assert not wrong, f"{DOC.name}:\n" + "\n".join(wrong)


# --------------------------------------------------------------------------- layers


def layers() -> tuple[dict[str, int], dict[str, set[str]]]:
    """The doc's "Layers" table: each listed module's rank, and what each must never import."""
    section = DOC.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    rank: dict[str, int] = {}
    never: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].isdigit():
            continue
        for name in re.findall(r"`([\w.]+)`", cells[2]):
            rank[name] = int(cells[0])
        for rule in filter(None, (r.strip() for r in re.sub(r"\([^)]*\)", "", cells[3]).split(";"))):
            subject, _, banned = rule.rpartition(":")  # "`evaluation`: `backends`, ..." or just "`run`"
            for name in re.findall(r"`([\w.]+)`", subject or cells[2]):
                never.setdefault(name, set()).update(re.findall(r"`([\w.]+)`", banned))
    return rank, never


def owner(name: str, table: dict[str, object]) -> str | None:
    """The entry of ``table`` that ``name`` (a dotted module below freelm) falls under: itself or a package of it."""
    parts = name.split(".")
    return next((".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in table), None)


def import_graph() -> dict[str, set[str]]:
    """Every freelm module (dotted, below freelm) and the freelm modules it imports at run time."""
    graph = {}
    for file in sorted((REPO / "freelm").rglob("*.py")):
        name = module_name(file)
        if name:  # freelm/__init__.py: the package docstring
            graph[name] = imported(file)
    return graph


def layer_violations(graph: dict[str, set[str]], rank: dict[str, int], never: dict[str, set[str]]) -> list[str]:
    """Modules without a layer, imports of a higher layer and imports a row forbids."""
    out = []
    for module, names in sorted(graph.items()):
        mine = owner(module, rank)
        if mine is None:
            out.append(f"freelm.{module} has no layer")
            continue
        for name in sorted(names):
            theirs = owner(name, rank)
            if theirs is not None and rank[theirs] > rank[mine]:
                out.append(f"freelm.{module} (rank {rank[mine]}) imports freelm.{name} (rank {rank[theirs]}): upward")
            banned = never.get(owner(module, never) or "", set())
            if owner(name, dict.fromkeys(banned)) is not None:
                out.append(f"freelm.{module} imports freelm.{name}: its layer never imports {sorted(banned)}")
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of ``graph`` (its strongly connected components of more than one module, or a self-loop)."""
    known = set(graph)

    def target(name: str) -> str | None:  # "cleaners.registry.setting" is not a module: its module is
        return owner(name, dict.fromkeys(known))

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for name in graph[node]:
            nxt = target(name)
            if nxt is None:
                continue
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or any(target(n) == node for n in graph[node]):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer_and_imports_point_down():
    rank, never = layers()
    assert {"backends", "loop", "run", "evaluation", "demo", "free"} <= set(rank), "the Layers table is not read"
    assert rank["free"] < rank["backends"] < rank["loop"] < rank["run"] < rank["demo"]
    assert never["evaluation"] >= {"backends", "loop"} and never["backends"] == {"run"}
    problems = layer_violations(import_graph(), rank, never)
    assert not problems, f"{DOC.name}, Layers:\n" + "\n".join(problems)


def test_no_import_circle_in_freelm():
    assert circles(import_graph()) == []


def test_the_checks_fail_on_an_upward_import_a_forbidden_one_and_a_circle():
    """Each rule would catch a new offender (the graphs are made up; the table is the doc's)."""
    rank, never = layers()
    upward = {"backends.sglang": {"run.spec"}, "records": {"demo.task"}, "loop": {"backends.base"}}
    assert layer_violations(upward, rank, never) == [
        "freelm.backends.sglang (rank 2) imports freelm.run.spec (rank 5): upward",
        "freelm.backends.sglang imports freelm.run.spec: its layer never imports ['run']",
        "freelm.records (rank 1) imports freelm.demo.task (rank 7): upward",
    ]
    forbidden = layer_violations({"evaluation.grade": {"loop"}, "nowhere": set()}, rank, never)
    assert forbidden == [
        "freelm.evaluation.grade imports freelm.loop: its layer never imports "
        "['backends', 'cleaners', 'loop', 'run', 'training']",
        "freelm.nowhere has no layer",
    ]
    assert circles({"a": {"b.x"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"a"}}) == [["a"]] and circles({"a": {"b"}, "b": set()}) == []
