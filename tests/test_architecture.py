"""The package layout is the architecture: rules that must keep holding, checked on the source.

The source of ``src/ckptguard`` is parsed with ``ast``; nothing of the package is imported. Every
import counts, wherever it sits in a module (inside functions, under ``if TYPE_CHECKING:``), since
each is a dependency a reader has to follow. ``benchmarks/architecture.py`` prints the figures
(modules per folder, arrows, circles, floors, upward imports, longest functions) from the same model.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "src" / "ckptguard"
MAX_MODULE_LINES = 500

# Folders from the bottom floor up. A module may import its own folder and any folder below it;
# an import of a folder above is "upward". Modules at the top of the package sit on the floor of
# the folder they serve: errors and version are the ground floor, testing sits beside manager.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("errors", "version"),
    ("storage",),
    ("format",),
    ("capture",),
    ("run",),
    ("policies",),
    ("persist",),
    ("verification",),
    ("distributed",),
    ("tiers",),
    ("manager", "testing"),
    ("report",),
    ("integrations",),
    ("cli", "__main__"),
    ("",),  # the package root, ckptguard/__init__.py
)


@dataclasses.dataclass(frozen=True)
class Import:
    """One import statement's dependency of ``importer`` on the module ``target``.

    ``names`` are the names taken from the target (``from target import a, b``); empty for ``import target``.
    """

    importer: str
    target: str
    names: tuple[str, ...]
    line: int
    text: str


@dataclasses.dataclass
class Package:
    """The parsed package: module name -> syntax tree, file and source lines."""

    root: str
    trees: dict[str, ast.Module]
    files: dict[str, Path]
    lines: dict[str, int]
    placed: dict[str, str] = dataclasses.field(default_factory=dict)  # module -> folder, for a tree before the layout

    @property
    def modules(self) -> list[str]:
        return sorted(self.trees)

    def is_module(self, name: str) -> bool:
        return name in self.trees


def module_name(root: str, package_dir: Path, path: Path) -> str:
    parts = list(path.relative_to(package_dir).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([root, *parts])


def load_package(package_dir: Path = PACKAGE_DIR) -> Package:
    """Parse every module under ``package_dir`` (a folder named after the package)."""
    root = package_dir.name
    trees, files, lines = {}, {}, {}
    for path in sorted(package_dir.rglob("*.py")):
        name = module_name(root, package_dir, path)
        source = path.read_text(encoding="utf-8")
        trees[name] = ast.parse(source, filename=str(path))
        files[name] = path
        lines[name] = len(source.splitlines())
    return Package(root, trees, files, lines)


def folder(pkg: Package, module: str) -> str:
    """``ckptguard.persist.writer`` -> ``persist``; ``ckptguard.errors`` -> ``errors``; the root -> ``""``."""
    if module in pkg.placed:
        return pkg.placed[module]
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_package(pkg: Package, module: str) -> bool:
    return pkg.files[module].name == "__init__.py"


def _resolve_from(pkg: Package, importer: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not _is_package(pkg, importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _known_prefix(pkg: Package, dotted: str) -> str | None:
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if pkg.is_module(".".join(parts[:n])):
            return ".".join(parts[:n])
    return None


def imports(pkg: Package, module: str) -> Iterator[Import]:
    """Every import of a module of the package by ``module``, wherever it sits in the file.

    ``from P import n`` depends on the module ``P.n`` when it is one, else on ``P``.
    """
    for node in ast.walk(pkg.trees[module]):
        text = ast.unparse(node) if isinstance(node, (ast.Import, ast.ImportFrom)) else ""
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _known_prefix(pkg, alias.name)
                if target is not None:
                    yield Import(module, target, (), node.lineno, text)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(pkg, module, node)
            if _known_prefix(pkg, source) is None:
                continue
            by_target: dict[str, list[str]] = {}
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                target = sub if pkg.is_module(sub) else _known_prefix(pkg, source)
                assert target is not None
                by_target.setdefault(target, []).append(alias.name)
            for target, names in by_target.items():
                yield Import(module, target, tuple(names) if target == source else (), node.lineno, text)


def all_imports(pkg: Package) -> list[Import]:
    return [imp for m in pkg.modules for imp in imports(pkg, m) if imp.target != m]


def arrows(pkg: Package) -> dict[str, set[str]]:
    """Module -> the modules it imports (each pair once)."""
    graph: dict[str, set[str]] = {m: set() for m in pkg.modules}
    for imp in all_imports(pkg):
        graph[imp.importer].add(imp.target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def floors(graph: dict[str, set[str]]) -> tuple[int, list[str]]:
    """The longest import chain (in modules), on the graph with each circle taken as one module."""
    group_of = {m: m for m in graph}
    for group in circles(graph):
        for m in group:
            group_of[m] = group[0]
    dag: dict[str, set[str]] = {g: set() for g in group_of.values()}
    for v, ws in graph.items():
        dag[group_of[v]].update(group_of[w] for w in ws if group_of[w] != group_of[v])
    best: dict[str, list[str]] = {}

    def chain(v: str) -> list[str]:
        if v not in best:
            tails = [chain(w) for w in sorted(dag[v])]
            best[v] = [v, *max(tails, key=len, default=[])]
        return best[v]

    longest = max((chain(v) for v in sorted(dag)), key=len, default=[])
    return len(longest), longest


def layer(pkg: Package, module: str) -> int:
    name = folder(pkg, module)
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"{module}: folder {name!r} is on no floor of LAYERS in tests/test_architecture.py; add it")


def upward_imports(pkg: Package) -> list[Import]:
    return [imp for imp in all_imports(pkg) if layer(pkg, imp.target) > layer(pkg, imp.importer)]


def functions(pkg: Package) -> list[tuple[int, str]]:
    """(lines, ``module:Class.function``) for every function and method, longest first."""
    found = []
    for module, tree in pkg.trees.items():
        todo: list[tuple[str, ast.AST]] = [("", tree)]
        while todo:
            prefix, node = todo.pop()
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    assert child.end_lineno is not None
                    found.append((child.end_lineno - child.lineno + 1, f"{module}:{prefix}{child.name}"))
                    todo.append((f"{prefix}{child.name}.", child))
                elif isinstance(child, ast.ClassDef):
                    todo.append((f"{prefix}{child.name}.", child))
                else:
                    todo.append((prefix, child))
    return sorted(found, key=lambda f: (-f[0], f[1]))


def top_level_names(pkg: Package) -> list[str]:
    """The names ``import ckptguard`` offers: the root module's ``__all__``."""
    for node in pkg.trees[pkg.root].body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                return sorted(ast.literal_eval(node.value))
    return []


