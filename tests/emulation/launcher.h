// launcher.h: runs a whole CUDA grid on the CPU (used with cuda_shim.h).
//
// Blocks run one after another. Inside a block, the first thread is run as a fiber
// (ucontext: makecontext once per fiber stack and launch, setcontext to start a thread; a switch
// at a barrier or at a thread's end is _setjmp / _longjmp, which, unlike swapcontext, makes no
// system call to save the signal mask: the emulation's reductions switch hundreds of thousands of
// times a launch). If it finishes without reaching __syncthreads, the block has no barrier
// (a valid kernel reaches a barrier in all threads of a block or in none), and the
// remaining threads run as plain calls; a __syncthreads reached by one of them is a
// reported error. Otherwise every thread runs as a fiber and the scheduler resumes the
// fibers round by round: a round runs each fiber until its next __syncthreads (or its
// end), so no thread passes a barrier before all threads reached it. Threads that end
// while others wait at a barrier are reported as a divergent barrier.
//
// `order` = 1 runs blocks, and threads inside a round, in reverse order: results that
// differ between the orders reveal races (a missing barrier, two threads writing one
// element) -- the harness compares both.
//
// Every launch runs on a fresh OS thread, so the thread_local statics that stand in for
// __shared__ memory start zeroed instead of holding a previous launch's values (which
// could hide a missing barrier). Launches are serialised by a mutex.
//
// Kernel arguments come as void** (like cuLaunchKernel): args[i] points at the i-th
// argument's value, whose type is taken from the kernel's signature.
#ifndef CNN_GPU_EMU_LAUNCHER_H
#define CNN_GPU_EMU_LAUNCHER_H

#include <setjmp.h>
#include <ucontext.h>

#include <cstddef>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace cnn_emu {

constexpr std::size_t kStackBytes = 128 * 1024;
constexpr unsigned kMaxBlock = 1024;

enum class State { Ready, AtBarrier, Done };

struct Fiber {
    ucontext_t start;    // the thread's entry on its stack (trampoline), reused for every block
    jmp_buf at_barrier;  // where it waits at a __syncthreads
    unsigned tid = 0;
    State state = State::Ready;
    bool made = false, started = false;
};

// Fiber stacks, reused across blocks and launches (guarded by launch_mutex).
inline std::vector<std::unique_ptr<char[]>> stacks;
inline std::mutex launch_mutex;
inline std::string last_error;

struct Scheduler {
    jmp_buf main_jb;  // the scheduler, where a fiber returns at a barrier or at its end
    std::vector<Fiber> fibers;
    Fiber* current = nullptr;
    bool fiber_mode = false;
    unsigned direct_tid = 0;
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
    std::string error;
};

inline thread_local Scheduler sched;

inline void fail(const std::string& msg) {
    if (sched.error.empty()) sched.error = msg;
}

inline void trampoline() {
    sched.body(sched.body_arg);
    sched.current->state = State::Done;
    _longjmp(sched.main_jb, 1);  // never returns (the context has no uc_link)
}

inline void prepare_fiber(unsigned t) {
    while (stacks.size() <= t) stacks.emplace_back(new char[kStackBytes]);
    Fiber& f = sched.fibers[t];
    f.tid = t;
    f.state = State::Ready;
    f.started = false;
    if (!f.made) {  // (a fresh OS thread per launch, so a fresh Scheduler: made once per launch)
        getcontext(&f.start);
        f.start.uc_stack.ss_sp = stacks[t].get();
        f.start.uc_stack.ss_size = kStackBytes;
        f.start.uc_link = nullptr;
        makecontext(&f.start, trampoline, 0);
        f.made = true;
    }
}

inline void resume(unsigned t) {
    Fiber& f = sched.fibers[t];
    f.state = State::Ready;
    threadIdx.x = t;
    threadIdx.y = threadIdx.z = 0;
    sched.current = &f;
    if (_setjmp(sched.main_jb) == 0) {
        if (!f.started) {
            f.started = true;
            setcontext(&f.start);  // runs the thread from its start on its own stack
        }
        _longjmp(f.at_barrier, 1);
    }
    // back from the fiber: at a barrier, or done
}

