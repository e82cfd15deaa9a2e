"""Moving checkpoint bytes: writing and committing, reading and verifying, parallel I/O, staging, background saves, incremental storage, garbage collection."""
