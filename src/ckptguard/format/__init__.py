"""The on-disk format: manifest, tensor files, the JSON codec of non-tensor state. Pure bytes; no storage, no I/O."""
