"""Is a checkpoint sound and does it still behave: byte verification, probe batches, the doctor, hyper-parameter checks, training health.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``verify`` (every byte of a checkpoint or a run): ``verify``, ``VerifyReport``
- ``behaviour`` (the probe re-run after each commit): ``attach_verifier``, ``Verifier``
- ``probe`` (the frozen probe batch): ``freeze_probe``, ``run_probe``
- ``doctor`` (will today's code resume this checkpoint): ``doctor``, ``DoctorReport``
- ``health`` (loss spikes: roll back, skip the data): ``LossGuard``
- ``hparams`` (hyper-parameter and schedule drift): ``optimizer_hparam_diffs``, ``scheduler_diffs``
"""
