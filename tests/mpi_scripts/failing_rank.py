"""Run under mpiexec -n 2 with an argument: rank 1 fails during `cnn-gpu train` at step 3:
'raise' (an exception), 'kill' (SIGKILL) or 'hang' (stops answering; CNN_GPU_TIMEOUT_S ends it)."""

import os
import signal
import sys
import time

from cnn_gpu import distributed
from cnn_gpu.callbacks import LambdaCallback
from cnn_gpu.runs import TrainConfig, train_run

how = sys.argv[1]
comm = distributed.init()


def on_step(epoch, step):
    if comm.rank != 1 or step != 3:
        return
    print(f"rank 1: failing ({how})", flush=True)
    if how == "raise":
        raise RuntimeError("injected failure")
    if how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(3600)


train_run(TrainConfig(epochs=1, run_dir=sys.argv[2], progress="plain"), callbacks=[LambdaCallback(on_step=on_step)])
print(f"rank {comm.rank}: training finished, which it should not have", flush=True)
