// dropout.cu: inverted dropout with masks from counter-based random numbers.
//
// Element i of the draw is u_i = cnn_uniform<T>(cnn_random_bits(key, i)) (common.cuh): a pure
// function of (key, i), so no generator state is kept, a mask can be recomputed from its key,
// and the CPU (cnn_gpu/functional/counter_rng.py) draws the same bits. With p the drop
// probability and scale = 1 / (1 - p), both rounded to T on the host as the reference does:
//   mask[i] = u_i >= p ? scale : 0,   y[i] = x[i] * mask[i]
// The key changes every call: with use_scalars it is read (once per thread) from scalars (1,) =
// {key} in device memory, written by the host before the launch (a CUDA graph replays a frozen
// `key` argument); else the argument `key` is used and scalars is not read.
// float16 storage (dropout_forward_f16): u, p and scale in float (the float32 draw), y = x * scale
// rounded once; the stored mask is scale rounded to float16 (the backward's factor, 1e-4 apart).
#include "common.cuh"

#define DROPOUT_PARAMS(T)                                                                             \
    const T* __restrict__ x, T* __restrict__ y, T* __restrict__ mask, long long n, long long key,         \
    CNN_ACC(T) p, CNN_ACC(T) scale, const long long* __restrict__ scalars, int use_scalars
#define DROPOUT_ARGS x, y, mask, n, key, p, scale, scalars, use_scalars

template <typename T>
__device__ __forceinline__ void dropout_forward_body(DROPOUT_PARAMS(T)) {
    // the key's 64 bits, passed as a signed word
    const unsigned long long k = (unsigned long long)(use_scalars ? scalars[0] : key);
    typedef CNN_ACC(T) A;
    CNN_GRID_STRIDE_LOOP(i, n) {
        const A u = cnn_uniform<A>(cnn_random_bits(k, (unsigned long long)i));
        const A m = u >= p ? scale : A(0);
        mask[i] = cnn_st<T>(m);
        y[i] = cnn_st<T>(cnn_ld(x[i]) * m);
    }
}
CNN_ENTRY_POINTS_FP16(dropout_forward, DROPOUT_PARAMS, DROPOUT_ARGS)
