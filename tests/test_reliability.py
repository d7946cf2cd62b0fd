"""What the suite must catch (issue 23, first part): properties that plausible one-line bugs
break without any other test noticing. Each test here was checked by planting its bug and
seeing it fail (the issue's report lists the plants)."""

from __future__ import annotations

import io
import itertools
import zipfile

import numpy as np
import pytest
from helpers import assert_close, numerical_grad

import cnn_gpu
import cnn_gpu.functional as F
from cnn_gpu import archive, nn, serialization
from cnn_gpu.cpu import norm as cpu_norm
from cnn_gpu.data.loader import DataLoader


# ============================================================ the loader
def _batches(loader, epoch=0, start=0):
    return [cnn_gpu.to_numpy(yb) for _, yb in loader.epoch(epoch, start=start)]


@pytest.mark.parametrize("shuffle", [False, True])
def test_drop_last_never_yields_the_partial_batch(xp, shuffle):
    """10 examples in batches of 4 with drop_last: 4, 4 and nothing else, also from start= and
    through a transform (a last batch of 2 would reach BatchNorm; of 1, divide by zero)."""
    x = xp.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
    y = xp.arange(10)
    loader = DataLoader(x, y, 4, shuffle=shuffle, drop_last=True, seed=3)
    assert [len(b) for b in _batches(loader)] == [4, 4] == [4] * len(loader)
    assert [len(b) for b in _batches(loader, epoch=1, start=1)] == [4]
    assert _batches(loader, epoch=1, start=2) == []
    seen = []
    loader.transform = lambda xb, seed, epoch, step: (seen.append(step), xb * 2)[1]
    got = list(loader.epoch(2))
    assert [int(xb.shape[0]) for xb, _ in got] == [4, 4] and seen == [0, 1]
    got = list(loader.epoch(2, start=1))
    assert [int(xb.shape[0]) for xb, _ in got] == [4] and seen == [0, 1, 1]
    for xb, yb in got:  # the transform's output is what is yielded
        np.testing.assert_array_equal(cnn_gpu.to_numpy(xb).ravel(), 2 * cnn_gpu.to_numpy(yb).astype(np.float32))
    full = DataLoader(x, y, 4, shuffle=shuffle, seed=3)
    assert [len(b) for b in _batches(full)] == [4, 4, 2]


def test_shuffle_gives_a_new_order_in_every_epoch(xp):
    """Each of 8 epochs has its own order (pairwise different), each a permutation of all the
    examples; the same (seed, epoch) gives the same order again; another seed, other orders."""
    x = xp.arange(12, dtype=np.float32).reshape(12, 1, 1, 1)
    y = xp.arange(12)
    loader = DataLoader(x, y, 5, shuffle=True, seed=7)
    orders = [np.concatenate(_batches(loader, e)) for e in range(8)]
    for o in orders:
        assert sorted(o) == list(range(12))
    for (i, a), (j, b) in itertools.combinations(enumerate(orders), 2):
        assert not np.array_equal(a, b), f"epochs {i} and {j} have the same order"
    np.testing.assert_array_equal(np.concatenate(_batches(loader, 5)), orders[5])
    other = DataLoader(x, y, 5, shuffle=True, seed=8)
    assert not np.array_equal(np.concatenate(_batches(other, 0)), orders[0])
    assert [list(o) for o in [np.concatenate(_batches(DataLoader(x, y, 5), e)) for e in range(2)]] == [list(range(12))] * 2


# ============================================================ BatchNorm statistics, CPU engine vs reference
def _bn_stats(engine, x):
    with cnn_gpu.config.override(engine=engine):
        rm, rv = np.zeros(x.shape[1], x.dtype), np.ones(x.shape[1], x.dtype)
        y, cache = F.batch_norm_forward(x, None, None, rm, rv, True, momentum=1.0)
        dx, _, _ = F.batch_norm_backward(np.ones_like(y) * np.arange(y.size).reshape(y.shape) % 7, cache)
    return y, rm, rv, dx


