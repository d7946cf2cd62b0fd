"""Run under mpiexec -n 2: training steps on 2 ranks (each its shard of every global batch) equal
one process on the whole batches, in float64. Prints 'rank R max diff D' and 'rank R ok'."""

import numpy as np

import cnn_gpu
from cnn_gpu import distributed, nn, optim
from cnn_gpu.data.loader import DataLoader
from cnn_gpu.train import train_step


def model_and_opt(seed, comm=None, loader=None):
    cnn_gpu.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 5)).to(
        dtype=np.float64
    )
    opt = optim.SGD(model, 0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
    if comm is not None:
        opt = distributed.DistributedOptimizer(opt, comm, loader)
    return model, opt, optim.CosineLR(opt, total_steps=8)


comm = distributed.init()
rng = np.random.default_rng(0)
x, y = rng.standard_normal((25, 1, 8, 8)), rng.integers(0, 5, 25)  # batches of 10, 10, 5 (shards 5/5, 5/5, 2/3)
loss_fn = nn.CrossEntropyLoss()

single, s_opt, s_sched = model_and_opt(1)  # the whole batches, in this process alone
for epoch in range(2):
    for xb, yb in DataLoader(x, y, 10, shuffle=True, seed=3).epoch(epoch):
        train_step(single, loss_fn, s_opt, xb, yb)
        s_sched.step()

loader = distributed.ShardedLoader(x, y, 10, comm, shuffle=True, seed=3)
model, opt, sched = model_and_opt(1 + 99 * comm.rank, comm, loader)  # other initial weights on each rank...
distributed.broadcast_parameters(model, comm)  # ...until rank 0's are broadcast
seen = []
for epoch in range(2):
    for xb, yb in loader.epoch(epoch):
        seen.append(len(yb))
        train_step(model, loss_fn, opt, xb, yb)
        sched.step()
assert seen == ([5, 5, 2, 5, 5, 2] if comm.rank == 0 else [5, 5, 3, 5, 5, 3]), seen
assert len(opt.optimizer.groups) == 1 and opt.step_count == 6 and opt.lr == s_opt.lr
diff = max(float(np.abs(a.data - b.data).max()) for a, b in zip(model.parameters(), single.parameters()))
moved = max(float(np.abs(a.data - b.data).max()) for a, b in zip(model.parameters(), model_and_opt(1)[0].parameters()))
print(f"rank {comm.rank} max diff {diff:.3g} (weights moved {moved:.3g})", flush=True)
assert diff < 1e-12 and moved > 1e-3, (diff, moved)
sd, sd1 = opt.state_dict(), s_opt.state_dict()
assert sd["type"] == "SGD" and all(
    np.allclose(sd["state"][k]["momentum_buffer"], sd1["state"][k]["momentum_buffer"], rtol=0, atol=1e-12) for k in sd1["state"]
)
print(f"rank {comm.rank} ok", flush=True)
