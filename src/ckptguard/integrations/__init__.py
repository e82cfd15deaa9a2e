"""Optional integrations with other tools (each behind its own extra).

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``mlflow`` (every commit visible in MLflow (extra ``mlflow``)): ``MLflowLogger``,
  ``resume_from_mlflow``
- ``hf`` (HF Trainer checkpoints as ckptguard commits (extra ``hf``)): ``CkptguardTrainer``,
  ``CkptguardTrainerMixin``
- ``hf_export`` (a folder ``from_pretrained`` loads; ``ckptguard export --format hf``): ``export_hf_folder``
- ``accelerate`` (``save_state``/``load_state`` through ckptguard (extra ``hf``)): ``CkptguardAccelerator``
- ``lightning`` (a Lightning callback over a CheckpointManager (extra ``lightning``)): ``CkptguardCallback``,
  ``resumable_loader``
- ``lightning_io`` (Lightning's checkpoints as ckptguard commits, no pickle): ``CkptguardCheckpointIO``

Nothing in the library imports this package; each integration is imported by the user.
"""
