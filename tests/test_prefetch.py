"""Data kept on the host (cnn_gpu/data/prefetch.py): rows gathered in file order, batches uploaded
raw from pinned memory on a side stream one batch ahead and normalised on the device. Through
the CuPy stand-in (tests/standin: streams, events, pinned memory, host syncs counted), and on a
real GPU where there is one (``gpu_cupy``): the batches equal the device-resident path's bit for
bit, and a step costs no host synchronisation."""

from __future__ import annotations

import numpy as np
import pytest

import cnn_gpu
from cnn_gpu import config, optim
from cnn_gpu.data import DataLoader, HostImages, channel_stats, normalize
from cnn_gpu.data.prefetch import RowSubset, fits_device, gather
from cnn_gpu.train import evaluate, fit, train_step


def _data(n=50, c=1, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, c, 8, 8), dtype=np.uint8)
    y = rng.integers(0, 3, n).astype(np.int64)
    mean, std = channel_stats(x, 255.0)
    return x, y, mean, std


def _tiny_model(c=1, k=3):
    from cnn_gpu import nn

    cnn_gpu.manual_seed(0)
    return nn.Sequential(nn.Conv2d(c, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, k))


def test_gather_reads_in_sorted_order_and_restores_the_order(tmp_path):
    x = np.arange(40, dtype=np.uint8).reshape(10, 1, 2, 2)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    idx = np.array([7, 2, 9, 2, 0])
    reads = []

    class Spy:
        shape, dtype = mm.shape, mm.dtype

        def __getitem__(self, key):
            reads.append(np.asarray(key).tolist())
            return mm[key]

    assert np.array_equal(gather(Spy(), idx), x[idx]) and reads == [[0, 2, 2, 7, 9]]
    assert np.array_equal(gather(mm, idx), x[idx]) and gather(mm, np.array([], np.int64)).shape == (0, 1, 2, 2)
    part = RowSubset(mm, np.array([1, 4, 5, 8]))
    assert part.shape == (4, 1, 2, 2) and np.array_equal(part[1:3], x[[4, 5]])
    assert np.array_equal(part[np.array([3, 0])], x[[8, 1]])
    assert np.array_equal(channel_stats(part, 255.0)[0], channel_stats(x[[1, 4, 5, 8]], 255.0)[0])


def test_host_images_on_numpy_give_the_normalised_batches():
    x, y, mean, std = _data()
    dev = DataLoader(normalize(x, mean, std, 255.0), y, 16, shuffle=True, seed=2)
    host = DataLoader(HostImages(x, mean, std, 255.0), y, 16, shuffle=True, seed=2)
    for (a, b), (c, d) in zip(dev.epoch(3), host.epoch(3), strict=True):
        assert np.array_equal(a, c) and np.array_equal(b, d)


def test_host_images_check_their_arguments():
    x, _, mean, std = _data()
    with pytest.raises(ValueError, match=r"host: expected images \(N, C, H, W\), got shape \(50, 64\)"):
        HostImages(x.reshape(50, 64), mean, std, 255.0)
    with pytest.raises(ValueError, match="mean, std: expected 1 values each"):
        HostImages(x, [0.1, 0.2], [1.0, 1.0], 255.0)


def test_host_batches_equal_the_device_resident_ones_bit_for_bit(gpu_cupy):
    cp = gpu_cupy
    x, y, mean, std = _data(c=3)
    dev = DataLoader(normalize(cp.asarray(x), mean, std, 255.0), cp.asarray(y), 16, shuffle=True, seed=5)
    host = DataLoader(HostImages(x, mean, std, 255.0, cp), y, 16, shuffle=True, seed=5)
    assert len(dev) == len(host) == 4  # the last batch is partial (2 examples)
    for epoch, start in ((0, 0), (1, 0), (1, 2)):
        pairs = list(zip(dev.epoch(epoch, start), host.epoch(epoch, start), strict=True))
        assert len(pairs) == 4 - start
        for (a, b), (c, d) in pairs:
            assert isinstance(c, cp.ndarray) and c.dtype == np.float32 and d.dtype == np.int64
            assert np.array_equal(a.get(), c.get()) and np.array_equal(b.get(), d.get())
    # in order (no shuffle), and one gathered batch by index
    plain = [xb.get() for xb, _ in DataLoader(HostImages(x, mean, std, 255.0, cp), y, 16).epoch(0)]
    assert np.array_equal(np.concatenate(plain), normalize(x, mean, std, 255.0))
    rows = HostImages(x, mean, std, 255.0, cp)[cp.asarray(np.array([4, 1]))]
    assert np.array_equal(rows.get(), normalize(x[[4, 1]], mean, std, 255.0))


