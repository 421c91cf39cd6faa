// Emulates the CUDA built-ins that kernels/*.cu use, so g++ can build them for the CPU.
// fo_emulate_launch runs blocks in order and, inside a block, threads from the last to
// thread 0: thread 0 runs after every other thread of its block, which is what
// __syncthreads() guarantees before a thread-0 section such as finish_step's (enough for
// kernels whose only barrier precedes such a section). fo_emulate_launch_threads runs each
// block's threads as cooperative threads, __syncthreads() a barrier among them: for kernels
// whose threads read what others wrote after a barrier (kernels/factored.cuh).
#pragma once
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <ucontext.h>

#include <functional>
#include <vector>

struct fo_dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static fo_dim3 threadIdx;
static fo_dim3 blockIdx, blockDim, gridDim;

// The cooperative threads of fo_emulate_launch_threads: each a fiber (ucontext) on this
// one OS thread, run in turn until it reaches a barrier or ends; a barrier releases when
// every thread of the block has reached it or ended. (Real threads made a barrier cost a
// round of OS context switches: 75 s for one test.) A barrier that some threads of the
// block end without reaching aborts: on a GPU it would hang or be undefined.
struct FoFibers {
    std::vector<ucontext_t> context;
    std::vector<std::vector<char>> stacks;
    std::vector<int> state;  // 0 ready, 1 at the barrier, 2 ended
    ucontext_t scheduler;
    unsigned current = 0;
    const std::function<void()>* kernel = nullptr;
};
static FoFibers* fo_fibers = nullptr;  // set while a cooperative launch runs

inline void fo_fiber_entry() {
    (*fo_fibers->kernel)();
    fo_fibers->state[fo_fibers->current] = 2;  // (then uc_link: back to the scheduler)
}

#define __global__
#define __shared__ static  // one block runs at a time
inline void __syncthreads() {
    if (fo_fibers == nullptr) return;  // (sequential emulation: thread 0 runs last)
    FoFibers& f = *fo_fibers;
    f.state[f.current] = 1;
    swapcontext(&f.context[f.current], &f.scheduler);
}
inline void __threadfence() {}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;  // (thread 0 only, after a barrier)
    *p += v;
    return old;
}

// __shfl_xor_sync's value exchange (kernels/factored.cuh's fo_shfl_xor), for
// fo_emulate_launch_threads only: every thread of the block calls it alike.
static double fo_shfl_values[1024];
inline double fo_emulated_shfl_xor(double v, unsigned o) {
    fo_shfl_values[threadIdx.x] = v;
    __syncthreads();
    const double other = fo_shfl_values[threadIdx.x ^ o];
    __syncthreads();
    return other;
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

template <class Kernel>
void fo_emulate_launch_threads(unsigned grid, unsigned block, Kernel&& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    const std::function<void()> body = kernel;
    FoFibers fibers;
    fibers.kernel = &body;
    fibers.context.resize(block);
    fibers.stacks.assign(block, std::vector<char>(1 << 16));
    fo_fibers = &fibers;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        fibers.state.assign(block, 0);
        for (unsigned t = 0; t < block; ++t) {
            getcontext(&fibers.context[t]);
            fibers.context[t].uc_stack.ss_sp = fibers.stacks[t].data();
            fibers.context[t].uc_stack.ss_size = fibers.stacks[t].size();
            fibers.context[t].uc_link = &fibers.scheduler;
            makecontext(&fibers.context[t], fo_fiber_entry, 0);
        }
        for (;;) {
            for (unsigned t = 0; t < block; ++t) {
                if (fibers.state[t] != 0) continue;
                fibers.current = t;
                threadIdx.x = t;
                swapcontext(&fibers.scheduler, &fibers.context[t]);
            }
            unsigned waiting = 0, ended = 0;  // every thread is at the barrier or has ended
            for (unsigned t = 0; t < block; ++t) {
                waiting += fibers.state[t] == 1;
                ended += fibers.state[t] == 2;
            }
            if (waiting && ended) {  // a barrier some threads of the block never reach
                fprintf(stderr, "fo_emulate_launch_threads: a divergent __syncthreads()\n");
                abort();
            }
            if (!waiting) break;
            for (unsigned t = 0; t < block; ++t) fibers.state[t] = 0;
        }
    }
    fo_fibers = nullptr;
}
