// The benchmark's yardstick: how fast this machine multiplies matrices when
// a tuned BLAS does it. It times OpenBLAS's sgemm, C = A B with three square
// float matrices of side 1024, on 1 and 2 threads, and prints one row per
// thread count (the median of 15 products after 3 of warm-up), in the
// bench table's columns. The bench rows' model GFLOP/s over this row's is
// the share of the machine's matrix rate that a training step gets.
//
// The row names the kernel OpenBLAS chose for this CPU. A CPU newer than the
// library gets an older kernel (OpenBLAS 0.3.21 runs its AVX2 "Haswell" one
// on a Zen 5, at half the machine's rate); OPENBLAS_CORETYPE=SkylakeX, for
// example, picks another.
//
// It is built only when CMake finds an OpenBLAS library (Debian: libopenblas0),
// and it declares the three functions it calls itself, so no BLAS header or
// development package is needed; nothing else in the project uses BLAS.
//
//   sgemm [N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <vector>

extern "C" {
// From cblas.h: C = alpha A B + beta C, all row-major (order 101, no transposes 111).
void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
void openblas_set_num_threads(int n);
char* openblas_get_corename(void);
}

int main(int argc, char** argv) {
    const int n = argc > 1 ? std::atoi(argv[1]) : 1024;
    if (n < 16 || n > 8192) {
        std::fprintf(stderr, "usage: sgemm [N], 16 <= N <= 8192 (default 1024)\n");
        return 2;
    }
    std::vector<float> a((size_t)n * n), b((size_t)n * n), c((size_t)n * n);
    uint32_t s = 1;
    for (auto* v : {&a, &b})
        for (float& x : *v) s = s * 1664525u + 1013904223u, x = (float)(s >> 8) / (1 << 24) - 0.5f;
    for (int threads = 1; threads <= 2; threads++) {
        openblas_set_num_threads(threads);
        std::vector<double> ms;
        for (int rep = 0; rep < 18; rep++) {
            auto t0 = std::chrono::steady_clock::now();
            cblas_sgemm(101, 111, 111, n, n, n, 1.f, a.data(), n, b.data(), n, 0.f, c.data(), n);
            double t = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
            if (rep >= 3) ms.push_back(t);
        }
        std::sort(ms.begin(), ms.end());
        const double med = ms[ms.size() / 2];
        std::printf("| sgemm      | OpenBLAS %d^3 %-9s | %d | %8.2f |           | %7.1f |         |         |                  |\n", n,
                    openblas_get_corename(), threads, med, 2.0 * n * n * n / (med / 1000) / 1e9);
    }
    return 0;
}