# ---- the rules ---------------------------------------------------------------------------------

LIBRARY_FREE_OF = ("cli", "integrations")
ENTRY_POINTS = ("cli", "integrations", "__main__")  # may import the command line and the integrations
LOWER_FORBIDDEN = {
    # folder -> folders it must not import
    "format": {"storage", "persist", "run", "manager", "distributed", "verification", "policies"},
    "capture": {"storage", "persist", "run", "manager", "distributed", "verification", "policies"},
    "policies": {"persist", "manager"},
}


def _where(pkg: Package, imp: Import) -> str:
    return f"{imp.importer} (line {imp.line}: `{imp.text}`)"


def layer_violations(pkg: Package) -> list[str]:
    found = []
    for imp in all_imports(pkg):
        src, dst = folder(pkg, imp.importer), folder(pkg, imp.target)
        if src == "storage" and dst not in ("storage", "errors"):
            found.append(f"{_where(pkg, imp)}: storage imports nothing of {pkg.root} but {pkg.root}.errors; it imports {imp.target}")
        if dst in LOWER_FORBIDDEN.get(src, ()):
            found.append(f"{_where(pkg, imp)}: {src} must not import {dst} ({imp.target})")
        if dst in LIBRARY_FREE_OF and src not in ENTRY_POINTS:
            found.append(f"{_where(pkg, imp)}: the library must not import {pkg.root}.{dst} ({imp.target}); move what it needs down")
        if imp.target == pkg.root and imp.importer != pkg.root:
            names = ", ".join(imp.names) or pkg.root
            found.append(
                f"{_where(pkg, imp)}: imports {names} from the package root; import it from the module that defines it "
                f"({pkg.root}.version for __version__)"
            )
    return found


