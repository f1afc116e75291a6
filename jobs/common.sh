# Sourced by the jobs/*.sbatch scripts: the venv, ULFM on, and mpirun inside the Slurm allocation.
FLUID_MPI_HOME=${FLUID_MPI_HOME:-$SLURM_SUBMIT_DIR}
export PATH="$FLUID_MPI_HOME/.venv/bin:$PATH"
# ULFM on whatever mpirun is used (the venv's already has it in its MCA files)
export OMPI_MCA_mpi_ft_enable=1 PRTE_MCA_state_base_recoverable=1 PRTE_MCA_state_base_notify_errors=1
if [ "$(id -u)" = 0 ]; then export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1; fi

# mpirun with one rank per Slurm task; Open MPI reads the allocation from Slurm's environment.
fluid_mpirun() {
    mpirun -np "${SLURM_NTASKS:-2}" --with-ft ulfm fluid-mpi "$@"
}
