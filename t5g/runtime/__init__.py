"""Runtime: the device mesh and sharding rules, host data placement, joining several processes,
TPU topologies for ahead-of-time compiles, gin files, atomic file writes. Below train,
inference and evaluation; above model, data and checkpoints."""