def _module_aliases(pkg: Package, module: str) -> dict[str, str]:
    """Local names bound to modules of the package in ``module`` (``import a.b as x``, ``from a import b``)."""
    bound: dict[str, str] = {}
    for node in ast.walk(pkg.trees[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and pkg.is_module(alias.name):
                    bound[alias.asname] = alias.name
                elif alias.asname is None and pkg.is_module(alias.name.split(".")[0]):
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = _resolve_from(pkg, module, node)
            for alias in node.names:
                if pkg.is_module(f"{source}.{alias.name}"):
                    bound[alias.asname or alias.name] = f"{source}.{alias.name}"
    return bound


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_imports(pkg: Package) -> list[str]:
    found = []
    for imp in all_imports(pkg):
        for name in imp.names:
            if _private(name):
                found.append(f"{_where(pkg, imp)}: imports the private {imp.target}.{name}; make it public there or move it")
    for module in pkg.modules:
        aliases = _module_aliases(pkg, module)
        for node in ast.walk(pkg.trees[module]):
            if not isinstance(node, ast.Attribute):
                continue
            chain = [node.attr]
            base = node.value
            while isinstance(base, ast.Attribute):
                chain.insert(0, base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in aliases:
                continue
            target = aliases[base.id]
            for part in chain:
                if pkg.is_module(f"{target}.{part}"):
                    target = f"{target}.{part}"
                    continue
                if _private(part) and target != module:
                    found.append(f"{module} (line {node.lineno}: `{ast.unparse(node)}`): uses the private {target}.{part} of another module")
                break
    return sorted(set(found))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _is_main_guard(test: ast.expr) -> bool:
    return (
        isinstance(test, ast.Compare)
        and isinstance(test.left, ast.Name)
        and test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in test.comparators)
    )


def _imported_names(pkg: Package, module: str) -> set[str]:
    """Local names bound by imports of the package's modules at the top of ``module``."""
    names: set[str] = set()
    for node in pkg.trees[module].body:
        if isinstance(node, ast.ImportFrom) and _known_prefix(pkg, _resolve_from(pkg, module, node)):
            names.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names if _known_prefix(pkg, a.name))
    return names


def _statement_problem(stmt: ast.stmt, imported: set[str]) -> str | None:
    """Why a top-level statement is not a declaration, or None when it is one."""
    if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return None
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str):
        return None
    if isinstance(stmt, ast.If) and _is_type_checking(stmt.test):
        bad = [s for s in stmt.body + stmt.orelse if not isinstance(s, (ast.Import, ast.ImportFrom))]
        return "an `if TYPE_CHECKING:` block holds more than imports" if bad else None
    if isinstance(stmt, ast.If) and _is_main_guard(stmt.test):
        return None  # runs only as a script
    if isinstance(stmt, ast.Try):
        guarded = all(
            h.type is not None and any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in ast.walk(h.type))
            for h in stmt.handlers
        )
        if not guarded or not all(isinstance(s, (ast.Import, ast.ImportFrom)) for s in stmt.body):
            return "a try block at the top level that is not `try: import ... except ImportError:`"
        inner = [p for s in [*stmt.orelse, *stmt.finalbody] + [s for h in stmt.handlers for s in h.body] if (p := _statement_problem(s, imported))]
        return inner[0] if inner else None
    if isinstance(stmt, (ast.Assign, ast.AnnAssign)):
        targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
        for target in targets:
            if not all(isinstance(n, (ast.Name, ast.Tuple, ast.Store)) for n in ast.walk(target)):
                return f"assigns into `{ast.unparse(target)}`: a module's top level binds only its own names"
        for call in (n for n in ast.walk(stmt) if isinstance(n, ast.Call)):
            root = call.func
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in imported:
                return f"calls `{ast.unparse(call.func)}` of another module of the package at import time"
        return None
    if isinstance(stmt, ast.Pass):
        return None
    return f"a `{type(stmt).__name__}` statement runs at import time"


def import_time_code(pkg: Package) -> list[str]:
    found = []
    for module in pkg.modules:
        if module.endswith(".__main__"):
            continue  # the entry point runs by design
        imported = _imported_names(pkg, module)
        for stmt in pkg.trees[module].body:
            problem = _statement_problem(stmt, imported)
            if problem:
                text = ast.unparse(stmt).splitlines()[0]
                found.append(f"{module} (line {stmt.lineno}: `{text}`): {problem}")
    return found


