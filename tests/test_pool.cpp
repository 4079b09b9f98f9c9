// The thread pool with more threads than some jobs have chunks: a worker that
// sits out one job must never run part of the next one twice, and every
// chunk of every job runs exactly once. (With 2 threads every worker takes
// part in every job; 8 threads exercise the workers that sit out.)
#include "common.h"

int main() {
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
    return report("test_pool");
}
