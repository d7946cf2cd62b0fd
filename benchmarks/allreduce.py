"""The cost of cnn_gpu.distributed's allreduce against a blocking MPI_Allreduce, in the same run.

    mpiexec -n 2 python benchmarks/allreduce.py

Buffers of lenet5's, resnet20's (~0.27 M, He et al. 2016) and vgg_small's parameter counts in
float32 (the flat gradient buffer DistributedOptimizer reduces each step), and one host value
(the per-step stop vote). Median of ``--reps`` after a barrier; rank 0 prints.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from cnn_gpu import distributed

SIZES = {"lenet5": 61_706, "resnet20": 270_000, "vgg_small": 1_116_970}


def median_ms(comm, fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        comm.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=40)
    args = parser.parse_args()
    comm = distributed.init()
    if comm.size < 2:
        raise SystemExit("run it under mpiexec with 2 or more ranks")
    from mpi4py import MPI  # noqa: PLC0415

    world = MPI.COMM_WORLD
    for name, n in SIZES.items():
        a = np.ones(n, np.float32)
        for _ in range(5):
            comm.allreduce_(a, "mean")
        ours = median_ms(comm, lambda a=a: comm.allreduce_(a, "mean"), args.reps)
        plain = median_ms(comm, lambda a=a: world.Allreduce(MPI.IN_PLACE, a), args.reps)
        if comm.rank == 0:
            print(f"{name:10s} {n:>9,} float32: allreduce_ {ours:.3f} ms, MPI_Allreduce {plain:.3f} ms, ratio {ours / plain:.2f}")
    ours = median_ms(comm, lambda: comm.any(False), 5 * args.reps)
    plain = median_ms(comm, lambda: world.allreduce(0), 5 * args.reps)
    if comm.rank == 0:
        print(f"one host value (the stop vote): any() {1e3 * ours:.1f} us, allreduce {1e3 * plain:.1f} us")


if __name__ == "__main__":
    main()