def long_modules(pkg: Package) -> list[str]:
    return [
        f"{m}: {n} lines, the limit is {MAX_MODULE_LINES}; split it by concept"
        for m, n in sorted(pkg.lines.items())
        if n >= MAX_MODULE_LINES
    ]


# ---- the tests ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pkg() -> Package:
    return load_package()


def _fail_on(problems: list[str], what: str) -> None:
    if problems:
        pytest.fail(f"{len(problems)} {what}:\n  " + "\n  ".join(problems), pytrace=False)


def test_no_import_circles(pkg: Package) -> None:
    graph = arrows(pkg)
    problems = []
    for group in circles(graph):
        members = set(group)
        lines = [
            _where(pkg, imp) + f" -> {imp.target}"
            for imp in all_imports(pkg)
            if imp.importer in members and imp.target in members
        ]
        problems.append(" <-> ".join(group) + " through:\n    " + "\n    ".join(lines))
    _fail_on(problems, "import circles (count every import, inside functions and under TYPE_CHECKING too)")


def test_layer_rules(pkg: Package) -> None:
    _fail_on(layer_violations(pkg), "imports against the layer rules")


def test_no_private_names_across_modules(pkg: Package) -> None:
    _fail_on(private_imports(pkg), "private names used across modules")


def test_no_code_runs_at_import_time(pkg: Package) -> None:
    _fail_on(import_time_code(pkg), "top-level statements that are not declarations (no registration at import time)")


def test_modules_are_short(pkg: Package) -> None:
    _fail_on(long_modules(pkg), "modules too long")


def test_every_folder_is_on_a_floor(pkg: Package) -> None:
    for module in pkg.modules:
        assert layer(pkg, module) >= 0


def test_the_checks_see_violations(tmp_path: Path) -> None:
    """The rules catch what they are for, on a small package made to break each one."""
    root = tmp_path / "ckptguard"
    for sub in ("storage", "format", "cli"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("from ckptguard.version import __version__\n")
    (root / "version.py").write_text("__version__ = '1'\n")
    (root / "errors.py").write_text("class E(Exception):\n    pass\n")
    (root / "storage" / "base.py").write_text("from ckptguard.errors import E\nfrom ckptguard.format.codec import _enc\n")
    (root / "format" / "codec.py").write_text(
        "from typing import TYPE_CHECKING\nfrom ckptguard import __version__, E\nimport ckptguard.storage.base as b\n"
        "if TYPE_CHECKING:\n    from ckptguard.cli import main\n"
        "def _enc():\n    return b._hidden\n"
        "b.TABLE['x'] = 1\nb.register()\nX = b.make()\n"
    )
    (root / "cli" / "main.py").write_text("import ckptguard.errors\n" + "x = 1\n" * MAX_MODULE_LINES)
    small = load_package(root)
    assert circles(arrows(small)) == [["ckptguard.format.codec", "ckptguard.storage.base"]]
    assert floors(arrows(small))[0] == 3  # format.codec + storage.base (a circle counts once) -> cli.main -> errors
    layers = "\n".join(layer_violations(small))
    assert "storage imports nothing of ckptguard but ckptguard.errors; it imports ckptguard.format.codec" in layers
    assert "format must not import storage (ckptguard.storage.base)" in layers
    assert "the library must not import ckptguard.cli (ckptguard.cli.main)" in layers
    assert "imports __version__, E from the package root" in layers
    private = "\n".join(private_imports(small))
    assert "imports the private ckptguard.format.codec._enc" in private
    assert "uses the private ckptguard.storage.base._hidden" in private
    top = "\n".join(import_time_code(small))
    assert "assigns into `b.TABLE['x']`" in top
    assert "a `Expr` statement runs at import time" in top
    assert "calls `b.make` of another module" in top
    assert [p.split(":")[0] for p in long_modules(small)] == ["ckptguard.cli.main"]
    upward = [(i.importer, i.target) for i in upward_imports(small)]
    assert ("ckptguard.storage.base", "ckptguard.format.codec") in upward
    assert ("ckptguard.format.codec", "ckptguard.cli.main") in upward