def test_standin_prefetch_costs_no_host_sync_per_step_and_uploads_raw_bytes(standin):
    from standin import counting, module

    x, y, mean, std = _data(n=70)
    loader = DataLoader(HostImages(x, mean, std, 255.0, standin), y, 16, shuffle=True, seed=1)
    with cnn_gpu.use_backend("cupy"):
        model = _tiny_model()
    opt = optim.SGD(model, 0.1)
    loss_fn = cnn_gpu.nn.CrossEntropyLoss(validate_range=False)
    list(loader.epoch(0))  # the normaliser's per-channel constants are uploaded once, at the first batch
    pinned_before = len(module.pinned_sizes)
    steps = 0
    with counting() as c:
        for xb, yb in loader.epoch(1):
            train_step(model, loss_fn, opt, xb, yb)
            steps += 1
    assert steps == len(loader) == 5
    assert c.total_syncs == 0, c.syncs
    assert c.uploads == 2 * steps  # x and y of each batch, nothing else
    rows = [16, 16, 16, 16, 6]
    assert c.upload_bytes == sum(r * 64 + r * 8 for r in rows)  # uint8 images (not float32) and int64 labels
    assert module.pinned_sizes[pinned_before:] == [-(-r * 64 // 8) * 8 + r * 8 for r in rows]


def test_standin_copies_run_on_a_side_stream_ordered_by_events(standin, monkeypatch):
    """The protocol: each batch's copies run on a non-blocking stream other than the compute
    stream; the compute stream waits for the event behind them before reading; the side stream
    waits for the event the compute stream recorded after reading a buffer before it overwrites
    that buffer two batches later."""
    from standin import array, graph, module

    log = []
    real_set, real_wait, real_record = array.ndarray.set, graph.Stream.wait_event, module.Event.record

    def set_(self, arr, stream=None):
        log.append(("set", stream, self._a.__array_interface__["data"][0]))
        return real_set(self, arr, stream)

    def wait(self, event):
        log.append(("wait", self, id(event)))
        return real_wait(self, event)

    def record(self, stream=None):
        log.append(("record", stream, id(self)))
        return real_record(self, stream)

    monkeypatch.setattr(array.ndarray, "set", set_)
    monkeypatch.setattr(graph.Stream, "wait_event", wait)
    monkeypatch.setattr(module.Event, "record", record)
    x, y, mean, std = _data(n=64)
    compute = standin.cuda.get_current_stream()
    held = []  # keep the batches alive: an event's id stays unique
    for xb, yb in DataLoader(HostImages(x, mean, std, 255.0, standin), y, 16).epoch(0):
        held.append((xb, yb))
        log.append(("batch",))
    sets = [e for e in log if e[0] == "set"]
    side = {e[1] for e in sets}
    assert len(sets) == 8 and len(side) == 1
    (side,) = side
    assert side != compute and side.is_non_blocking
    # per batch: the upload event (recorded on the side stream) is waited for by the compute stream
    uploads = [e[2] for e in log if e[0] == "record" and e[1] == side]
    consumed = [e[2] for e in log if e[0] == "record" and e[1] == compute]
    assert len(uploads) == 4 and len(consumed) == 4
    compute_waits = [e[2] for e in log if e[0] == "wait" and e[1] == compute]
    assert compute_waits == uploads + uploads[2:]  # and at the end, for the copies into each buffer
    # batches 2 and 3 reuse the buffers of 0 and 1: the side stream waits for their consumption first
    side_waits = [e[2] for e in log if e[0] == "wait" and e[1] == side]
    assert side_waits == consumed[:2]
    for ev in consumed[:2]:
        i_record = log.index(("record", compute, ev))
        i_wait = log.index(("wait", side, ev))
        later_sets = [i for i, e in enumerate(log) if e[0] == "set" and i > i_wait]
        assert i_record < i_wait < later_sets[0]
    addresses = [e[2] for e in sets[::2]]
    assert addresses[0] == addresses[2] and addresses[1] == addresses[3] and addresses[0] != addresses[1]


@pytest.mark.parametrize("graphs", [False, "auto"])
def test_fit_and_evaluate_through_the_host_path_equal_the_device_resident_path(gpu_cupy, graphs):
    cp = gpu_cupy
    x, y, mean, std = _data(n=40)
    results = []
    for host in (False, True):
        with cnn_gpu.use_backend("cupy"):
            model = _tiny_model()
            xs = HostImages(x, mean, std, 255.0, cp) if host else normalize(cp.asarray(x), mean, std, 255.0)
            ys = y if host else cp.asarray(y)
            fit(model, optim.SGD(model, 0.1, momentum=0.9), DataLoader(xs, ys, 16, shuffle=True, seed=3), 2, cuda_graph=graphs)
            results.append(([p.data.get() for p in model.parameters()], evaluate(model, xs, ys, batch_size=16)))
    (w0, e0), (w1, e1) = results
    if type(cp).__name__ == "_Cupy":  # the stand-in: the same batches give the same bits
        assert all(np.array_equal(a, b) for a, b in zip(w0, w1)) and e0 == e1
    else:  # a GPU: the same batches; cuBLAS may pick other kernels for other buffer addresses
        for a, b in zip(w0, w1):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(e0, e1, rtol=1e-5)


def test_standin_fits_device_follows_the_free_memory_and_the_setting(standin):
    from standin import module

    try:
        module.device_free[0] = 1000
        assert fits_device(500, standin) and not fits_device(501, standin)
        with config.override(device_data=0.9):
            assert fits_device(900, standin) and not fits_device(901, standin)
    finally:
        module.device_free[0] = None
    assert fits_device(10**9, np)


def test_standin_train_run_streams_data_over_the_device_budget(standin, tmp_path):
    """A run whose data exceeds the device budget trains on a HostImages (host path), with the
    same metrics as the run that uploads the data once."""
    from standin import module
    from test_own_data import write_classes

    from cnn_gpu import runs

    write_classes(tmp_path / "pets", per_class=6)
    seen = []

    class Spy(cnn_gpu.train.Callback):
        def on_train_begin(self, loop):
            seen.append(type(loop.loader.x).__name__)

    metrics = []
    for free, mmap_mb in ((None, 1024), (1000, 0)):  # device-resident; over the budget and memory-mapped
        module.device_free[0] = free
        try:
            with config.override(data_dir=str(tmp_path / "cache"), mmap_mb=mmap_mb):
                cfg = runs.TrainConfig(
                    dataset=None,
                    data=str(tmp_path / "pets"),
                    model="lenet_digits",
                    epochs=1,
                    batch_size=8,
                    backend="cupy",
                    progress="none",
                    quiet=True,
                    cuda_graph="off",
                    run_dir=str(tmp_path / f"run{free}-{mmap_mb}"),
                    val_fraction=0.25,
                )
                result = runs.train_run(cfg, out=lambda line: None, callbacks=[Spy()])
        finally:
            module.device_free[0] = None
        metrics.append([{k: v for k, v in r.items() if k.endswith(("loss", "accuracy"))} for r in result.history])
    assert seen == ["ndarray", "HostImages"]
    assert metrics[0] == metrics[1] and len(metrics[0]) == 1 and metrics[0][0]["val_loss"] is not None


def test_standin_the_run_keeps_data_on_the_host_over_the_budget_or_when_mapped(standin, tmp_path):
    from standin import module

    from cnn_gpu import runs

    x, y, mean, std = _data(n=20)
    data = runs._Data((x, y), None, (x[:5], y[:5]), {}, mean, std, 255.0)
    raw_and_float = 25 * 64 * (1 + 4)
    try:
        module.device_free[0] = 2 * raw_and_float
        assert runs._device_resident(data, standin)  # half the free memory: just fits
        module.device_free[0] = 2 * raw_and_float - 2
        assert not runs._device_resident(data, standin)
        pair = runs._on_device(data, standin)(data.train)
        assert isinstance(pair[0], HostImages) and pair[0].xp is standin and isinstance(pair[1], np.ndarray)
    finally:
        module.device_free[0] = None
    assert runs._device_resident(data, np)
    np.save(tmp_path / "x.npy", x)
    mapped = runs._Data((np.load(tmp_path / "x.npy", mmap_mode="r"), y), None, (x[:5], y[:5]), {}, mean, std, 255.0)
    assert not runs._device_resident(mapped, np) and not runs._device_resident(mapped, standin)
    xb, yb = runs._on_device(data, np)(data.test)
    assert np.array_equal(xb, normalize(x[:5], mean, std, 255.0)) and np.array_equal(yb, y[:5])


def test_standin_an_epoch_stopped_early_leaves_the_compute_stream_behind_its_copies(standin, monkeypatch):
    """fit stopping mid-epoch drops the batch iterator: the compute stream (whose later work may
    reuse the buffers' memory) then waits for every copy still in flight."""
    from standin import graph

    waits = []
    real_wait = graph.Stream.wait_event
    monkeypatch.setattr(graph.Stream, "wait_event", lambda self, ev: (waits.append((self, ev)), real_wait(self, ev))[1])
    x, y, mean, std = _data(n=64)
    compute = standin.cuda.get_current_stream()
    batches = DataLoader(HostImages(x, mean, std, 255.0, standin), y, 16).epoch(0)
    next(batches)  # batch 0 consumed; batch 1 uploaded in the background
    assert [s for s, _ in waits] == [compute]
    batches.close()
    assert [s for s, _ in waits] == [compute] * 3 and waits[2][1] is not waits[1][1]


def test_place_picks_the_path_and_evaluate_takes_either(standin, tmp_path):
    from cnn_gpu.data.prefetch import place

    x, y, mean, std = _data(n=30)
    np.save(tmp_path / "x.npy", x)
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    with cnn_gpu.use_backend("cupy"):
        model = _tiny_model()
    whole = place(x, y, mean, std, 255.0, standin)
    streamed = place(mapped, y, mean, std, 255.0, standin)
    assert isinstance(whole[0], standin.ndarray) and isinstance(streamed[0], HostImages)
    assert evaluate(model, *whole, batch_size=8) == evaluate(model, *streamed, batch_size=8)
