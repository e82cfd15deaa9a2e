"""What a run directory holds besides checkpoint data: the catalog of checkpoints, the writer lock, history, run record, metrics log, trust records."""
