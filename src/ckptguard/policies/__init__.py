"""Policies that decide (what to keep, when to save, when to stop, what is pinned); they never delete.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``retention`` (what to keep): ``Retention``, ``KeepLast``, ``KeepBest``, ``KeepEvery``,
  ``KeepPhased``, ``KeepBeforeConfigChange``, ``plan_retention``
- ``schedule`` (when to save, Young/Daly): ``SaveSchedule``, ``young_daly_interval``,
  ``wasted_fraction``
- ``preemption`` (a signal sets a flag): ``PreemptionGuard``
- ``pins`` (checkpoints no policy deletes): ``pin``, ``unpin``, ``pinned_steps``
- ``slimming`` (which kept checkpoints keep their training state, ``Retention(full_last=N)``):
  ``plan_slimming``, ``slimmed_record``, ``TRAINING_ONLY_FILES``
"""
