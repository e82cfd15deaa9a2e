"""CheckpointManager: wires capture, persistence, policies and verification into one save and one restore pipeline.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``manager`` (save, restore, retention, verification): ``CheckpointManager``
- ``saving`` (the one save pipeline: sync, async, distributed): ``SavePipeline``
- ``restoring`` (which checkpoint to restore, and fall-back): ``restore_first_valid``
"""
