// Emulates the CUDA built-ins that kernels/*.cu use, so g++ can build them for the CPU.
// fo_emulate_launch runs blocks in order and, inside a block, threads from the last to
// thread 0: thread 0 runs after every other thread of its block, which is what
// __syncthreads() guarantees before a thread-0 section such as finish_step's (enough for
// kernels whose only barrier precedes such a section). fo_emulate_launch_threads runs each
// block's threads as real threads, __syncthreads() a barrier among them: for kernels whose
// threads read what others wrote after a barrier (kernels/factored.cuh).
#pragma once
#include <math.h>

#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

struct fo_dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static thread_local fo_dim3 threadIdx;
static fo_dim3 blockIdx, blockDim, gridDim;

// A reusable barrier for the threads of one emulated block.
struct FoBarrier {
    std::mutex mutex;
    std::condition_variable cv;
    unsigned count = 0, waiting = 0, generation = 0;
    void wait() {
        std::unique_lock<std::mutex> lock(mutex);
        const unsigned gen = generation;
        if (++waiting == count) {
            waiting = 0;
            ++generation;
            cv.notify_all();
        } else {
            cv.wait(lock, [&] { return gen != generation; });
        }
    }
};
static FoBarrier* fo_barrier = nullptr;  // set while a threaded launch runs

#define __global__
#define __shared__ static  // one block runs at a time
inline void __syncthreads() {
    if (fo_barrier != nullptr) fo_barrier->wait();
}
inline void __threadfence() {}
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
    const unsigned long long old = *p;  // (thread 0 only, after a barrier)
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

template <class Kernel>
void fo_emulate_launch_threads(unsigned grid, unsigned block, Kernel&& kernel) {
    gridDim.x = grid;
    blockDim.x = block;
    FoBarrier barrier;
    barrier.count = block;
    fo_barrier = &barrier;
    for (unsigned b = 0; b < grid; ++b) {
        blockIdx.x = b;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < block; ++t) {
            threads.emplace_back([&kernel, t] {
                threadIdx.x = t;
                kernel();
            });
        }
        for (auto& thread : threads) thread.join();
    }
    fo_barrier = nullptr;
}
