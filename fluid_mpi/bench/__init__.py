"""The benchmark (`fluid-mpi bench throughput | cluster | faults | adaptive`): drivers that launch mpirun
themselves and measure, and the reports they write. Above the launcher and the virtual cluster; below the CLI."""
