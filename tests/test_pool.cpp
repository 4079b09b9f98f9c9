// The thread pool and parallel_for's cuts.
//
// 1. More threads than some jobs have chunks: a worker that sits out one job
//    must never run part of the next one twice, and every chunk of every job
//    runs exactly once. (With 2 threads every worker takes part in every job;
//    8 threads exercise the workers that sit out.)
// 2. Cuts that follow the work: when one half of the indices costs time and
//    the other none, the thread with the costly half gets fewer of them from
//    call to call, and every index still runs exactly once. The costly
//    indices sleep, so that the imbalance does not depend on how busy the
//    machine is.
// 3. A worker that does not come: with the workers held (they claim no
//    chunk), every job still finishes, each chunk run exactly once, all of
//    them by the calling thread. Were the caller to wait for its workers
//    instead, this test would hang (and CTest's timeout fail it).
#include "common.h"

static void test_sit_out() {
    set_threads(8);
    std::vector<std::atomic<int>> count(8);
    long wrong = 0;
    for (long it = 0; it < 20000; it++) {
        int n = it % 3 == 0 ? 8 : it % 3 == 1 ? 2 : 5;
        for (auto& c : count) c = 0;
        std::atomic<int>* cp = count.data();
        parallel_for(n, [=](int a, int b) {
            for (int i = a; i < b; i++) cp[i]++;
        });
        for (int i = 0; i < 8; i++) wrong += count[i].load() != (i < n ? 1 : 0);
        wrong += g_pool.pending.load() != 0;
    }
    check(wrong == 0, "20000 jobs of 8, 2 and 5 chunks on 8 threads: every chunk ran exactly once (%ld wrong)", wrong);
}

// 40 calls of parallel_for(64, ...) on 2 threads, in which the indices of one
// half sleep for 50 us each; returns where thread 0's chunk ended in the last
// call, and counts the indices that did not run exactly once.
static int cut_after(bool upper_slow, long& wrong) {
    constexpr int n = 64;
    std::vector<std::atomic<int>> count(n);
    std::atomic<int> end0{0};
    for (int call = 0; call < 40; call++) {
        for (auto& c : count) c = 0;
        std::atomic<int>* cp = count.data();
        std::atomic<int>* ep = &end0;
        parallel_for(n, [=](int a, int b) {
            if (a == 0) ep->store(b);
            for (int i = a; i < b; i++) {
                cp[i]++;
                if ((i >= n / 2) == upper_slow) std::this_thread::sleep_for(std::chrono::microseconds(50));
            }
        });
        for (int i = 0; i < n; i++) wrong += count[i].load() != 1;
    }
    return end0.load();
}

static void test_cuts_follow_work() {
    g_threads = 2;
    long wrong = 0;
    // Balanced, thread 0's chunk ends at 48 (upper half slow) or 16 (lower).
    const int up = cut_after(true, wrong), down = cut_after(false, wrong);
    check(up >= 42, "upper half slow: thread 0's chunk grows from [0, 32) to [0, %d) of 64 (balance: 48)", up);
    check(down <= 22, "then lower half slow: it shrinks to [0, %d) (balance: 16)", down);
    check(wrong == 0, "80 calls with moving cuts: every index ran exactly once (%ld wrong)", wrong);
    g_threads = 8;
}

static void test_late_workers() {
    g_threads = 8;
    {
        std::lock_guard<std::mutex> lock(g_pool.mu);
        g_pool.hold = true;
    }
    const std::thread::id me = std::this_thread::get_id();
    long wrong = 0;
    std::atomic<long> elsewhere{0};
    std::vector<std::atomic<int>> count(8);
    for (long it = 0; it < 2000; it++) {
        const int n = it % 3 == 0 ? 8 : it % 3 == 1 ? 2 : 5;
        for (auto& c : count) c = 0;
        std::atomic<int>* cp = count.data();
        std::atomic<long>* ep = &elsewhere;
        parallel_for(n, [=](int a, int b) {
            for (int i = a; i < b; i++) cp[i]++;
            if (std::this_thread::get_id() != me) (*ep)++;
        });
        for (int i = 0; i < 8; i++) wrong += count[i].load() != (i < n ? 1 : 0);
        wrong += g_pool.pending.load() != 0;
    }
    {
        std::lock_guard<std::mutex> lock(g_pool.mu);
        g_pool.hold = false;
    }
    check(wrong == 0 && elsewhere == 0,
          "2000 jobs with the workers held: every chunk ran exactly once (%ld wrong), on the calling thread (%ld elsewhere)",
          wrong, elsewhere.load());
}

int main() {
    test_sit_out();
    test_late_workers();
    test_cuts_follow_work();
    return report("test_pool");
}
