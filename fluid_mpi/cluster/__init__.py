"""Cluster layer: the elastic launcher (`fluid-mpi launch`): hosts and probes, mpirun, warm starts, and the
driver that relaunches on the hosts that answer. Imports the runtime and the model, never vcluster, bench or cli."""
