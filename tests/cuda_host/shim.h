// Emulates the CUDA built-ins that kernels/*.cu use, so g++ can build them for the CPU.
// A launch runs blocks in order and, inside a block, threads from the last to thread 0:
// thread 0 runs after every other thread of its block, which is what __syncthreads()
// guarantees before finish_step's thread-0 section.
#pragma once
#include <math.h>

struct fo_dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static fo_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __shared__ static  // one block runs at a time
inline void __syncthreads() {}
inline void __threadfence() {}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;
    *p += v;
    return old;
}

template <class Kernel>
void fo_emulate_launch(unsigned grid, unsigned block, Kernel&& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        for (unsigned t = block; t-- > 0;) {
            threadIdx.x = t;
            kernel();
        }
    }
}
