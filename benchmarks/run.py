"""Run every benchmark in this folder (``make bench`` passes ``--quick``).

Each ``benchmarks/<name>.py`` other than this file is run as a script with the same arguments
and ``PYTHONPATH`` pointing at ``src``; a failing benchmark makes this runner fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    env = dict(os.environ)
    src = str(HERE.parent / "src")
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    failed = []
    for script in sorted(HERE.glob("*.py")):
        if script.name == Path(__file__).name or script.name.startswith("_"):
            continue
        sys.stdout.write(f"== {script.name}\n")
        sys.stdout.flush()
        if subprocess.call([sys.executable, str(script), *argv], env=env) != 0:
            failed.append(script.name)
    if failed:
        sys.stderr.write(f"failed: {', '.join(failed)}\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
