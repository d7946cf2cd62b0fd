"""Bad input: one test per mistake. Each asserts the exception type and that the message
names the argument and both what was expected and what was given."""

from __future__ import annotations

import re

import numpy as np
import pytest

import cnn_gpu
import cnn_gpu.functional as F
from cnn_gpu import nn


def raises(exc, *fragments):
    """pytest.raises(exc) whose message must contain every fragment (literally)."""
    return pytest.raises(exc, match="(?s)" + ".*".join(re.escape(f) for f in fragments))


def a(xp, *shape, dtype=np.float32):
    return xp.asarray(np.random.default_rng(0).standard_normal(shape).astype(dtype))


def test_conv2d_wrong_rank(xp):
    with raises(ValueError, "x:", "expected a 4-D array", "got float32 array of shape (3, 8, 8)"):
        F.conv2d_forward(a(xp, 3, 8, 8), a(xp, 2, 3, 3, 3))


def test_conv2d_channel_mismatch(xp):
    with raises(ValueError, "w:", "expected 3 input channels", "got float32 array of shape (4, 2, 3, 3)"):
        F.conv2d_forward(a(xp, 1, 3, 8, 8), a(xp, 4, 2, 3, 3))


def test_conv2d_kernel_larger_than_padded_input(xp):
    with raises(ValueError, "kernel_size:", "must fit the padded input 6x6", "got kernel 7x3"):
        F.conv2d_forward(a(xp, 1, 1, 4, 4), a(xp, 2, 1, 7, 3), padding=1)
    with raises(ValueError, "kernel_size:", "(dilated) kernel 5x5 must fit the padded input 4x4", "dilation 2,2"):
        F.conv2d_forward(a(xp, 1, 1, 4, 4), a(xp, 2, 1, 3, 3), dilation=2)


def test_cross_entropy_float_labels_of_rank_1(xp):
    with raises(TypeError, "labels:", "expected integer class indices of shape (4,)", "got float32 array of shape (4,)"):
        F.softmax_cross_entropy(a(xp, 4, 3), xp.asarray(np.array([0.0, 1.0, 2.0, 1.0], np.float32)))


def test_cross_entropy_labels_out_of_range(xp):
    with raises(ValueError, "labels:", "expected class indices in [0, 2]", "got values in [0, 3]"):
        F.softmax_cross_entropy(a(xp, 4, 3), xp.asarray(np.array([0, 1, 3, 2])))
    with raises(ValueError, "labels:", "expected class indices in [0, 2]", "got values in [-1, 2]"):
        F.softmax_cross_entropy(a(xp, 4, 3), xp.asarray(np.array([0, -1, 2, 2])))


def test_cross_entropy_batch_size_mismatch(xp):
    with raises(ValueError, "labels:", "expected class indices of shape (4,)", "got int64 array of shape (3,)"):
        F.softmax_cross_entropy(a(xp, 4, 3), xp.asarray(np.array([0, 1, 2], np.int64)))
    with raises(ValueError, "labels:", "expected a one-hot array of shape (4, 3)", "got float32 array of shape (3, 3)"):
        F.softmax_cross_entropy(a(xp, 4, 3), a(xp, 3, 3))


def test_unknown_backend():
    with raises(ValueError, "backend:", "expected one of ('numpy', 'cupy', 'auto')", "got 'gpu0'"):
        with cnn_gpu.use_backend("gpu0"):
            pass


def test_dtype_mismatch_float64_weights_float32_input(xp):
    with raises(TypeError, "w:", "expected dtype float32 (the dtype of x)", "got float64"):
        F.conv2d_forward(a(xp, 1, 2, 5, 5), a(xp, 3, 2, 3, 3, dtype=np.float64))
    with raises(TypeError, "w:", "expected dtype float32 (the dtype of x)", "got float64"):
        F.linear_forward(a(xp, 2, 5), a(xp, 3, 5, dtype=np.float64))
    layer = nn.Linear(5, 3, dtype=np.float64, generator=0).to(xp.__name__)
    with raises(TypeError, "w:", "expected dtype float32", "got float64"):
        layer(a(xp, 2, 5))


def test_bad_stride_zero(xp):
    with raises(ValueError, "stride:", "expected values >= 1", "got 0"):
        F.conv2d_forward(a(xp, 1, 1, 5, 5), a(xp, 1, 1, 3, 3), stride=0)
    with raises(ValueError, "stride:", "expected values >= 1", "got (1, 0)"):
        F.max_pool2d_forward(a(xp, 1, 1, 5, 5), 2, stride=(1, 0))
    with raises(ValueError, "stride:", "expected values >= 1", "got 0"):
        nn.Conv2d(1, 1, 3, stride=0)


def test_pool_padding_more_than_half_the_kernel(xp):
    with raises(ValueError, "padding:", "expected at most half the kernel size (1, 1)", "got (2, 2)"):
        F.max_pool2d_forward(a(xp, 1, 1, 6, 6), 3, 1, 2)
    with raises(ValueError, "padding:", "expected at most half the kernel size (1, 2)", "got (0, 3)"):
        F.avg_pool2d_forward(a(xp, 1, 1, 6, 6), (2, 4), 1, (0, 3))


