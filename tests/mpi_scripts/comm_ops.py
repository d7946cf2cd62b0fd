"""Run under mpiexec -n 2: the communicator's operations; prints 'rank R ok' when every check passes."""

import sys

import numpy as np

from cnn_gpu import distributed

comm = distributed.init()
r, n = comm.rank, comm.size
assert isinstance(comm, distributed.MPICommunicator), type(comm)
assert n == 2 and comm.local_size == 2 and comm.local_rank == r, (r, n, comm.local_rank, comm.local_size)
for dtype in (np.float32, np.float64, np.int64):
    a = np.arange(5, dtype=dtype) + 10 * r  # rank 0: 0..4, rank 1: 10..14
    assert comm.allreduce_(a) is a and a.dtype == dtype
    assert np.array_equal(a, 2 * np.arange(5) + 10), a
m = np.full((2, 3), float(r + 1), dtype=np.float32)  # 1 and 2: mean 1.5
comm.allreduce_(m, op="mean")
assert m.dtype == np.float32 and np.array_equal(m, np.full((2, 3), 1.5, np.float32)), m
b = np.full(4, float(r), dtype=np.float64) if r == 1 else np.zeros(4)
comm.broadcast_(b, root=1)
assert np.array_equal(b, np.ones(4)), b
assert comm.sum_host([r, 1.5]) == [1.0, 3.0]
assert comm.any(r == 1) and not comm.any(False)
assert comm.broadcast_object({"from": r}, root=0) == {"from": 0}
comm.barrier()
for bad, err in (
    (lambda: comm.allreduce_(np.zeros((3, 4))[:, 1]), ValueError),
    (lambda: comm.allreduce_(np.zeros(3, np.int32), op="mean"), TypeError),
    (lambda: comm.allreduce_(np.zeros(3), op="max"), ValueError),
    (lambda: comm.broadcast_(np.zeros(3), root=2), ValueError),
    (lambda: comm.allreduce_([1.0, 2.0]), TypeError),
):
    try:
        bad()
    except err:
        pass
    else:
        sys.exit(f"rank {r}: expected {err.__name__}")
print(f"rank {r} ok", flush=True)