@pytest.mark.parametrize("block_elements", [None, 128])
def test_cpu_batchnorm_statistics_match_the_reference_across_row_blocks(block_elements, monkeypatch):
    """A batch spanning several row blocks, not i.i.d.: sample 0 (the whole first block) shifted by
    one standard deviation, so the first block's mean (the CPU engine's shift K) is far from the
    batch mean. Mean, variance, y and dx agree with engine="reference" (float64)."""
    rng = np.random.default_rng(0)
    if block_elements is None:  # the engine's own blocks (1 MiB): one sample of 4 x 256 x 256 per block
        shape = (3, 4, 256, 256)
    else:  # small blocks, many of them: 32 rows (the fewest) of 4 channels = one 4x8 sample
        monkeypatch.setattr(cpu_norm, "_BLOCK_ELEMENTS", block_elements)
        shape = (9, 4, 4, 8)
    x = rng.standard_normal(shape) * 2.0 + 5.0
    x[0] += 2.0  # one sample shifted by a standard deviation
    rows = cpu_norm._Rows(shape[0] * shape[2] * shape[3], shape[1], x.dtype)
    assert len(rows.blocks) == shape[0]  # several blocks, the first one sample 0 alone
    got, want = _bn_stats("cpu", x), _bn_stats("reference", x)
    for name, a, b in zip(("y", "running_mean", "running_var", "dx"), got, want):
        assert_close(a, b, 1e-10, name)
    var = x.transpose(1, 0, 2, 3).reshape(4, -1).var(axis=1, ddof=1)
    assert_close(got[2], var, 1e-12, "the unbiased variance")


# ============================================================ archive members
def _npz_with_member(path, name, payload: bytes):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(name + ".npy", payload)


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, a, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize("extra", [1, 10 << 20])
def test_a_member_declaring_more_bytes_than_its_array_needs_is_refused(tmp_path, extra):
    """A member with trailing data after its array (1 byte, 10 MiB) is refused from its header,
    naming the member and both sizes; the exact member reads."""
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    good = tmp_path / "good.npz"
    _npz_with_member(good, "w", _npy(a))
    with archive.Archive(good) as arc:
        np.testing.assert_array_equal(arc.read("w", (2, 3), np.float32), a)
    bad = tmp_path / "bad.npz"
    _npz_with_member(bad, "w", _npy(a) + b"\0" * extra)
    with (
        archive.Archive(bad) as arc,
        pytest.raises(
            ValueError,
            match=r"bad\.npz.*member 'w': declares [\d,]+ bytes, "
            r"but its array \(2, 3\) float32 takes",
        ),
    ):
        arc.read("w", (2, 3), np.float32)


# ============================================================ the model-file reader's limits, and save
def _nested(levels: int) -> nn.Module:
    """``levels`` Sequential containers, one inside the other, around a ReLU (the ReLU at depth ``levels``)."""
    m: nn.Module = nn.ReLU()
    for _ in range(levels):
        m = nn.Sequential(m)
    return m


def _write_model_file(path, architecture, arrays=None, metadata=None, dtype="float32"):
    header = {
        "format": serialization.FORMAT,
        "version": serialization.VERSION,
        "dtype": dtype,
        "architecture": architecture,
        "metadata": metadata or {},
    }
    np.savez(path, **(arrays or {}), **{serialization.HEADER_KEY: serialization.encode_header(header)})


def _saves_and_loads(model, path, **kw):
    cnn_gpu.save(model, path, **kw)
    loaded = cnn_gpu.load(path)
    assert serialization.describe(loaded) == serialization.describe(model)


def _refused_unwritten(model, path, match, **kw):
    with pytest.raises(ValueError, match=match) as info:
        cnn_gpu.save(model, path, **kw)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not path.exists() and not list(path.parent.glob(f".{path.name}.*"))  # nothing written, no temporary


def test_depth_limit_on_both_sides_and_save_refuses_what_load_would(tmp_path):
    limit = serialization.MAX_DEPTH
    _saves_and_loads(_nested(limit), tmp_path / "at.npz")
    _refused_unwritten(
        _nested(limit + 1),
        tmp_path / "past.npz",
        f"not saved: cnn_gpu.load would refuse this model: architecture.*at most {limit} levels",
    )
    _write_model_file(tmp_path / "crafted.npz", serialization.describe(_nested(limit + 1)))
    with pytest.raises(ValueError, match=f"crafted.npz: architecture.*at most {limit} levels"):
        cnn_gpu.load(tmp_path / "crafted.npz")


