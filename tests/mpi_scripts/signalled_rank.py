"""Run under mpiexec -n 2: rank 1 alone gets SIGTERM at step 3 of epoch 1 of `cnn-gpu train`.
Each rank prints "rank R: step S code C": the last step it took and its exit code."""

import os
import signal
import sys

from cnn_gpu import distributed
from cnn_gpu.callbacks import LambdaCallback
from cnn_gpu.runs import RunStopped, TrainConfig, train_run

comm = distributed.init()
last = [0]


def on_step(epoch, step):
    last[0] = step
    if comm.rank == 1 and (epoch, step) == (1, 3):
        os.kill(os.getpid(), signal.SIGTERM)


try:
    train_run(TrainConfig(epochs=2, run_dir=sys.argv[1], quiet=True), callbacks=[LambdaCallback(on_step=on_step)])
    code = 0
except RunStopped as exc:
    code = exc.exit_code
print(f"rank {comm.rank}: step {last[0]} code {code}", flush=True)
sys.exit(code)
