// The benchmark. Each build of this file (one per model shape, see
// CMakeLists.txt) prints one row of a table:
//   training:  median ms per step (forward, backward, AdamW; 30 steps after 10
//              of warm-up), tokens/s, model GFLOP/s (counted from the shapes),
//              peak memory beside what the model needs, and a checksum of the
//              weights after those steps (equal for every thread count);
//   scaling:   one thread against two, measured side by side in one run;
//   busy:      the same beside busy threads that leave one core free;
//   sampling:  the time to make token 10 and token 250 of a sample with the
//              KV cache (median over 5 samples), and tokens/s.
//
//   bench header
//   bench train NAME DATA lines|text BATCH THREADS
//   bench scaling NAME DATA lines|text BATCH
//   bench busy NAME DATA lines|text BATCH
//   bench sample NAME DATA THREADS
#include "common.h"

#include <sys/resource.h>  // getrusage: peak memory (POSIX)

static double peak_mb() {
    rusage r;
    getrusage(RUSAGE_SELF, &r);
    return r.ru_maxrss / 1024.0;  // Linux reports kilobytes
}

// What the model needs: its five parameter-sized buffers (the weights, the
// forward pass's copy of them in matmul's panels, gradients, two AdamW
// moments) and the activations saved by the forward pass (and the backward
// pass's scratch).
static double model_mb(const Model& m) {
    size_t bytes = 5 * m.n_params * sizeof(real);
    auto add = [&](const auto& v) { bytes += v.capacity() * sizeof(v[0]); };
    for (const auto& a : m.L) {
        for (const auto* v : {&a.x, &a.ln1, &a.ln1_mean, &a.ln1_rstd, &a.qkv, &a.att, &a.atty, &a.x_mid, &a.ln2,
                              &a.ln2_mean, &a.ln2_rstd, &a.logits, &a.probs, &a.gate, &a.f, &a.moe_out, &a.moe.x,
                              &a.moe.h, &a.moe.th, &a.moe.hg, &a.moe.y, &a.noise_u, &a.noise_eps, &a.noisy, &a.lse,
                              &a.sh_h, &a.sh_th, &a.sh_hg, &a.sh_y, &a.pnorm, &a.f_seq})
            add(*v);
        add(a.chosen), add(a.routed), add(a.moe.slot_of), add(a.moe.slot_src);
    }
    for (const auto* v : {&m.x_out, &m.lnf, &m.lnf_mean, &m.lnf_rstd, &m.logits, &m.probs}) add(*v);
    for (const auto* v : {&g_bw.dres, &g_bw.dln, &g_bw.datty, &g_bw.dqkv, &g_bw.dlogits, &g_bw.dgate, &g_bw.dprobs,
                          &g_bw.drouter, &g_bw.moe.dy, &g_bw.moe.dhg, &g_bw.moe.dh, &g_bw.moe.dx, &g_bw.dnoise,
                          &g_bw.sh_dhg, &g_bw.sh_dh, &g_bw.dpnorm})
        add(*v);
    return bytes / (1024.0 * 1024.0);
}

static std::string shape() {
    char b[96];
    std::snprintf(b, sizeof b, "L%d C%d E%d K%d T%d", N_LAYER, C, E, K, BLOCK_SIZE);
    return TOP_P > 0 ? b + fmt(" p%g", TOP_P) : b;
}

#include "bench_run.h"

