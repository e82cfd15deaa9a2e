"""``ckptguard plot RUN -o loss.png``: the metric curve with checkpoints marked by status."""

from __future__ import annotations

import argparse
from typing import Any

from ckptguard.cli.common import add_json_flag, console, print_json, require_run


def register(sub: Any) -> None:
    p = sub.add_parser("plot", help="plot a metric from metrics.csv with the checkpoints marked")
    p.add_argument("run", help="run directory or URL")
    p.add_argument("-o", "--output", default="loss.png", help="image file to write (default loss.png)")
    p.add_argument("--metric", default="loss", help="metrics.csv column to plot (default loss)")
    p.add_argument("--log", action="store_true", help="logarithmic y axis")
    p.add_argument("--smooth", type=int, default=0, metavar="N", help="overlay an EMA over ~N steps")
    p.add_argument("--title", default=None, help="plot title")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    require_run(args.run, "plot")
    try:
        import matplotlib  # noqa: F401

        from ckptguard.report.plotting import plot_run
    except ImportError:
        from ckptguard.cli.common import fail

        return fail(ImportError("ckptguard plot needs matplotlib: run 'pip install ckptguard[plot]'."))
    summary = plot_run(
        args.run, args.output, metric=args.metric, log_scale=args.log, smooth=args.smooth, title=args.title
    )
    if args.json:
        print_json(
            {"output": summary.output, "metric": summary.metric, "points": summary.points, "marks": summary.marks}
        )
        return 0
    counts = ", ".join(f"{len(v)} {k}" for k, v in summary.marks.items() if v) or "no checkpoints"
    console().print(f"wrote {summary.output}: {summary.points} points of {summary.metric!r}; {counts}", highlight=False)
    return 0
