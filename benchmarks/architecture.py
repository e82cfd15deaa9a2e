"""The architecture in figures, read from the source (nothing of the package is imported).

    python benchmarks/architecture.py                      # this tree's src/ckptguard
    python benchmarks/architecture.py --src OTHER/src/ckptguard   # another tree, e.g. a `git archive` of main

Prints modules per folder, import arrows, import circles, floors (the longest import chain),
upward imports, the ten longest functions and the top-level names of ``ckptguard``. The model and
the rules are those of ``tests/test_architecture.py``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def load_rules() -> ModuleType:
    path = ROOT / "tests" / "test_architecture.py"
    spec = importlib.util.spec_from_file_location("test_architecture", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


# Modules of the flat layout (before the subpackages) whose name changed when they moved.
RENAMED = {"demo": "cli", "dcp_io": "distributed", "distributed": "distributed", "verification": "verification"}


def place_flat_modules(arch: ModuleType, pkg: Any) -> None:
    """On a tree before the layout, put each top-level module on the floor of the folder it moved to."""
    here = arch.load_package(ROOT / "src" / "ckptguard")
    moved = {m.rsplit(".", 1)[-1]: arch.folder(here, m) for m in here.modules if m.count(".") == 2}
    for module in pkg.modules:
        name = arch.folder(pkg, module)
        if name and not (pkg.files[module].parent / name).is_dir():
            pkg.placed[module] = RENAMED.get(name, moved.get(name, name))


def report(src: Path, top: int) -> None:
    arch = load_rules()
    pkg = arch.load_package(src)
    flat = sorted(arch.folder(pkg, m) for m in pkg.modules if m.count(".") == 1 and not (src / arch.folder(pkg, m)).is_dir())
    graph = arch.arrows(pkg)
    per_folder = Counter(arch.folder(pkg, m) or "(root)" for m in pkg.modules if m.count(".") != 1 or (src / arch.folder(pkg, m)).is_dir())
    print(f"modules: {len(pkg.modules)} ({sum(pkg.lines.values())} lines)")
    print(f"  at the top of the package: {len(flat)} ({', '.join(flat)})")
    print("  per folder (with its __init__): " + ", ".join(f"{f} {n}" for f, n in sorted(per_folder.items())))
    place_flat_modules(arch, pkg)
    print(f"import arrows: {sum(len(v) for v in graph.values())}")
    groups = arch.circles(graph)
    print(f"import circles: {len(groups)}")
    for group in groups:
        print("  " + " <-> ".join(group))
    depth, chain = arch.floors(graph)
    print(f"floors (longest import chain, a circle counts once): {depth}")
    print("  " + " -> ".join(chain))
    upward = arch.upward_imports(pkg)
    print(f"upward imports: {len(upward)}")
    for imp in upward:
        print(f"  {imp.importer} -> {imp.target} (line {imp.line})")
    broken = {
        "layer rules": arch.layer_violations(pkg),
        "private names across modules": arch.private_imports(pkg),
        "code at import time": arch.import_time_code(pkg),
        "modules over the line limit": arch.long_modules(pkg),
    }
    for what, found in broken.items():
        print(f"{what}: {len(found)}")
        for line in found:
            print(f"  {line}")
    funcs = arch.functions(pkg)
    over = [f for f in funcs if f[0] > 60]
    print(f"functions: {len(funcs)}, over 60 lines: {len(over)}; the {top} longest:")
    for lines, name in funcs[:top]:
        print(f"  {lines:4d}  {name}")
    names = arch.top_level_names(pkg)
    print(f"top-level names of {pkg.root}: {len(names)}")
    print("  " + ", ".join(names))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT / "src" / "ckptguard", help="the package folder to read")
    parser.add_argument("--top", type=int, default=10, help="how many of the longest functions to list")
    args = parser.parse_args()
    report(args.src.resolve(), args.top)


if __name__ == "__main__":
    main()
