// selftest.cu: deliberately broken kernels that the CPU emulator must catch
// (tests/test_kernels_emul.py::test_emul_harness_*). Not part of the library.
#include "common.cuh"

// Correct: out[0] = sum(x) with the library's block reduction (one block).
extern "C" __global__ void good_block_sum(const float* x, float* out, int n) {
    __shared__ float sh[CNN_MAX_BLOCK];
    float part = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) part += x[i];
    const float total = cnn_block_sum(part, sh);
    if (threadIdx.x == 0) out[0] = total;
}

// Race: the barrier between writing shared memory and the first tree level is missing,
// so a thread may read a neighbour's slot before the neighbour wrote it.
extern "C" __global__ void racy_block_sum(const float* x, float* out, int n) {
    __shared__ float sh[CNN_MAX_BLOCK];
    float part = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) part += x[i];
    sh[threadIdx.x] = part;
    // missing: __syncthreads();
    for (unsigned s = blockDim.x / 2; s > 0; s >>= 1) {
        if (threadIdx.x < s) sh[threadIdx.x] += sh[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[0] = sh[0];
}

// Divergent barrier: some threads leave before the others reach __syncthreads.
extern "C" __global__ void divergent_barrier(float* out) {
    if (threadIdx.x % 2 == 1) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

// Out-of-bounds write: the last thread writes one element past the end.
extern "C" __global__ void oob_write(float* out, long long n) {
    CNN_GRID_STRIDE_LOOP(i, n) { out[i + (i == n - 1 ? 1 : 0)] = 1.0f; }
}

// Write race: two threads store different values into the same element.
extern "C" __global__ void write_race(float* out, long long n) {
    CNN_GRID_STRIDE_LOOP(i, 2 * n) { out[i / 2] = (float)i; }
}

// Forgets to write the last element.
extern "C" __global__ void partial_write(float* out, long long n) {
    CNN_GRID_STRIDE_LOOP(i, n - 1) { out[i] = 1.0f; }
}
