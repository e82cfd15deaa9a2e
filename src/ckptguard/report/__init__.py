"""Reading a run for people and other tools: plots, diffs, export to plain files.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``plotting`` (a run's curve with its checkpoints): ``plot_run``
- ``diffing`` (what changed between two checkpoints): ``diff``
- ``export`` (one plain safetensors file: the model, the full state, or one object): ``export_checkpoint``
- ``sizes`` (logical and physical sizes of a run): ``run_sizes``
- ``runreport`` (everything the run report shows, read from the run): ``collect_report``
- ``sessions`` (how each session ended and what each failure cost): ``session_rows``
- ``htmlreport`` (the report as one self-contained HTML file): ``render_html``, ``write_report``
- ``svgchart`` (inline SVG charts, every text escaped): ``line_chart``
"""
