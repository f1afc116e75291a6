"""fluid-mpi."""
