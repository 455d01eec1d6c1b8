"""The code a script depends on, derived from its imports: a stage's code deps in dvc.yaml, and
the code a result's provenance digests (a pipeline result: its stage and every stage upstream of
it; a benchmark: its own script).

Derived, never listed by hand: editing a module reruns (or marks stale) exactly what imports it,
lazy imports included. Only the standard library and the stage declarations are used here, so
``freezecache.tooling.render`` and ``freezecache.reporting.provenance`` can both read it.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]  # the repository (src/freezecache/..)
PACKAGE = "freezecache"
LAUNCHER = f"src/{PACKAGE}/pipeline/launch.py"  # what a launched stage's command runs first
# The code that records where a result came from: imported by every producer, it changes no
# result, so a result's provenance neither digests nor follows it.
PROVENANCE_CODE = frozenset(
    f"src/{PACKAGE}/{m}.py" for m in ("pipeline/deps", "reporting/provenance", "tooling/results")
)


def _module_file(name: str, src: Path) -> Path | None:
    """The file of module ``name`` (``freezecache.x.y``) under ``src``, or None."""
    base = src.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _for_type_checkers(node: ast.AST) -> bool:
    """An ``if TYPE_CHECKING:`` block: imports that never run."""
    test = getattr(node, "test", None)
    name = test.id if isinstance(test, ast.Name) else getattr(test, "attr", None)
    return isinstance(node, ast.If) and name == "TYPE_CHECKING" and not node.orelse


def _nodes(tree: ast.AST):
    """Every node of ``tree`` except those under ``if TYPE_CHECKING:``."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        todo.extend(c for c in ast.iter_child_nodes(node) if not _for_type_checkers(c))


def _imports(file: Path, src: Path) -> set[str]:
    """Project modules ``file`` imports anywhere (lazy imports in functions included, imports
    for type checkers only left out), plus modules named in strings such as a registry's
    ``"freezecache.models.vit:deit_tiny"``."""
    stat = file.stat()
    return _imports_of(file, src, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _imports_of(file: Path, src: Path, mtime_ns: int, size: int) -> frozenset[str]:
    """:func:`_imports` of one version of a file (``results status`` asks about every file
    again for each result: parsed once)."""
    tree = ast.parse(file.read_text(), str(file))
    found: set[str] = set()
    package = (
        file.parent.relative_to(src).as_posix().replace("/", ".") if src in file.parents else ""
    )
    for node in _nodes(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import inside the package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            m = re.fullmatch(rf"({PACKAGE}(?:\.\w+)+)(?::\w+)?", node.value)
            names = [m.group(1)] if m else []
        for name in names:
            if name == PACKAGE or name.startswith(PACKAGE + "."):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):  # a.b.c imports a and a.b too
                    if _module_file(".".join(parts[:i]), src):
                        found.add(".".join(parts[:i]))
    return frozenset(found)


def _siblings(file: Path) -> set[Path]:
    """Helper scripts next to ``file`` that it imports (``stages/_env.py``,
    ``benchmarks/benchlib.py``): not a package, found by file name."""
    found = set()
    for node in ast.walk(ast.parse(file.read_text(), str(file))):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names = [node.module]
        for name in names:
            local = file.parent / f"{name}.py"
            if "." not in name and local.is_file():
                found.add(local.resolve())
    return found


def code_files(script: Path, root: Path = ROOT, skip: frozenset[str] = frozenset()) -> list[str]:
    """The script, the helpers next to it that it imports and every project module they
    import, transitively, as repository paths (one per file); ``skip``: repository paths
    neither listed nor followed."""
    src, top = root / "src", root.resolve()
    script = script.resolve()
    files = {script}
    todo = [script]
    while todo:
        file = todo.pop()
        found = {_module_file(n, src).resolve() for n in _imports(file, src)}
        if src.resolve() not in file.parents:  # a script's own helpers, not the library's
            found |= _siblings(file)
        for f in found - files:
            if f.relative_to(top).as_posix() not in skip:
                files.add(f)
                todo.append(f)
    return sorted(f.relative_to(top).as_posix() for f in files)


def code_deps(script: Path, root: Path = ROOT) -> list[str]:
    """:func:`code_files`, a subpackage whose every module is listed written as its folder."""
    return _compact(code_files(script, root), root)


def _compact(files: list[str], root: Path) -> list[str]:
    """A subpackage whose every module is listed becomes its folder (shorter, same meaning)."""
    out = list(files)
    for pkg in sorted((root / "src" / PACKAGE).glob("*/__init__.py")):
        folder = pkg.parent.relative_to(root).as_posix()
        members = sorted(p.relative_to(root).as_posix() for p in pkg.parent.rglob("*.py"))
        if all(m in out for m in members):
            out = [f for f in out if f not in members] + [folder]
    return sorted(out)


def stage_code(
    name: str, root: Path = ROOT, compact: bool = True, skip: frozenset[str] = frozenset()
) -> list[str]:
    """Stage ``name``'s code deps: its script's (:func:`code_deps`, or one path per file with
    ``compact=False``, less ``skip``) and the launcher for the stages whose command goes
    through it."""
    from freezecache.pipeline import LAUNCHED, STAGES

    script = root / STAGES[name].script
    code = code_deps(script, root) if compact else code_files(script, root, skip)
    return sorted([*code, LAUNCHER] if name in LAUNCHED else code)


_ITEM = re.compile(r"\{(?!paths\.)[a-z_.]+\}")  # a matrix field: {seed}, {first_seed}, {p.prev}


def upstream(name: str) -> list[str]:
    """Stage ``name`` and every stage whose outputs it reads, directly or not, in declaration
    order: an output path equal to a data dep, or inside a dep that is a folder (matrix fields
    match any item: ``{first_seed}`` reads what ``{seed}`` writes)."""
    from freezecache.pipeline import STAGES

    def feeds(dep: str, out: str) -> bool:
        dep, out = _ITEM.sub("{*}", dep), _ITEM.sub("{*}", out)
        return out == dep or out.startswith(dep.rstrip("/") + "/")

    wanted, todo = {name}, [name]
    while todo:
        deps = STAGES[todo.pop()].deps
        for other, stage in STAGES.items():
            if other not in wanted and any(
                feeds(d, o.path) for d in deps for o in stage.outs.values()
            ):
                wanted.add(other)
                todo.append(other)
    return [s for s in STAGES if s in wanted]


def stage_params(name: str) -> list[str]:
    """The params keys stage ``name`` lists: its own, and ``distributed`` when its results depend
    on the number of processes (a launched stage that trains)."""
    from freezecache.pipeline import STAGES

    return list(STAGES[name].dvc_params)


def pipeline_params(name: str) -> list[str]:
    """The params keys a pipeline result depends on: those its upstream stages list. ``check``
    lists every section but its output never changes, so it reruns nothing downstream."""
    keys = {k for s in upstream(name) if s != "check" for k in stage_params(s)}
    return sorted(k for k in keys if k.split(".")[0] == k or k.split(".")[0] not in keys)


def pipeline_code(name: str, root: Path = ROOT) -> list[str]:
    """Every file of code a pipeline result depends on: stage ``name``'s and its upstream
    stages' (what a change to reruns it under ``dvc repro``), the provenance code aside."""
    files = {f for s in upstream(name) for f in stage_code(s, root, False, PROVENANCE_CODE)}
    return sorted(files)