static void bench_train(const std::string& name, const std::string& data, bool text, int B, int threads) {
    set_threads(threads);
    Run r;
    start_run(r, data, text, B);
    const Model& m = r.m;
    std::vector<double> ms;
    int64_t tokens = 0, flops = 0, slots = 0, routed = 0;
    for (int step = 1; step <= 40; step++) {
        g_flops = 0;
        double t = train_step(r, step);
        if (step > 10) ms.push_back(t), tokens += m.n_targets, flops += g_flops, slots += m.slots, routed += m.routed;
    }
    double med = median(ms), total = std::accumulate(ms.begin(), ms.end(), 0.0);
    uint64_t hash = 1469598103934665603ull;  // FNV-1a of the weights' bytes
    for (real w : m.params) {
        unsigned char b[sizeof(real)];
        std::memcpy(b, &w, sizeof b);
        for (unsigned char c : b) hash = (hash ^ c) * 1099511628211ull;
    }
    std::printf("| %-10s | %-20s | %d | %8.2f | %9.0f | %7.1f | %7.1f | %7.1f | %016llx |\n", name.c_str(),
                shape().c_str(), threads, med, tokens / (total / 1000), flops / (total / 1000) / 1e9, peak_mb(),
                model_mb(m), (unsigned long long)hash);
    if (TOP_P > 0)  // what a token used, on average, over the timed steps (a fresh router: near its most)
        std::printf("| %-10s | top-p: %.2f experts per token (at most %d), %.0f of %zu parameters active per token |\n",
                    name.c_str(), (double)slots / (double)routed, K,
                    (double)m.n_params - (double)expert_params() * N_LAYER * (E - (double)slots / (double)routed),
                    m.n_params);
}

// Two threads against one, side by side: one model, whose steps alternate
// between 2 threads and 1 (the results do not depend on the thread count,
// so this is the same run either way), so that both figures see the same
// machine at the same time. Medians of 20 steps each, after 10 of warm-up.
static void bench_scaling(const std::string& name, const std::string& data, bool text, int B) {
    set_threads(2);
    Run r;
    start_run(r, data, text, B);
    std::vector<double> ms[2];
    for (int step = 1; step <= 50; step++) {
        g_threads = 1 + step % 2;
        double t = train_step(r, step);
        if (step > 10) ms[g_threads - 1].push_back(t);
    }
    double one = median(ms[0]), two = median(ms[1]);
    std::printf("| %-10s | %-20s | 1 and 2, alternating steps | 1 thread %.2f ms | 2 threads %.2f ms | speed-up %.2f |\n",
                name.c_str(), shape().c_str(), one, two, one / two);
}

// Two threads beside a busy program: as scaling, while threads of this
// program spin on all the cores but one (one on a 2-core machine), as other
// programs would, so that the model's two threads share one core's worth of
// time and more. The mean is printed beside the median: a step that waits
// for a thread the system has paused is a long one, and a pool whose calls
// wait for their workers makes many of them.
static void bench_busy(const std::string& name, const std::string& data, bool text, int B) {
    set_threads(2);
    Run r;
    start_run(r, data, text, B);
    const unsigned hc = std::thread::hardware_concurrency(), n_busy = hc > 1 ? hc - 1 : 1;
    std::atomic<bool> stop{false};
    std::vector<std::thread> busy;
    for (unsigned i = 0; i < n_busy; i++)
        busy.emplace_back([&stop] {
            while (!stop.load(std::memory_order_relaxed)) {
            }
        });
    std::vector<double> ms[2];
    for (int step = 1; step <= 50; step++) {
        g_threads = 1 + step % 2;
        double t = train_step(r, step);
        if (step > 10) ms[g_threads - 1].push_back(t);
    }
    stop = true;
    for (auto& t : busy) t.join();
    auto mean = [](const std::vector<double>& v) { return std::accumulate(v.begin(), v.end(), 0.0) / v.size(); };
    std::printf("| %-10s | %-20s | 1 and 2 beside %u busy | 1 thread %.2f ms, mean %.2f | 2 threads %.2f ms, mean %.2f | "
                "speed-up %.2f, of the means %.2f |\n",
                name.c_str(), shape().c_str(), n_busy, median(ms[0]), mean(ms[0]), median(ms[1]), mean(ms[1]),
                median(ms[0]) / median(ms[1]), mean(ms[0]) / mean(ms[1]));
}

