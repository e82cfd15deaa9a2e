"""``ckptguard doctor CKPT [--model module:factory] [--config today.yaml] [--strict]``.

Rot found before a resume, not after. Builds the current code's objects with the factory (an
``nn.Module`` or a ``TrainState``; the module may be a name, imported from the current directory
too as ``python -c`` would, or a ``.py`` path, whose folder is put on ``sys.path`` as ``python
file.py`` would) and reports what would go wrong when
they resume from CKPT: storage integrity, keys and shapes, behaviour on the probe batch,
optimizer and scheduler drift, RNG, environment, and config drift key by key (today's config from
``--config FILE`` (YAML or JSON), else from the factory's ``TrainState(config=...)``).

Exit codes: 0 no error finding (with ``--strict``: no warning either); 1 at least one error
finding (with ``--strict``: or a warning), for CI gates; 2 bad input (missing path, a factory
that cannot be imported or raises, an unreadable config file, wrong arguments).
"""

from __future__ import annotations

import argparse
from typing import Any

from rich.table import Table

from ckptguard.cli.common import add_json_flag, check_target, console, print_json

_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


def register(sub: Any) -> None:
    p = sub.add_parser(
        "doctor", help="check a checkpoint against the current code and config before resuming",
        description="Exit 0: no error finding; 1: an error finding (--strict: or a warning); 2: bad input.",
    )
    p.add_argument("ckpt", help="checkpoint directory (RUN/step-000001200) or a run (its newest)")
    p.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                   help="factory returning an nn.Module or a ckptguard.TrainState (module name or file.py)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="today's config (YAML or JSON), compared key by key with the checkpoint's config.yaml")
    p.add_argument("--strict", action="store_true", help="exit 1 on warnings too (for CI gates)")
    add_json_flag(p)
    p.set_defaults(func=run)


def render(report: Any, strict: bool = False) -> None:
    c = console()
    c.print(f"[bold]doctor[/] {report.checkpoint} (step {report.step})", highlight=False)
    if not report.findings:
        c.print("[green]no findings: the current code resumes this checkpoint as it was saved[/]")
        return
    t = Table(show_lines=True)
    for col in ("severity", "code", "finding"):
        t.add_column(col, overflow="fold")
    for f in report.findings:
        body = f.message + "".join(f"\n  - {d}" for d in f.details[:12])
        if len(f.details) > 12:
            body += f"\n  ... {len(f.details) - 12} more"
        t.add_row(f"[{_STYLE[f.severity]}]{f.severity}[/]", f.code, body)
    c.print(t)
    n_err, n_warn = len(report.errors), len(report.warnings)
    if n_err:
        verdict = "[bold red]do not resume as is[/]"
    elif n_warn:
        verdict = "[bold red]warnings fail --strict[/]" if strict else "[yellow]resumable, read the warnings[/]"
    else:
        verdict = "[green]resumable[/]"
    c.print(f"{n_err} error(s), {n_warn} warning(s), {len(report.findings) - n_err - n_warn} note(s): {verdict}")


def run(args: argparse.Namespace) -> int:
    from ckptguard.capture.configdrift import load_config_file
    from ckptguard.verification.doctor import build_current, doctor

    check_target(args.ckpt, want="checkpoint")
    config = load_config_file(args.config) if args.config is not None else None
    current = build_current(args.model) if args.model is not None else None
    source = f"--config {args.config}" if args.config is not None else "today's config"
    if args.json:
        report = doctor(args.ckpt, current, config=config, config_source=source)
        print_json({**report.to_json(), "strict": args.strict,
                    "exit_code": 0 if report.ok and not (args.strict and report.warnings) else 1})
    else:
        with console().status(f"examining {args.ckpt} (every byte is checked)"):
            report = doctor(args.ckpt, current, config=config, config_source=source)
        render(report, args.strict)
    if not report.ok:
        return 1
    return 1 if args.strict and report.warnings else 0
