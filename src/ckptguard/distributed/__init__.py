"""torch.distributed runs: agreement between ranks, rank files, sharded state through torch.distributed.checkpoint."""
