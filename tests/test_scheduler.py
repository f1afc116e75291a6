"""The coordinator's bookkeeping, without MPI."""
from fluid_mpi.runtime.scheduler import WorkQueue, dynamic_width, expected_share, fluid_subset


def test_queue_answers_each_batch_once_and_requeues_in_flight():
    q = WorkQueue(5)
    a, b = q.take(1, now=0.0), q.take(2, now=0.0)
    c = q.take(1, now=1.0)
    assert (a, b, c) == (0, 1, 2) and q.load(1) == 2
    assert q.complete(2, b) and not q.complete(2, b)  # a repeated reply is stale
    assert q.requeue(1) == [0, 2]
    assert list(q.pending) == [0, 2, 3, 4]
    assert not q.complete(1, 0)  # a reply from the failed rank for a re-sent batch is ignored
    for r in (3, 3, 3, 3):
        q.complete(r, q.take(r))
    assert q.finished() and q.answered == {0, 1, 2, 3, 4}


def test_requeue_all_and_overdue():
    q = WorkQueue(4)
    q.take(1, now=0.0)
    q.take(2, now=5.0)
    assert q.overdue(3.0, now=6.0) == [1]
    assert q.requeue_all() == [0, 1] and list(q.pending) == [0, 1, 2, 3]


def test_dynamic_width_is_the_alive_prefix():
    assert dynamic_width([0, 1, 2], 3) == 3
    assert dynamic_width([0, 2], 3) == 1
    assert dynamic_width([1, 2], 3) == 0
    assert dynamic_width([0, 1, 2], 2) == 2


def test_fluid_subset_and_shares():
    assert fluid_subset([2, 0]) == (0, 2)
    assert expected_share(10, 2, "ht") == 5 and expected_share(10, 2, "ha") == 10


