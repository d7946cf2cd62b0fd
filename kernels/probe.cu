// probe.cu: the kernel cnn_gpu launches once, when it first checks that CuPy can run its
// kernels on this machine (cnn_gpu/cuda/build.py: probe). A broken install -- no NVRTC, a
// driver too old for the toolkit, no usable device -- then fails at that check with one
// clear message instead of at the first op.
#include "common.cuh"

// out[i] = 3 * i + 1, a value the host checks.
extern "C" __global__ void cnn_probe(long long* out, long long n) {
    CNN_GRID_STRIDE_LOOP(i, n) { out[i] = 3 * i + 1; }
}
