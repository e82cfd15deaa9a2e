"""Moving checkpoint bytes: writing and committing, reading and verifying, parallel I/O, staging, background saves, incremental storage, garbage collection.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``writer`` (one checkpoint, committed last): ``write_checkpoint``, ``clean_debris``,
  ``delete_checkpoint``
- ``reader`` (reading back, every byte verified): ``CheckpointReader``, ``verify_files``
- ``parallel_io`` (parallel and O_DIRECT tensor writes): ``ParallelTensorWriter``
- ``incremental`` (data stored once by content): ``IncrementalSave``, ``chunk_refs``
- ``gc`` (crash-safe collection of unreferenced packs): ``collect``, ``GcReport``
- ``prune`` (a retention plan carried out): ``apply_decisions``
- ``slim`` (a kept checkpoint slimmed to its weights, crash-safe): ``slim_checkpoint``
- ``background`` (async saves and the reaper): ``BackgroundSaves``, ``Reaper``
- ``staging`` (reused host buffers): ``Stager``
"""
