"""What a run directory holds besides checkpoint data: the catalog of checkpoints, the writer lock, history, run record, metrics log, trust records.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``catalog`` (the checkpoints of a run and their marks): ``CheckpointInfo``, ``scan``,
  ``find_debris``
- ``lock`` (one writer per run): ``LockPolicy``, ``RunLock``
- ``history`` (RUN/history.jsonl): ``read_history``
- ``runrecord`` (RUN/ckptguard.json): ``RunRecord``, ``read_run_record``
- ``metrics_log`` (RUN/metrics.csv): ``MetricsLog``, ``read_metrics``
"""
