"""Reading a run for people and other tools: plots, diffs, export to plain files.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``plotting`` (a run's curve with its checkpoints): ``plot_run``
- ``diffing`` (what changed between two checkpoints): ``diff``
- ``export`` (one plain safetensors file): ``export_checkpoint``
- ``sizes`` (logical and physical sizes of a run): ``run_sizes``
"""
