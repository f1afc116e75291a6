"""Model layer: the three CNN families, partitioning into per-device parts, data, training,
evaluation and checkpoints. Knows nothing of MPI or ranks."""
