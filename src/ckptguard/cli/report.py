"""``ckptguard report RUN -o report.html [--model MODULE:FACTORY] [--no-doctor]``: the run on one page.

One self-contained HTML file (no network needed to view it): metric curves with every checkpoint
marked, the sessions and how each ended, the work each failure cost, save cost and interval,
probe drift, environment and config changes, and the doctor's findings for the newest checkpoint.
Exit codes: 0 written (problems found in the run are shown in the page); 2 bad input.
"""

from __future__ import annotations

import argparse
from typing import Any

from ckptguard.cli.common import add_json_flag, console, print_json, require_run


def register(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="write the run as one self-contained HTML page",
        description="Write RUN's report: curves with checkpoint marks, sessions and their ends, the work lost, "
        "save cost, probe drift, environment/config changes, doctor on the newest checkpoint. Replaces -o.",
    )
    p.add_argument("run", help="run directory or URL")
    p.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    p.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                   help="doctor: also check keys, shapes and the probe against this factory's model")
    p.add_argument("--no-doctor", action="store_true", help="skip the doctor (it reads every byte of the newest checkpoint)")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from ckptguard.errors import CheckpointError
    from ckptguard.report.htmlreport import write_report
    from ckptguard.report.runreport import CATEGORY_ORDER, collect_report

    require_run(args.run, "report")
    if os.path.isdir(args.output):
        raise CheckpointError(f"{os.path.abspath(args.output)} is a directory; pass a file name such as report.html.")
    current = None
    if args.model is not None:
        from ckptguard.verification.doctor import build_current

        current = build_current(args.model)
    with console().status(f"reading {args.run}") as status:
        rep = collect_report(args.run, doctor=not args.no_doctor, current=current,
                             progress=lambda msg: status.update(msg))
        out = write_report(rep, args.output)
    live = [c for c in rep.checkpoints if c.category != "pruned"]
    marks = {k: [c.step for c in rep.checkpoints if c.category == k or (k == "slimmed" and c.slimmed)] for k in CATEGORY_ORDER}
    if args.json:
        print_json({
            "output": str(out), "checkpoints": len(live), "pruned": len(marks["pruned"]), "marks": marks, "sessions": [
                {"index": s.index, "outcome": s.outcome, "lost_steps": s.lost_steps, "lost_min": s.lost_min,
                 "lost_max": s.lost_max, "rollbacks": len(s.rollbacks)} for s in rep.sessions],
            "problems": rep.problems,
        })
        return 0
    ends = ", ".join(f"{s.outcome}" for s in rep.sessions) or "none recorded"
    console().print(f"wrote {out}: {len(live)} checkpoint(s), {len(marks['pruned'])} pruned, {len(rep.sessions)} session(s) ({ends}); "
                    f"{len(rep.problems)} problem(s) reading the run", highlight=False)
    return 0