static void bench_sample(const std::string& name, const std::string& data, int threads) {
    set_threads(threads);
    Dataset d = load_dataset(data, true, 1, "");
    Model m;
    model_init(m, (int)d.vocab.size() + 1);
    Rng init = make_rng(1, STREAM_INIT), rng = make_rng(1, STREAM_SAMPLE);
    init_params(m.params, m.tensors, init);
    const int n = std::min(255, BLOCK_SIZE - 1);
    std::vector<double> t10, t250, all;
    for (int rep = 0; rep < 6; rep++) {
        std::vector<double> t;
        generate(m, {d.train_text[0]}, n, false, BLOCK_SIZE, 1.0, 0, rng, [&](int, double dt) { t.push_back(dt); });
        if (rep == 0) continue;  // warm-up
        t10.push_back(t[9]), t250.push_back(t[std::min(n, 250) - 1]);
        all.insert(all.end(), t.begin(), t.end());
    }
    double a = median(t10), b = median(t250);
    std::printf("| %-10s | %-20s | %d | token 10: %.3f ms | token %d: %.3f ms | ratio %.2f | %.0f tokens/s |\n",
                name.c_str(), shape().c_str(), threads, a, std::min(n, 250), b, b / a,
                all.size() / (std::accumulate(all.begin(), all.end(), 0.0) / 1000));
}

// The machine the table was measured on: the CPU (Linux's /proc/cpuinfo),
// the compiler, and the vector width and tile the matmul kernel was built
// for (section 14 of moe.cpp), which follow from the -march it was given.
static std::string cpuinfo(const std::string& key) {  // key's value for the first CPU, or "?"
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen("/proc/cpuinfo", "r"), std::fclose);
    char line[512];
    while (f && std::fgets(line, sizeof line, f.get()) && line[0] != '\n') {  // a blank line ends the first CPU
        std::string l = line;  // e.g. "model name\t: AMD EPYC\n"
        const size_t colon = l.find(':');
        if (colon == std::string::npos) continue;
        std::string k = l.substr(0, colon);
        k.erase(k.find_last_not_of(" \t") + 1);
        if (k != key) continue;
        l.erase(l.find_last_not_of('\n') + 1);
        const size_t v = l.find_first_not_of(' ', colon + 1);
        return v == std::string::npos ? "" : l.substr(v);
    }
    return "?";
}
static void print_machine() {
#if defined(__FMA__) || defined(__aarch64__)
    const char* fma = ", fused multiply-adds";
#else
    const char* fma = "";
#endif
#if defined(__clang__)
    const char* compiler = "";  // its __VERSION__ names it
#else
    const char* compiler = "g++ ";
#endif
    const char* isa = VBYTES == 64 ? "AVX-512" : VBYTES == 32 ? "AVX/AVX2" : "16-byte vectors (SSE2, NEON...)";
    std::printf("%s (family %s, model %s), %u hardware threads; %s%s; matmul kernel: %s, %d floats a vector, "
                "tiles of %d x %d%s\n\n",
                cpuinfo("model name").c_str(), cpuinfo("cpu family").c_str(), cpuinfo("model").c_str(),
                std::thread::hardware_concurrency(), compiler, __VERSION__, isa, VL, TM, TN, fma);
}

int main(int argc, char** argv) {
    std::string mode = argc > 1 ? argv[1] : "";
    try {
        if (mode == "header") {
            print_machine();
            std::printf("| config     | shape                | threads | ms/step | tokens/s | GFLOP/s | peak MB | model MB | weights checksum |\n");
            std::printf("|---|---|---|---|---|---|---|---|---|\n");
        } else if (mode == "train" && argc == 7) {
            bench_train(argv[2], argv[3], std::string(argv[4]) == "text", std::atoi(argv[5]), std::atoi(argv[6]));
        } else if (mode == "scaling" && argc == 6) {
            bench_scaling(argv[2], argv[3], std::string(argv[4]) == "text", std::atoi(argv[5]));
        } else if (mode == "busy" && argc == 6) {
            bench_busy(argv[2], argv[3], std::string(argv[4]) == "text", std::atoi(argv[5]));
        } else if (mode == "sample" && argc == 5) {
            bench_sample(argv[2], argv[3], std::atoi(argv[4]));
        } else {
            std::fprintf(stderr, "usage: bench header | train NAME DATA lines|text BATCH THREADS | scaling|busy NAME DATA lines|text BATCH | sample NAME DATA THREADS\n");
            return 2;
        }
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