def test_module_count_limit_on_both_sides(tmp_path):
    limit = serialization.MAX_CHILDREN  # modules counted: every container and leaf, the root included
    _saves_and_loads(nn.Sequential(*[nn.ReLU() for _ in range(limit - 1)]), tmp_path / "at.npz")
    _refused_unwritten(
        nn.Sequential(*[nn.ReLU() for _ in range(limit)]), tmp_path / "past.npz", f"at most .* and {limit} modules"
    )


@pytest.mark.parametrize(
    "field, at, past",
    [
        ("stride", serialization.MAX_INT, serialization.MAX_INT + 1),  # any int of a config: MAX_INT
        ("padding", serialization.MAX_INT, serialization.MAX_INT + 1),
    ],
)
def test_config_int_limit_on_both_sides(tmp_path, field, at, past):
    _saves_and_loads(nn.Conv2d(1, 1, 1, **{field: at}), tmp_path / "at.npz")
    _refused_unwritten(
        nn.Conv2d(1, 1, 1, **{field: past}),
        tmp_path / "past.npz",
        rf"config\.{field}\[0\]: expected an int in \[0, {serialization.MAX_INT}\]",
    )


def test_sizes_of_layers_built_to_read_their_shapes_on_both_sides(tmp_path):
    limit = serialization.MAX_UNKNOWN_SIZE
    _saves_and_loads(nn.BatchNorm2d(limit), tmp_path / "at.npz")
    _refused_unwritten(nn.BatchNorm2d(limit + 1), tmp_path / "past.npz", f"num_features: expected at most {limit}")
    _saves_and_loads(nn.MaxPool2d(limit, stride=1), tmp_path / "pool.npz")


def test_child_names_on_both_sides(tmp_path):
    from collections import OrderedDict

    _saves_and_loads(nn.Sequential(OrderedDict([("a" * 64, nn.ReLU())])), tmp_path / "at.npz")
    _refused_unwritten(
        nn.Sequential(OrderedDict([("a" * 65, nn.ReLU())])),
        tmp_path / "past.npz",
        r"children\[0\]: expected a \[unique name without dots, module\] pair",
    )


def test_header_size_limit_on_both_sides(tmp_path):
    """A header member (its .npy header included) of exactly MAX_HEADER_BYTES loads; one byte more
    is refused by save (and by load)."""
    limit, model = archive.MAX_HEADER_BYTES, nn.ReLU()
    meta = {"note": ""}
    if hasattr(serialization, "model_metadata"):  # what save adds to the caller's metadata
        meta = serialization.model_metadata(model, None, meta)
    base = len(
        _npy(
            serialization.encode_header(
                {
                    "format": serialization.FORMAT,
                    "version": serialization.VERSION,
                    "dtype": "float32",
                    "architecture": serialization.describe(model),
                    "metadata": meta,
                }
            )
        )
    )
    _saves_and_loads(model, tmp_path / "at.npz", metadata={"note": "x" * (limit - base)})
    _refused_unwritten(
        model,
        tmp_path / "past.npz",
        f"header .* takes {limit + 1:,} bytes, over the {limit:,}",
        metadata={"note": "x" * (limit - base + 1)},
    )
    _write_model_file(tmp_path / "crafted.npz", serialization.describe(model), metadata={"note": "x" * (limit - base + 1)})
    with pytest.raises(ValueError, match=f"expected at most {limit:,} bytes"):
        cnn_gpu.load(tmp_path / "crafted.npz")


def test_checkpoints_refuse_to_save_what_they_could_not_load(tmp_path):
    from cnn_gpu import optim
    from cnn_gpu.checkpoint import load_checkpoint, save_checkpoint
    from cnn_gpu.train import Position

    ok = tmp_path / "ok.npz"
    save_checkpoint(ok, _nested(serialization.MAX_DEPTH), position=Position(1))
    assert load_checkpoint(ok).position.epoch == 1
    path = tmp_path / "ckpt.npz"
    with pytest.raises(ValueError, match="ckpt.npz: not saved: cnn_gpu.load would refuse this model"):
        save_checkpoint(path, _nested(serialization.MAX_DEPTH + 1), position=Position(1))
    with pytest.raises(ValueError, match="ckpt.npz: not saved: its JSON header"):
        save_checkpoint(path, nn.ReLU(), position=Position(1), metadata={"x": "y" * archive.MAX_HEADER_BYTES})
    assert not path.exists() and not list(tmp_path.glob(".ckpt.npz.*"))
    del optim