def test_backward_dy_of_the_wrong_shape(xp):
    x = a(xp, 2, 3, 6, 6)
    _, cache = F.avg_pool2d_forward(x, 3, 2, 1)  # output (2, 3, 3, 3)
    with raises(ValueError, "dy:", "expected shape (2, 3, 3, 3)", "got float32 array of shape (2, 3, 2, 3)"):
        F.avg_pool2d_backward(a(xp, 2, 3, 2, 3), cache)
    _, cache = F.max_pool2d_forward(x, 2)
    with raises(ValueError, "dy:", "expected shape (2, 3, 3, 3)", "got float32 array of shape (2, 3, 3, 2)"):
        F.max_pool2d_backward(a(xp, 2, 3, 3, 2), cache)
    _, cache = F.linear_forward(a(xp, 4, 5), a(xp, 3, 5))
    with raises(ValueError, "dy:", "expected shape (4, 3)", "got float32 array of shape (4, 2)"):
        F.linear_backward(a(xp, 4, 2), cache)
    _, cache = F.relu_forward(x)
    with raises(TypeError, "dy:", "expected dtype float32", "got float64"):
        F.relu_backward(a(xp, 2, 3, 6, 6, dtype=np.float64), cache)


def test_accumulate_into_mistakes(xp):
    x, w, b = a(xp, 2, 3, 5, 5), a(xp, 4, 3, 3, 3), a(xp, 4)
    y, cache = F.conv2d_forward(x, w, b)
    dy = a(xp, *y.shape)
    with raises(TypeError, "accumulate_into:", "expected None or a tuple of 2 arrays or Nones (dw, db)", "got list of 1"):
        F.conv2d_backward(dy, cache, accumulate_into=[xp.zeros_like(w)])
    with raises(ValueError, "accumulate_into[dw]:", "expected shape (4, 3, 3, 3)", "got float32 array of shape (4, 27)"):
        F.conv2d_backward(dy, cache, accumulate_into=(xp.zeros((4, 27), np.float32), xp.zeros_like(b)))
    with raises(TypeError, "accumulate_into[db]:", "expected dtype float32", "got float64"):
        F.conv2d_backward(dy, cache, accumulate_into=(xp.zeros_like(w), xp.zeros(4)))
    with raises(ValueError, "accumulate_into[db]:", "expected an array of shape (4,)", "got None"):
        F.conv2d_backward(dy, cache, accumulate_into=(xp.zeros_like(w), None))
    _, cache_nb = F.conv2d_forward(x, w)
    with raises(ValueError, "accumulate_into[db]:", "expected None (the op has no db", "got float32 array of shape (4,)"):
        F.conv2d_backward(dy, cache_nb, accumulate_into=(xp.zeros_like(w), xp.zeros_like(b)))


def test_accumulate_into_on_another_backend_standin(standin):
    x, w = a(standin, 2, 3, 5, 5), a(standin, 4, 3, 3, 3)
    y, cache = F.conv2d_forward(x, w)
    with raises(TypeError, "accumulate_into[dw]:", "expected an array on the same backend as dy", "numpy.ndarray"):
        F.conv2d_backward(a(standin, *y.shape), cache, accumulate_into=(np.zeros(w.shape, np.float32), None))


def test_accumulate_into_read_only_and_batch_norm():
    x = a(np, 4, 2, 3, 3)
    y, cache = F.batch_norm_forward(x, a(np, 2), a(np, 2), None, None, True)
    ro = np.zeros(2, np.float32)
    ro.flags.writeable = False
    with raises(ValueError, "accumulate_into[dgamma]:", "expected a writable array", "got a read-only one"):
        F.batch_norm_backward(a(np, *y.shape), cache, accumulate_into=(ro, np.zeros(2, np.float32)))
    with raises(ValueError, "accumulate_into[dbeta]:", "expected shape (2,)", "got float32 array of shape (3,)"):
        F.batch_norm_backward(a(np, *y.shape), cache, accumulate_into=(np.zeros(2, np.float32), np.zeros(3, np.float32)))
    lin_y, lin_cache = F.linear_forward(a(np, 3, 4), a(np, 2, 4))
    with raises(ValueError, "accumulate_into[db]:", "expected None (the op has no db"):
        F.linear_backward(a(np, 3, 2), lin_cache, accumulate_into=(np.zeros((2, 4), np.float32), np.zeros(2, np.float32)))


def test_num_batches_tracked_mistakes(xp):
    x, rm, rv = a(xp, 4, 2, 3, 3), xp.zeros(2, np.float32), xp.ones(2, np.float32)
    with raises(TypeError, "num_batches_tracked:", "expected a 0-d int64 array", "got float32 array of shape ()"):
        F.batch_norm_forward(x, None, None, rm, rv, True, num_batches_tracked=xp.zeros((), np.float32))
    with raises(TypeError, "num_batches_tracked:", "expected a 0-d int64 array", "got int64 array of shape (1,)"):
        F.batch_norm_forward(x, None, None, rm, rv, True, num_batches_tracked=xp.zeros(1, np.int64))
    with raises(TypeError, "num_batches_tracked:", "expected a 0-d int64 array", "got int 3"):
        F.batch_norm_forward(x, None, None, rm, rv, True, num_batches_tracked=3)


def test_add_mistakes(xp):
    with raises(ValueError, "b:", "expected shape (2, 3)", "got float32 array of shape (1, 3)"):
        F.add_forward(a(xp, 2, 3), a(xp, 1, 3))  # no broadcasting
    with raises(TypeError, "b:", "expected dtype float32 (the dtype of a)", "got float64"):
        F.add_forward(a(xp, 2, 3), a(xp, 2, 3, dtype=np.float64))
    with raises(ValueError, "activation:", "expected one of", "got 'tanh'"):
        F.add_forward(a(xp, 2, 3), a(xp, 2, 3), "tanh")
    y, cache = F.add_forward(a(xp, 2, 3), a(xp, 2, 3), "relu")
    with raises(ValueError, "dy:", "expected shape (2, 3)", "got float32 array of shape (3, 2)"):
        F.add_backward(a(xp, 3, 2), cache)
    with raises(TypeError, "cache:", "expected the AddCache of add_forward", "got ndarray"):
        F.add_backward(a(xp, 2, 3), y)
