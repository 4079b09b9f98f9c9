// Sparse cost, side by side: two models that differ only in the number of
// experts (PAIR_E_FEW and PAIR_E_MANY, with the same K and everything else)
// are built into one program and trained in alternating blocks of steps, so
// that both see the machine at the same moment. On a shared machine whose
// speed moves by tens of percent between runs, the ratio of two separate runs
// says more about the machine than about the experts; this one does not.
//
//   bench_pair pair NAME DATA lines|text BATCH THREADS
//
// prints one row of the benchmark's table: the median step time of each
// model (21 steps each, after 10 of warm-up) and their ratio.
//
// moe.cpp is a single file whose shape is fixed at compile time, so it is
// included twice, each time in its own namespace with its own
// MOE_N_EXPERTS. The standard headers come first, so that the copies in the
// namespaces find them already included; on_signal, moe.cpp's one function
// with C linkage, gets a different name in each copy.
#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <tuple>
#include <vector>
#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>
#endif

#define MOE_NO_MAIN
#define MOE_N_EXPERTS PAIR_E_FEW
#define on_signal on_signal_few
namespace few {
#include "../moe.cpp"
#include "bench_run.h"
}  // namespace few
#undef on_signal
#undef MOE_N_EXPERTS
#define MOE_N_EXPERTS PAIR_E_MANY
#define on_signal on_signal_many
namespace many {
#include "../moe.cpp"
#include "bench_run.h"
}  // namespace many

int main(int argc, char** argv) {
    if (argc != 7 || std::string(argv[1]) != "pair") {
        std::fprintf(stderr, "usage: bench_pair pair NAME DATA lines|text BATCH THREADS\n");
        return 2;
    }
    const std::string name = argv[2], data = argv[3];
    const bool text = std::string(argv[4]) == "text";
    const int B = std::atoi(argv[5]), threads = std::atoi(argv[6]);
    try {
        few::set_threads(threads), many::set_threads(threads);  // each copy has its own pool
        few::Run a;
        many::Run b;
        few::start_run(a, data, text, B);
        many::start_run(b, data, text, B);
        // Blocks of 4 steps of one model, then 4 of the other; the first step
        // of a block is not timed, since the other model's steps have just
        // pushed this one's weights and activations out of the caches.
        std::vector<double> ta, tb;
        int sa = 0, sb = 0;
        for (int i = 0; i < 10; i++) few::train_step(a, ++sa), many::train_step(b, ++sb);  // warm-up
        for (int block = 0; block < 7; block++)
            for (int side = 0; side < 2; side++)
                for (int i = 0; i < 4; i++) {
                    double t = side == 0 ? few::train_step(a, ++sa) : many::train_step(b, ++sb);
                    if (i > 0) (side == 0 ? ta : tb).push_back(t);
                }
        double ma = few::median(ta), mb = many::median(tb);
        char shape[64];
        std::snprintf(shape, sizeof shape, "L%d C%d K%d T%d", few::N_LAYER, few::C, few::K, few::BLOCK_SIZE);
        std::printf("| %-10s | %-20s | %d | E%d %.2f ms | E%d %.2f ms | ratio %.2f |\n", name.c_str(), shape, threads,
                    few::E, ma, many::E, mb, mb / ma);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
