"""Is a checkpoint sound and does it still behave: byte verification, probe batches, the doctor, hyper-parameter checks, training health."""