inline void run_block(unsigned n, bool reverse) {
    sched.fibers.resize(n);
    const unsigned first = reverse ? n - 1 : 0;
    auto tid_at = [&](unsigned k) { return reverse ? n - 1 - k : k; };

    sched.fiber_mode = true;
    prepare_fiber(first);
    resume(first);
    if (sched.fibers[first].state == State::Done) {
        // no barrier in this block: run the other threads as plain calls
        sched.fiber_mode = false;
        for (unsigned k = 1; k < n; ++k) {
            const unsigned t = tid_at(k);
            threadIdx.x = t;
            threadIdx.y = threadIdx.z = 0;
            sched.direct_tid = t;
            sched.body(sched.body_arg);
        }
        return;
    }
    for (unsigned k = 1; k < n; ++k) prepare_fiber(tid_at(k));
    bool first_round = true;
    for (;;) {
        for (unsigned k = 0; k < n; ++k) {
            const unsigned t = tid_at(k);
            if (first_round && t == first) continue;  // already waiting at the first barrier
            if (sched.fibers[t].state != State::Done) resume(t);
        }
        first_round = false;
        unsigned waiting = 0, done = 0;
        for (unsigned t = 0; t < n; ++t) {
            if (sched.fibers[t].state == State::AtBarrier) ++waiting;
            if (sched.fibers[t].state == State::Done) ++done;
        }
        if (waiting == 0) return;
        if (done != 0) {
            fail("divergent __syncthreads in block " + std::to_string(blockIdx.x) + ": " +
                 std::to_string(done) + " thread(s) finished while " + std::to_string(waiting) +
                 " wait at a barrier");
            return;  // the waiting fibers are abandoned; their stacks are reused
        }
    }
}

template <typename Arg>
using arg_t = std::remove_cv_t<std::remove_reference_t<Arg>>;

template <typename... Args, std::size_t... I>
void call_kernel(void (*k)(Args...), void** args, std::index_sequence<I...>) {
    k(*static_cast<arg_t<Args>*>(args[I])...);
}

template <typename... Args>
struct Call {
    void (*k)(Args...);
    void** args;
    static void run(void* self) {
        auto* c = static_cast<Call*>(self);
        call_kernel(c->k, c->args, std::index_sequence_for<Args...>{});
    }
};

template <typename... Args>
void run_grid(void (*k)(Args...), unsigned grid, unsigned block, int order, void** args) {
    Call<Args...> call{k, args};
    sched.body = &Call<Args...>::run;
    sched.body_arg = &call;
    gridDim = {grid, 1, 1};
    blockDim = {block, 1, 1};
    const bool reverse = order != 0;
    for (unsigned i = 0; i < grid && sched.error.empty(); ++i) {
        blockIdx = {reverse ? grid - 1 - i : i, 0, 0};
        run_block(block, reverse);
    }
}

template <typename... Args>
int launch(void (*k)(Args...), unsigned grid, unsigned block, int order, void** args) {
    std::lock_guard<std::mutex> lock(launch_mutex);
    last_error.clear();
    if (grid == 0 || block == 0 || block > kMaxBlock) {
        last_error = "invalid launch configuration: grid " + std::to_string(grid) + ", block " + std::to_string(block);
        return 1;
    }
    std::thread worker([&] {
        run_grid(k, grid, block, order, args);
        last_error = sched.error;
    });
    worker.join();
    return last_error.empty() ? 0 : 1;
}

// ---- the kernel's parameter types as a string: "f*,f*,i,q,f,d" -------------------------
template <typename T> struct code;
template <> struct code<int> { static const char* get() { return "i"; } };
template <> struct code<unsigned> { static const char* get() { return "u"; } };
template <> struct code<long long> { static const char* get() { return "q"; } };
template <> struct code<float> { static const char* get() { return "f"; } };
template <> struct code<double> { static const char* get() { return "d"; } };
template <> struct code<__half> { static const char* get() { return "h"; } };
template <typename T> struct code<T*> {
    static std::string get() { return std::string(code<std::remove_cv_t<T>>::get()) + "*"; }
};

template <typename... Args>
std::string signature(void (*)(Args...)) {
    std::string s;
    ((s += (s.empty() ? "" : ","), s += code<arg_t<Args>>::get()), ...);
    return s;
}

}  // namespace cnn_emu

void __syncthreads() {
    using namespace cnn_emu;
    if (!sched.fiber_mode) {
        fail("__syncthreads reached by thread " + std::to_string(sched.direct_tid) + " of block " +
             std::to_string(blockIdx.x) + " although the block's first thread finished without it "
             "(divergent barrier)");
        return;
    }
    Fiber* f = sched.current;
    f->state = State::AtBarrier;
    if (_setjmp(f->at_barrier) == 0) _longjmp(sched.main_jb, 1);
}

extern "C" const char* emu_last_error() { return cnn_emu::last_error.c_str(); }

#endif  // CNN_GPU_EMU_LAUNCHER_H
