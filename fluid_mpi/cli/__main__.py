"""``python -m fluid_mpi.cli ARGS`` = ``fluid-mpi ARGS`` (how mpirun starts a rank without the script)."""
from . import main

main()
