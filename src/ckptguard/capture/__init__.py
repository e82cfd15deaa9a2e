"""State capture and restore into live objects: TrainState, samplers, RNG, model keys, mismatch reports, environment, config."""
