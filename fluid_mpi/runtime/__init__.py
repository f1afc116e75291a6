"""Runtime layer: the per-rank loops (coordinator, worker, sliced), the transport interface and its
MPI implementation (the only module importing mpi4py), recovery, liveness, fault injection, events and
outputs. Imports the model layer, never the CLI."""
