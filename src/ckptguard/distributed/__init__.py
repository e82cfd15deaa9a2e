"""torch.distributed runs: agreement between ranks, rank files, sharded state through torch.distributed.checkpoint.

Public entry points, by module; the other names in each module's ``__all__`` serve
ckptguard's own modules and may change:

- ``coordination`` (agreement between ranks): ``Coordinator``, ``coordinator``, ``agree``
- ``saving`` (the distributed stages of the one save pipeline: rank files, sharded state): ``write_rank_share``
- ``restoring`` (a rank's part of the one restore path: rank files, sharded state): ``prepare_rank``, ``load_sharded``
- ``dcp`` (sharded state through torch.distributed.checkpoint: state dicts, loading, the earlier layout): ``dcp_state_dict``, ``load_into``
- ``shard_io`` (ckptguard as DCP's storage layer: shard files, JSON metadata): ``save_shards``, ``load_shards``, ``model_tensors``

The manager calls these; a training script uses ``CheckpointManager`` as in one process.
"""