@pytest.mark.parametrize("text, match", [("t" * 64, "approximate"), ("t" * 65, "a short string")])
def test_string_limit_on_both_sides(tmp_path, text, match):
    """A 64-character string passes the reader's field check (the layer then refuses the value);
    a 65-character one is refused by the field check."""
    _write_model_file(tmp_path / "m.npz", {"type": "GELU", "config": {"approximate": text}})
    with pytest.raises(ValueError, match=match):
        cnn_gpu.load(tmp_path / "m.npz")


@pytest.mark.parametrize(
    "length, match",
    [(0, "a list of 1 to 4 ints"), (2, None), (4, "output_size: expected an int or a pair"), (5, "a list of 1 to 4 ints")],
)
def test_list_length_limit_on_both_sides(tmp_path, length, match):
    """Lists of 1 to 4 ints pass the field check (4: the layer then refuses it); 0 or 5 do not."""
    _write_model_file(tmp_path / "m.npz", {"type": "AdaptiveAvgPool2d", "config": {"output_size": [1] * length}})
    if match is None:
        assert cnn_gpu.load(tmp_path / "m.npz").output_size == (1, 1)
        return
    with pytest.raises(ValueError, match=match):
        cnn_gpu.load(tmp_path / "m.npz")


def test_compression_ratio_limit_on_both_sides(tmp_path):
    """Compressed members past BOMB_MIN_BYTES and MAX_RATIO:1 are refused at open; at BOMB_MIN_BYTES
    (or under the ratio) they open."""

    def write(path, nbytes):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
            z.writestr("z.npy", _npy(np.zeros(nbytes, np.uint8))[: 128 + nbytes])
        return path

    header_len = len(_npy(np.zeros(archive.BOMB_MIN_BYTES, np.uint8))) - archive.BOMB_MIN_BYTES
    at = write(tmp_path / "at.npz", archive.BOMB_MIN_BYTES - header_len)
    with archive.Archive(at) as arc:
        assert arc.info("z")[0] == (archive.BOMB_MIN_BYTES - header_len,)
    with pytest.raises(ValueError, match=f"over {archive.MAX_RATIO}:1"):
        archive.Archive(write(tmp_path / "past.npz", archive.BOMB_MIN_BYTES - header_len + 1))


# ============================================================ Residual with a same-shape projection
def test_residual_with_a_same_shape_projection_shortcut_gradcheck(rng):
    """Body and a 1x1 stride-1 projection of the same shape (float64): dx and every parameter's
    gradient against central differences; dx includes the shortcut's share (dropping it, or
    passing dy through instead, keeps the shapes and is caught only here)."""
    g = np.random.default_rng(5)
    body = nn.Sequential(
        nn.Conv2d(3, 3, 3, padding=1, dtype=np.float64, generator=g),
        nn.Tanh(),
        nn.Conv2d(3, 3, 3, padding=1, bias=False, dtype=np.float64, generator=g),
    )
    block = nn.Residual(body, nn.Conv2d(3, 3, 1, dtype=np.float64, generator=g))
    x, R = rng.standard_normal((2, 3, 4, 4)), rng.standard_normal((2, 3, 4, 4))
    block.zero_grad()
    block.forward(x)
    dx = block.backward(R)

    def loss():
        return float((block.forward(x) * R).sum())

    assert_close(dx, numerical_grad(loss, x), 1e-7, "dx")
    names = []
    for name, p in block.named_parameters():
        assert_close(p.grad, numerical_grad(loss, p.data), 1e-7, name)
        names.append(name)
    assert names[-2:] == ["shortcut.weight", "shortcut.bias"]


