// The benchmark's yardsticks: how fast this machine multiplies matrices when
// a tuned BLAS does it, OpenBLAS's sgemm on 1 and 2 threads, printed as rows
// of the bench table.
//
//   sgemm [N]                  C = A B with three square float matrices of
//                              side N (1024): the machine's matrix rate. The
//                              bench rows' model GFLOP/s over this row's is
//                              the share of that rate a training step gets.
//   sgemm step L C T B V [E K] the products of the Linears of one training
//                              step of a GPT (L layers of C channels, MLPs
//                              of 4C hidden, B sequences of T positions, V
//                              tokens; with E experts, K per token: a
//                              router and E expert MLPs, each on an even
//                              share of the tokens' K choices), with the
//                              step's shapes and transposes, one sgemm
//                              each: the time a trainer that calls OpenBLAS
//                              spends in those products alone (most of a
//                              step's work), with no attention, no
//                              element-wise passes, no optimizer. A whole
//                              step's ms over this row's says how far above
//                              that it is.
//
// Each row is the median of 15 runs after 3 of warm-up. The square row
// names the kernel OpenBLAS chose for this CPU: a CPU newer than the library
// gets an older one (OpenBLAS 0.3.21 runs its AVX2 "Haswell" kernel on a Zen
// 5, at half the machine's rate); OPENBLAS_CORETYPE=SkylakeX, for example,
// picks another.
//
// It is built only when CMake finds an OpenBLAS library (Debian: libopenblas0),
// and it declares the three functions it calls itself, so no BLAS header or
// development package is needed; nothing else in the project uses BLAS.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

extern "C" {
// From cblas.h: C = alpha op(A) op(B) + beta C, all row-major (order 101);
// op is 111 (as it is) or 112 (transposed).
void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
void openblas_set_num_threads(int n);
char* openblas_get_corename(void);
}

static std::vector<float> random_floats(size_t n) {
    std::vector<float> v(n);
    static uint32_t s = 1;
    for (float& x : v) s = s * 1664525u + 1013904223u, x = (float)(s >> 8) / (1 << 24) - 0.5f;
    return v;
}

// Median ms of `run` over 15 calls after 3 of warm-up, on 1 and 2 threads;
// one table row each.
static void time_rows(const std::string& label, double flops, const std::function<void()>& run) {
    for (int threads = 1; threads <= 2; threads++) {
        openblas_set_num_threads(threads);
        std::vector<double> ms;
        for (int rep = 0; rep < 18; rep++) {
            auto t0 = std::chrono::steady_clock::now();
            run();
            double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            if (rep >= 3) ms.push_back(t);
        }
        std::sort(ms.begin(), ms.end());
        const double med = ms[ms.size() / 2];
        std::printf("| sgemm      | %-25s | %d | %8.2f |           | %7.1f |         |         |                  |\n",
                    label.c_str(), threads, med, flops / (med / 1000) / 1e9);
    }
}

// One product of a step, C (+)= op(A) op(B), on operands of its own: a step's
// activations and weights are separate memory, and one buffer reused for all
// would sit in the cache as no step's do.
struct Product {
    int m, n, k;
    bool ta, tb, acc;  // A or B transposed; accumulate (a weight gradient)
    int lda, ldb, ldc;
    std::vector<float> a, b, c;
};

static Product product(int m, int n, int k, bool ta, bool tb, bool acc) {
    Product p{m, n, k, ta, tb, acc, ta ? m : k, tb ? k : n, n, {}, {}, {}};
    p.a = random_floats((size_t)m * k), p.b = random_floats((size_t)k * n), p.c.assign((size_t)m * n, 0.f);
    return p;
}

// A Linear y = x W^T (x [M, in], W [out, in]) takes three products a step:
// y = x W^T; dx = dy W; dW += dy^T x.
static void add_linear(std::vector<Product>& ps, int M, int in, int out) {
    ps.push_back(product(M, out, in, false, true, false));
    ps.push_back(product(M, in, out, false, false, false));
    ps.push_back(product(out, in, M, true, false, true));
}

static void step_rows(int L, int C, int T, int B, int V, int E, int K) {
    std::vector<Product> ps;
    const int M = B * T;
    for (int l = 0; l < L; l++) {
        add_linear(ps, M, C, 3 * C);  // q, k, v
        add_linear(ps, M, C, C);      // attention's projection
        if (E > 1) add_linear(ps, M, C, E);  // the router
        for (int e = 0; e < E; e++) {        // each expert's MLP, on an even share of the M K choices
            add_linear(ps, M * K / E, C, 4 * C);
            add_linear(ps, M * K / E, 4 * C, C);
        }
    }
    add_linear(ps, M, C, V);  // lm_head
    double flops = 0;
    for (const Product& p : ps) flops += 2.0 * p.m * p.n * p.k;
    char label[64];
    if (E > 1)
        std::snprintf(label, sizeof label, "Linears L%d C%d E%dK%d %dx%d", L, C, E, K, B, T);
    else
        std::snprintf(label, sizeof label, "Linears L%d C%d %dx%d", L, C, B, T);
    time_rows(label, flops, [&ps] {
        for (Product& p : ps)
            cblas_sgemm(101, p.ta ? 112 : 111, p.tb ? 112 : 111, p.m, p.n, p.k, 1.f, p.a.data(), p.lda, p.b.data(),
                        p.ldb, p.acc ? 1.f : 0.f, p.c.data(), p.ldc);
    });
}

int main(int argc, char** argv) {
    if ((argc == 7 || argc == 9) && std::strcmp(argv[1], "step") == 0) {
        int s[7] = {0, 0, 0, 0, 0, 1, 1};  // L C T B V E K
        for (int i = 0; i < argc - 2; i++) s[i] = std::atoi(argv[2 + i]);
        const bool ok = std::all_of(s, s + 7, [](int v) { return v >= 1 && v <= 65536; });
        const int64_t tokens = (int64_t)s[2] * s[3];  // each expert needs at least one of the M K choices
        if (ok && s[6] <= s[5] && s[5] <= 256 && s[1] * tokens <= (1 << 22) && tokens * s[6] >= s[5]) {
            step_rows(s[0], s[1], s[2], s[3], s[4], s[5], s[6]);
            return 0;
        }
    } else if (argc <= 2) {
        const int n = argc > 1 ? std::atoi(argv[1]) : 1024;
        if (n >= 16 && n <= 8192) {
            std::vector<float> a = random_floats((size_t)n * n), b = random_floats((size_t)n * n), c((size_t)n * n);
            time_rows(std::string("OpenBLAS ") + std::to_string(n) + "^3 " + openblas_get_corename(), 2.0 * n * n * n,
                      [&] {
                          cblas_sgemm(101, 111, 111, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
                      });
            return 0;
        }
    }
    std::fprintf(stderr,
                 "usage: sgemm [N]               (16 <= N <= 8192, default 1024)\n"
                 "       sgemm step L C T B V [E K]  (each 1 to 65536, C*T*B <= 2^22, K <= E <= 256, E <= T*B*K)\n");
    return 2;
}
