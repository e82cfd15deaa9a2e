"""CheckpointManager: wires capture, persistence, policies and verification into one save and one restore pipeline."""