# ============================================================ ONNX: non-square padding
def test_onnx_convolution_and_pooling_with_non_square_padding_match_onnxruntime(tmp_path):
    """Padding (1, 2) (rows, columns) in a convolution and a pooling: ONNX's pads are [top, left,
    bottom, right]. The models ending in a global average keep every shape with swapped pads: only
    the numbers tell."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    from cnn_gpu.onnx import export

    g = np.random.default_rng(2)
    models = {
        "conv": nn.Sequential(nn.Conv2d(2, 3, (3, 2), padding=(1, 2), generator=g)),
        "conv-global": nn.Sequential(nn.Conv2d(2, 4, 3, padding=(2, 0), generator=g), nn.AdaptiveAvgPool2d(1)),
        # one padded pooling per model: an avg pool's swap and a max pool's can cancel out
        "avg": nn.Sequential(nn.AvgPool2d(2, stride=1, padding=(1, 0)), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
        "max": nn.Sequential(nn.MaxPool2d(3, stride=1, padding=(0, 1)), nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    }
    x = np.random.default_rng(3).standard_normal((2, 2, 5, 7)).astype(np.float32)
    x[:, :, 0, :] += 3.0  # a border row and column unlike the rest: padding on the wrong side shows
    x[:, :, :, -1] -= 2.0
    for name, model in models.items():
        path = tmp_path / f"{name}.onnx"
        export(model, path, (1, 2, 5, 7))
        (got,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})
        model.eval()
        want = cnn_gpu.to_numpy(model.forward(x))
        assert got.shape == want.shape, name
        assert_close(got, want, 1e-5, name)


# ============================================================ conv2d's cache does not depend on the caller's x
def _layout(xp, a, layout):
    """The host array ``a`` (N, C, H, W) on ``xp`` in ``layout``: its own memory, which the test may write."""
    if layout == "nchw":
        return xp.asarray(a)
    if layout == "channels_last":  # a strided NCHW view of NHWC memory (what the CPU engine hands over)
        return xp.asarray(np.ascontiguousarray(a.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    big = np.zeros(a.shape[:3] + (a.shape[3] + 2,), a.dtype)  # a non-contiguous slice of a wider array
    big[..., 1:-1] = a
    return xp.asarray(big)[..., 1:-1]


CONV_CASES = {  # name: (C, F, kernel, stride, padding, groups, workspace_mb)
    "dense": (3, 4, 3, 1, 1, 1, None),
    "dense-stride2": (3, 4, 3, 2, 1, 1, None),
    "dense-chunked": (3, 4, 3, 1, 1, 1, 0.0005),  # the columns exceed the workspace: rebuilt in backward
    "dense-chunked-stride2": (3, 4, 3, 2, 1, 1, 0.0005),
    "one-channel": (1, 4, 3, 1, 1, 1, 0.0005),  # an NCHW array with C = 1 is channels-last too
    "grouped": (8, 8, 3, 1, 1, 2, None),
    "depthwise": (4, 8, 3, 1, 1, 4, None),
}


def _conv_grads_after_writing_x(xp, a, w, b, dy, layout, case, write: bool):
    C, F_, k, s, p, G, ws = CONV_CASES[case]
    x = _layout(xp, a, layout)
    with cnn_gpu.config.override(**({"workspace_mb": ws} if ws else {})):
        y, cache = F.conv2d_forward(x, xp.asarray(w), xp.asarray(b), s, p, groups=G)
        if write:
            x[...] = 1e3  # the caller reuses its buffer before the backward
        grads = F.conv2d_backward(xp.asarray(dy), cache)
    return [cnn_gpu.to_numpy(v) for v in grads]


@pytest.mark.parametrize("case", sorted(CONV_CASES))
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("engine", ["reference", "cpu", "cuda-standin"])
def test_conv2d_backward_does_not_read_the_callers_x_after_forward(request, engine, layout, case):
    """After y, cache = F.conv2d_forward(x, ...), writing into x changes neither dx nor dW nor db:
    every engine keeps what its backward needs (a copy only where the cache would otherwise refer
    to the caller's memory: a chunked convolution that rebuilds its columns, the transposed path,
    depthwise)."""
    if engine == "cuda-standin":
        xp = request.getfixturevalue("standin")
        ctx = cnn_gpu.config.override()
    else:
        xp, ctx = np, cnn_gpu.config.override(engine=engine)
    C, F_, k, s, p, G, _ = CONV_CASES[case]
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, C, 6, 5))
    w, b = rng.standard_normal((F_, C // G, k, k)), rng.standard_normal(F_)
    OH, OW = (6 + 2 * p - k) // s + 1, (5 + 2 * p - k) // s + 1
    dy = rng.standard_normal((3, F_, OH, OW))
    with ctx:
        want = _conv_grads_after_writing_x(xp, a, w, b, dy, layout, case, write=False)
        got = _conv_grads_after_writing_x(xp, a, w, b, dy, layout, case, write=True)
    for name, g1, g0 in zip(("dx", "dw", "db"), got, want):
        np.testing.assert_array_equal(g1, g0, err_msg=f"{name} changed with x ({engine}, {layout}, {case})")


# ============================================================ probability (soft) targets
def _soft_targets(rng, n=4, k=5):
    t = rng.random((n, k))
    return t / t.sum(axis=1, keepdims=True)


def test_soft_targets_with_negative_entries_or_rows_off_one_are_refused(rng):
    """Entries >= 0 and rows summing to 1 within PROBABILITY_SUM_TOLERANCE (1e-3, absolute): both
    sides of the tolerance, a negative entry, a NaN; a valid row's loss is -sum t log softmax(z)."""
    from cnn_gpu.functional.loss import PROBABILITY_SUM_TOLERANCE as tol

    assert tol == 1e-3  # as documented (README troubleshooting, CrossEntropyLoss)
    z = rng.standard_normal((4, 5))
    t = _soft_targets(rng)
    loss, _ = F.softmax_cross_entropy(z, t)
    want = -(t * (z - np.log(np.exp(z).sum(axis=1, keepdims=True)))).sum(axis=1).mean()
    assert_close(loss, want, 1e-12, "soft-target loss")
    for scale in (1 + 0.9 * tol, 1 - 0.9 * tol):  # inside the tolerance: accepted
        F.softmax_cross_entropy(z, t * scale)
    for scale in (1 + 1.1 * tol, 1 - 1.1 * tol, 2.0):
        bad = t.copy()
        bad[2] *= scale
        with pytest.raises(
            ValueError,
            match=r"labels: expected probability rows summing to 1 \(within 0.001\), "
            r"got row 2 summing to",
        ):
            F.softmax_cross_entropy(z, bad)
    neg = t.copy()
    neg[1, 0], neg[1, 1] = -0.25, neg[1, 1] + 0.25 + neg[1, 0]  # still sums to 1: the sign alone is refused
    with pytest.raises(ValueError, match=r"entries >= 0, got -0.25 in row 1"):
        F.softmax_cross_entropy(z, neg)
    nan = t.copy()
    nan[3, 4] = np.nan
    with pytest.raises(ValueError, match="row 3 summing to nan"):
        F.softmax_cross_entropy(z, nan)
    with pytest.raises(ValueError, match="entries >= 0"):
        nn.CrossEntropyLoss(label_smoothing=0.1).forward(z, neg)  # checked as given, before smoothing
    F.softmax_cross_entropy(z, neg, validate_range=False)  # the caller's choice: no check


