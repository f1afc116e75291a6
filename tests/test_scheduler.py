"""The coordinators' small rules, without MPI."""
from fluid_mpi.model.partition import dynamic_width
from fluid_mpi.runtime.scheduler import expected_share, fluid_subset


def test_dynamic_width_is_the_alive_prefix():
    assert dynamic_width([0, 1, 2], 3) == 3
    assert dynamic_width([0, 2], 3) == 1
    assert dynamic_width([1, 2], 3) == 0
    assert dynamic_width([0, 1, 2], 2) == 2


def test_fluid_subset_and_shares():
    assert fluid_subset([2, 0]) == (0, 2)
    assert expected_share(10, 2, "ht") == 5 and expected_share(10, 2, "ha") == 10