def test_soft_targets_are_checked_on_the_device_without_a_host_sync(standin, rng):
    """On CuPy arrays the check costs no host sync: it sets the loss's flag, reported by
    check_labels() (the one host read), then reset; index labels' flag keeps its own message."""
    from standin import counting

    z = standin.asarray(rng.standard_normal((4, 5)).astype(np.float32))
    t = _soft_targets(rng).astype(np.float32)
    neg = t.copy()
    neg[1, 0], neg[1, 1] = -0.25, neg[1, 1] + 0.25 + neg[1, 0]  # sums to 1, one entry negative
    good, bad, neg = standin.asarray(t), standin.asarray(t * 1.5), standin.asarray(neg)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn.forward(z, good)  # warm-up: makes the flag
    for wrong in (bad, neg):
        with counting() as c:
            loss_fn.forward(z, good)
            loss_fn.forward(z, wrong)
            loss_fn.forward(z, good)
        assert c.total_syncs == 0, c.syncs
        with pytest.raises(
            ValueError,
            match=r"labels: expected probability rows with entries >= 0 summing to 1 "
            r"\(within 0.001\); a batch since the last check_labels\(\) held a row",
        ):
            loss_fn.check_labels()
        loss_fn.check_labels()  # reset
    with pytest.raises(ValueError, match=r"probability rows summing to 1"):
        F.softmax_cross_entropy(z, bad)  # without a flag: at once, as index labels are
