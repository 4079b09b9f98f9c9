/*
moe.cpp: a Mixture-of-Experts character-level Transformer in one C++17 file.

It trains a GPT-style model (makemore's Transformer) in which every
feed-forward block is a Mixture of Experts: a router picks the top K of E
small MLPs for each token, the token's output is the gate-weighted sum of the
chosen experts, and a load-balancing loss keeps the router from sending
everything to one expert. Forward, backward, AdamW, checkpoints and sampling
are all written out by hand, with the standard library and nothing else.

Build and run (the defaults train on names.txt for a few minutes):

    g++ -std=c++17 -O3 -march=native -fno-math-errno -pthread moe.cpp -o moe && ./moe

Change the model by redefining a constant at build time, e.g. eight experts
of which each token uses one:

    g++ -std=c++17 -O3 -march=native -fno-math-errno -pthread -DMOE_N_EXPERTS=8 -DMOE_TOP_K=1 moe.cpp -o moe

-DMOE_INFERENCE_ONLY=1 compiles out the backward pass and the optimizer: that
binary loads a checkpoint and samples or evaluates. ./moe --help lists flags.
-fno-math-errno changes no result; it lets AdamW's square roots be
vectorised (section 17), which makes a training step 10-15% faster.

The file has two parts, and reads top to bottom; each idea is explained
where it first appears. Part one is the trainer: plain, correct code, from
the configuration to main(). A reader who stops at its end has read all of
it. Part two, "Making it fast", holds every piece that exists only for
speed: the thread pool, the tiled matrix multiply, vectorised math, fused
passes. Each opens with the plain function it replaces and the test that
holds the two together. -DMOE_FAST=0 builds part one alone, on one thread,
so that a debugger steps through exactly the code one reads.

  Part one: the trainer
  1. Configuration          compile-time model constants
  2. Helpers                errors, random numbers, parallel_for, and the
                            kernels that part two makes fast
  3. Parameters             one buffer carved into named tensors; init
  4. Layers                 forward/backward pairs: matmul, softmax,
                            linear, GELU (what an expert is made of)
  5. The Mixture of Experts router, top-k gate, load-balancing loss,
                            experts; the variants: noisy gating, expert
                            capacity, router z-loss, shared and fine-grained
                            experts, loss-free balancing, sigmoid gates,
                            top-p routing, balance per sequence;
                            cross-entropy
  6. Attention, and the rest of the block: embedding, residual, layernorm,
                            causal self-attention
  7. The model              the layers wired together; saved activations
  8. AdamW                  the optimizer
  9. Data                   line mode (names) and text mode (a byte stream)
 10. Checkpoints            safetensors files PyTorch can load
 11. Evaluation and sampling, and the reports: routing tables, routing
                            dynamics, arithmetic accuracy, the routing
                            explorer, SVG pictures
 12. Command line and main  training, sampling, evaluation, knockout

  Part two: making it fast
 13. The thread pool        parallel_for, where it cuts a loop, and who
                            runs a chunk whose worker is late
 14. The tiled matmul       register tiles at the vector width, packed panels
 15. Vectorised math        exp and tanh on whole vectors, sums in 16 lanes
 16. Fast attention         a head's products in the tile kernel; the cached step
 17. AdamW, fused           the update writes the panels; zeroing, NaN check
 18. The experts, scheduled a shared counter; the dense baseline's shortcuts

Shapes in comments: B batch, T time (positions), C channels (N_EMBD),
H heads, hs head size, V vocabulary, E experts, K experts chosen per token,
F expert hidden width (4C unless MOE_FF), M rows (positions of a batch),
N positions that carry a target, S routing slots.
*/

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
#include <fcntl.h>     // open a directory, to fsync it after a rename
#include <sys/file.h>  // flock: one training run per work dir
#include <unistd.h>    // fsync: make a checkpoint durable before renaming it into place
#endif

// ============================================================================
// PART ONE: THE TRAINER
// ============================================================================

// ----------------------------------------------------------------------------
// 1. Configuration
//
// The model's shape is fixed at compile time, so the compiler sees every loop
// bound. Each constant can be overridden with -DMOE_NAME=value (CMake exposes
// them as cache variables). What a run does (data, steps, seed...) is a flag.

#ifndef MOE_N_LAYER
#define MOE_N_LAYER 4  // Transformer blocks
#endif
#ifndef MOE_N_HEAD
#define MOE_N_HEAD 4  // attention heads
#endif
#ifndef MOE_N_EMBD
#define MOE_N_EMBD 64  // channels C
#endif
#ifndef MOE_N_EXPERTS
#define MOE_N_EXPERTS 4  // experts E per MoE layer; 1 gives the dense baseline
#endif
#ifndef MOE_TOP_K
#define MOE_TOP_K 2  // experts K each token uses
#endif
#ifndef MOE_BLOCK_SIZE
#define MOE_BLOCK_SIZE 32  // longest context; the size of the position table
#endif
#ifndef MOE_FF  // hidden width of each expert (GPT's MLP uses 4C)
#define MOE_FF (4 * MOE_N_EMBD)
#endif
#ifndef MOE_NORM_TOPK  // renormalise the K chosen probabilities to sum to 1? (top-p: no, section 5 says why)
#define MOE_NORM_TOPK (MOE_TOP_K > 1 && !(MOE_TOP_P > 0))
#endif
// The MoE variants a reader can switch on, each explained where it lives
// (section 5, "The Mixture of Experts"). All are off by default.
#ifndef MOE_NOISY_GATE  // 1: noisy top-k gating while training (Shazeer et al. 2017)
#define MOE_NOISY_GATE 0
#endif
#ifndef MOE_CAPACITY_FACTOR  // > 0: an expert takes at most ceil(CF * tokens * K / E) slots per batch (Switch)
#define MOE_CAPACITY_FACTOR 0
#endif
#ifndef MOE_Z_COEF  // > 0: weight of the router z-loss (ST-MoE, Zoph et al. 2022)
#define MOE_Z_COEF 0
#endif
#ifndef MOE_N_SHARED  // experts every token uses besides its K routed ones (DeepSeekMoE)
#define MOE_N_SHARED 0
#endif
#ifndef MOE_BIAS_RATE  // > 0: loss-free balancing, a per-expert bias on the choice moved this much per step (DeepSeek-V3)
#define MOE_BIAS_RATE 0
#endif
#ifndef MOE_SIGMOID_GATE  // 1: router scores sigmoid(logits) instead of a softmax (DeepSeek-V3)
#define MOE_SIGMOID_GATE 0
#endif
#ifndef MOE_TOP_P  // > 0: dynamic routing, experts taken until their probability reaches P, at most MOE_TOP_K (Huang et al. 2024)
#define MOE_TOP_P 0
#endif
#ifndef MOE_ENTROPY_COEF  // weight of top-p's router entropy loss (the paper's 1e-4)
#define MOE_ENTROPY_COEF (MOE_TOP_P > 0 ? 1e-4 : 0)
#endif
#ifndef MOE_AUX_SCOPE  // where the aux loss measures balance: batch (the whole batch) or seq (each sequence, averaged)
#define MOE_AUX_SCOPE batch
#endif
#ifndef MOE_INFERENCE_ONLY  // 1: no backward, no optimizer, no training
#define MOE_INFERENCE_ONLY 0
#endif
#ifndef MOE_DOUBLE  // 1: compute in double (the gradient-check tests use it)
#define MOE_DOUBLE 0
#endif
#ifndef MOE_FAST  // 0: part one's plain code alone, on one thread (part two is left out)
#if defined(__GNUC__)  // g++ and clang++: part two's kernels use their vector extension
#define MOE_FAST 1
#else
#define MOE_FAST 0
#endif
#endif
#if MOE_FAST && !defined(__GNUC__)
#error "part two (MOE_FAST=1) is written with GCC and Clang's vector extension: build with g++ or clang++, or with MOE_FAST=0"
#endif

constexpr int N_LAYER = MOE_N_LAYER;
constexpr int N_HEAD = MOE_N_HEAD;
constexpr int C = MOE_N_EMBD;
constexpr int HS = C / N_HEAD;  // head size
constexpr int E = MOE_N_EXPERTS;
constexpr int K = MOE_TOP_K;
constexpr int F = MOE_FF;  // expert hidden width: fine-grained experts are many with a small F
constexpr bool NOISY_GATE = MOE_NOISY_GATE;
constexpr double CAPACITY_FACTOR = MOE_CAPACITY_FACTOR;
constexpr double Z_COEF = MOE_Z_COEF;
constexpr int NS = MOE_N_SHARED;
constexpr double BIAS_RATE = MOE_BIAS_RATE;
constexpr bool SIGMOID_GATE = MOE_SIGMOID_GATE;
constexpr double TOP_P = MOE_TOP_P;
constexpr double ENTROPY_COEF = MOE_ENTROPY_COEF;
enum class Scope { batch, seq };
constexpr Scope AUX_SCOPE = Scope::MOE_AUX_SCOPE;  // -DMOE_AUX_SCOPE=seq names Scope::seq
constexpr int BLOCK_SIZE = MOE_BLOCK_SIZE;
constexpr bool NORM_TOPK = MOE_NORM_TOPK;
constexpr bool INFERENCE_ONLY = MOE_INFERENCE_ONLY;
constexpr bool FAST = MOE_FAST;
constexpr float AUX_COEF = 0.01f;  // default weight of the load-balancing loss
constexpr int MAX_VOCAB = 257;     // 256 byte values + the start/end marker
static_assert(N_LAYER >= 1 && N_HEAD >= 1 && C >= 1 && F >= 1 && BLOCK_SIZE >= 2, "sizes must be positive");
static_assert(C % N_HEAD == 0, "MOE_N_EMBD must be a multiple of MOE_N_HEAD");
static_assert(E >= 1 && K >= 1 && K <= E, "need 1 <= MOE_TOP_K <= MOE_N_EXPERTS");
static_assert(NS >= 0 && CAPACITY_FACTOR >= 0 && Z_COEF >= 0 && BIAS_RATE >= 0, "MoE variant constants must not be negative");
static_assert(BIAS_RATE == 0 || E > 1, "bias balancing needs experts to choose between: MOE_N_EXPERTS > 1");
static_assert(!NOISY_GATE || E > 1, "noisy gating needs experts to choose between: MOE_N_EXPERTS > 1");
static_assert(TOP_P >= 0 && TOP_P <= 1 && ENTROPY_COEF >= 0, "MOE_TOP_P must be in [0, 1], MOE_ENTROPY_COEF >= 0");
static_assert(!SIGMOID_GATE || E > 1, "sigmoid gates need experts to choose between: MOE_N_EXPERTS > 1");
static_assert(ENTROPY_COEF == 0 || !SIGMOID_GATE, "the entropy loss needs probabilities: not with MOE_SIGMOID_GATE");
static_assert(TOP_P == 0 || (E > 1 && !SIGMOID_GATE && BIAS_RATE == 0),
              "top-p routing adds up probabilities that sum to 1 over the experts: it needs MOE_N_EXPERTS > 1 and the "
              "softmax router, not MOE_SIGMOID_GATE or MOE_BIAS_RATE (a bias would change the choice, not the sum)");

#if MOE_DOUBLE
using real = double;
#else
using real = float;
#endif

// ----------------------------------------------------------------------------
// 2. Helpers

// Every error is a message for the user: what went wrong and how to fix it.
// It is thrown, so files are closed and temporaries removed on the way out,
// and main() prints it and exits non-zero.
[[noreturn]] static void fail(const std::string& msg) { throw std::runtime_error(msg); }

// A random generator of our own (splitmix64), so a seed gives the same run
// with every compiler and standard library; std::normal_distribution does not.
struct Rng {
    uint64_t state;
    uint64_t next() {
        uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    double uniform() { return (next() >> 11) * (1.0 / 9007199254740992.0); }  // [0, 1)
    uint64_t below(uint64_t n) { return next() % n; }  // bias < n / 2^64: irrelevant here
    double normal() {  // Box-Muller; uses two uniforms per call, keeps no spare
        double u1 = 1.0 - uniform(), u2 = uniform();
        return std::sqrt(-2.0 * std::log(u1)) * std::cos(6.283185307179586 * u2);
    }
};
// Independent streams for independent jobs, so that (say) evaluating or
// sampling never shifts which batches training sees.
enum Stream : uint64_t { STREAM_INIT = 1, STREAM_SPLIT = 2, STREAM_TRAIN = 3, STREAM_SAMPLE = 4, STREAM_NOISE = 5,
                         STREAM_DROPOUT = 6 };
static Rng make_rng(uint64_t seed, Stream s) {
    Rng r{seed * 0x2545F4914F6CDD1Dull + s * 0x9E3779B97F4A7C15ull};
    r.next();
    return r;
}

// parallel_for(n, f) calls f(begin, end) on contiguous ranges that together
// cover [0, n) exactly once, maybe on several threads at the same time. The
// contract that makes that safe: no two indices write the same float, and
// every index is computed by the same code whichever range it falls in. Then
// the result does not depend on the number of threads, nor on where [0, n)
// is cut, and a run with --threads 1 and one with 2 save the same checkpoint.
// In the plain build (-DMOE_FAST=0) it is the plain loop f(0, n); part two
// (section 13) runs the ranges on a pool of threads.
[[maybe_unused]] static int g_threads = 1;  // threads parallel_for may use (--threads)
#if MOE_FAST
template <class Fn>
static void parallel_for(int n, const Fn& f);
static void set_threads(int n);
#else
template <class Fn>
static void parallel_for(int n, const Fn& f) {
    if (n > 0) f(0, n);
}
[[maybe_unused]] static void set_threads(int) {}
#endif

// The kernels that part two makes fast. A plain function below that has a
// fast twin begins with the line
//     if constexpr (FAST) if (fast::on) return fast::<its name>(...);
// so the default build runs the twin, and -DMOE_FAST=0 compiles the line
// away (with these declarations and part two). The twins compute the same
// thing: the matrix multiply bit for bit, the rest within a float rounding
// bound that tests/test_fast.cpp states and checks, by calling each plain
// function here with fast::on switched off. Skip this list on a first read.
struct Model; struct AdamW; struct LayerParams; struct MoeActs; struct MoeGrad; struct KVLayer;
namespace fast {
extern bool on;  // true; the tests switch it off to run the plain code in a fast build
void matmul(real* out, const real* A, int64_t as, int64_t ak, const real* B, int M, int N, int Kd, const real*, bool);
void linear_forward(real* out, const real* inp, const real* w, const real* b, int M, int IN, int OUT);
void bias_backward(real* db, const real* dout, int M, int OUT);
void layernorm_forward(real*, real*, real*, const real*, const real*, const real*, int);
void layernorm_backward(real*, real*, real*, const real*, const real*, const real*, const real*, const real*, int);
void attention_forward(real*, real*, const real*, const int*, const int*, const int64_t*, int, const real*);
void attention_backward(real*, const real*, const real*, const real*, const int*, const int*, const int64_t*, int,
                        const real*);
void attention_step(real* y, real* att, const real* qkv, KVLayer& c, int pos);
void gelu_forward(real* out, real* th, const real* inp, int64_t n);
real dot(const real* a, const real* b, int n);
void zero(real* p, size_t n);
bool all_finite(const real* p, size_t n);
void router_forward(real* logits, const real* x, const LayerParams& w, int M);
void router_backward(real* dx, LayerParams& g, const real* drouter, const real* x, const LayerParams& p, int M);
template <class Fn> void for_each_expert(int S, const int* offset, const Fn& fn);
bool experts_forward_dense(real*, MoeActs&, const real*, const real*, const LayerParams&, int);
bool experts_backward_dense(real*, LayerParams&, MoeGrad&, const real*, const real*, const MoeActs&, const real*,
                            const LayerParams&, int);
void adamw_update(Model& m, const AdamW& o, int64_t t);
void forward_begin(const Model& m);  // see ForwardPass (section 7)
void forward_end();
}  // namespace fast

// Set n floats to zero: the buffers that a backward pass accumulates into.
[[maybe_unused]] static void zero(real* p, size_t n) {
    if constexpr (FAST) if (fast::on) return fast::zero(p, n);
    std::fill(p, p + n, (real)0);
}
// v = n zeros (keeping its memory, as resize does)
[[maybe_unused]] static void zero(std::vector<real>& v, size_t n) {
    v.resize(n);
    zero(v.data(), n);
}

// One number formatted with printf's format f, as a string.
[[maybe_unused]] static std::string fmt(const char* f, double v) {
    char b[64];
    std::snprintf(b, sizeof b, f, v);
    return b;
}

[[maybe_unused]] static double now_ms() {
    using namespace std::chrono;
    return duration<double, std::milli>(steady_clock::now().time_since_epoch()).count();
}

// ----------------------------------------------------------------------------
// 3. Parameters
//
// All weights live in one contiguous buffer; gradients and the two AdamW
// moments are buffers of the same size and layout, so the optimizer is a
// single loop and a checkpoint is a walk over one table. The table names each
// tensor exactly as PyTorch's state_dict would, with PyTorch's [out, in]
// layout for Linear weights, so a checkpoint loads into the PyTorch model.

struct TensorInfo {
    std::string name;
    std::vector<int> shape;
    size_t offset, size;
};

struct LayerParams {
    real *ln1_w, *ln1_b;        // [C]
    real *attn_w, *attn_b;      // [3C, C], [3C]: rows q, then k, then v
    real *attn_proj_w, *attn_proj_b;  // [C, C], [C]
    real *ln2_w, *ln2_b;        // [C]
    real* router_w;             // [E, C], no bias
    real* noise_w;              // [E, C], no bias: noisy gating only (else null)
    // experts 0..E-1 are routed; E..E+NS-1 are the shared ones
    real *fc_w[E + NS], *fc_b[E + NS];      // per expert [F, C], [F]
    real *proj_w[E + NS], *proj_b[E + NS];  // per expert [C, F], [C]
};
struct Params {
    real *wte, *wpe;  // [V, C], [BLOCK_SIZE, C]
    LayerParams h[N_LAYER];
    real *lnf_w, *lnf_b;  // [C]
    real* lm_head;        // [V, C], no bias, not tied to wte
};

// The tensor table for vocabulary size V, in state_dict order.
static std::vector<TensorInfo> param_layout(int V) {
    std::vector<TensorInfo> t;
    size_t off = 0;  // tensors follow each other in the buffer, in this order
    auto add = [&](const std::string& name, std::vector<int> shape) {
        size_t n = 1;
        for (int d : shape) n *= (size_t)d;
        t.push_back({name, shape, off, n});
        off += n;
    };
    add("transformer.wte.weight", {V, C});
    add("transformer.wpe.weight", {BLOCK_SIZE, C});
    for (int l = 0; l < N_LAYER; l++) {
        std::string p = "transformer.h." + std::to_string(l) + ".";
        add(p + "ln_1.weight", {C});
        add(p + "ln_1.bias", {C});
        add(p + "attn.c_attn.weight", {3 * C, C});
        add(p + "attn.c_attn.bias", {3 * C});
        add(p + "attn.c_proj.weight", {C, C});
        add(p + "attn.c_proj.bias", {C});
        add(p + "ln_2.weight", {C});
        add(p + "ln_2.bias", {C});
        add(p + "moe.router.weight", {E, C});
        if (NOISY_GATE) add(p + "moe.noise.weight", {E, C});
        for (int e = 0; e < E + NS; e++) {
            std::string q = p + (e < E ? "moe.experts." + std::to_string(e) : "moe.shared." + std::to_string(e - E)) + ".";
            add(q + "c_fc.weight", {F, C});
            add(q + "c_fc.bias", {F});
            add(q + "c_proj.weight", {C, F});
            add(q + "c_proj.bias", {C});
        }
    }
    add("transformer.ln_f.weight", {C});
    add("transformer.ln_f.bias", {C});
    add("lm_head.weight", {V, C});
    return t;
}
// Loss-free balancing's biases of layer l (MOE_BIAS_RATE), saved beside the
// parameters under the layer's MoE, by the name DeepSeek-V3's code gives them.
static std::string score_bias_name(int l) { return "transformer.h." + std::to_string(l) + ".moe.e_score_correction_bias"; }

// Point the named fields at their tensors inside `base` (the parameters, or
// the gradients, which share the layout). The order matches param_layout.
static void point_params(Params& p, real* base, const std::vector<TensorInfo>& t) {
    size_t i = 0;  // walks the table in the order param_layout wrote it
    auto next = [&] { return base + t[i++].offset; };
    p.wte = next(), p.wpe = next();
    for (auto& L : p.h) {
        L.ln1_w = next(), L.ln1_b = next();
        L.attn_w = next(), L.attn_b = next();
        L.attn_proj_w = next(), L.attn_proj_b = next();
        L.ln2_w = next(), L.ln2_b = next();
        L.router_w = next();
        L.noise_w = NOISY_GATE ? next() : nullptr;
        for (int e = 0; e < E + NS; e++) L.fc_w[e] = next(), L.fc_b[e] = next(), L.proj_w[e] = next(), L.proj_b[e] = next();
    }
    p.lnf_w = next(), p.lnf_b = next();
    p.lm_head = next();
}

#if !MOE_INFERENCE_ONLY  // a model for inference comes from a checkpoint
// PyTorch's default initialisation, so learning curves compare with
// makemore's: Linear weight and bias U(-1/sqrt(in), 1/sqrt(in)), Embedding
// N(0, 1), LayerNorm weight 1 and bias 0.
static void init_params(std::vector<real>& params, const std::vector<TensorInfo>& t, Rng& rng) {
    for (const auto& ti : t) {
        real* w = params.data() + ti.offset;
        const std::string& n = ti.name;
        auto ends = [&](const char* s) { return n.size() >= strlen(s) && n.compare(n.size() - strlen(s), strlen(s), s) == 0; };
        // The tensor's role is in its name, as in PyTorch's module tree.
        if (n.find(".wte.") != std::string::npos || n.find(".wpe.") != std::string::npos) {
            for (size_t i = 0; i < ti.size; i++) w[i] = (real)rng.normal();
        } else if (n.find("ln_") != std::string::npos) {
            for (size_t i = 0; i < ti.size; i++) w[i] = ends(".weight") ? 1 : 0;
        } else {  // a Linear weight or bias: fan_in is the weight's second dimension
            int fan_in = ti.shape.size() == 2 ? ti.shape[1] : (ends("c_proj.bias") && n.find(".moe.") != std::string::npos ? F : C);
            double bound = 1.0 / std::sqrt((double)fan_in);
            for (size_t i = 0; i < ti.size; i++) w[i] = (real)((2 * rng.uniform() - 1) * bound);
        }
    }
}
#endif

// ----------------------------------------------------------------------------
// 4. Layers
//
// Each layer is a pair of free functions over raw pointers. x_forward
// computes its output and whatever backward will need; x_backward takes the
// gradient of the loss with respect to the output (dout) and ADDS (+=) the
// gradients of its inputs and parameters into buffers the caller has zeroed.
// Accumulating is what a layer used twice needs (the residual stream, a
// token sent to two experts), and it makes every backward the same shape.
//
// Rows. A batch is B sequences padded to T positions, but in line mode most
// of a row is padding: a name of 6 letters uses 7 of the 16 positions.
// Padding carries no target, and no position with a target attends to it
// (attention looks only backwards), so the model drops it: the rows of all
// sequences are packed one after another, M rows in all, and row i knows
// its token tok[i] and position pos[i]. Every layer below works on these M
// rows, each a vector of C channels; attention alone needs to know where
// each sequence starts.

// --- matrix multiply: out[M,N] (+)= A[M,Kd] . B[Kd,N] (+ bias[N]), the one
// kernel that does nearly all the work (every Linear layer, forward and
// backward). B is row-major; A is read through strides, A[m][k] =
// A[m*as + k*ak], so that (as, ak) = (Kd, 1) is a row-major A and (1, M)
// reads a row-major [Kd, M] matrix as its transpose, in place, which is what
// Linear's backward needs. With `add` the product is added to out (backward
// accumulates); without, out = bias + product (bias may be null).
//
// Each output is one sum over k, in order, from zero: out[m][n] = sum_k
// A[m][k] B[k][n]. The loop over k runs outside the loop over n, so that the
// innermost loop walks along a row of B and a row of sums, which the
// compiler turns into vector instructions (and, where the CPU has one, into
// a fused multiply-add: a * b + acc with a single rounding). Part two's
// tiled matmul (section 14) adds up exactly the same terms in the same
// order, so the two agree bit for bit, which the tests check.
static void matmul(real* out, const real* A, int64_t as, int64_t ak, const real* B, int M, int N, int Kd,
                   const real* bias, bool add) {
    if constexpr (FAST) if (fast::on) return fast::matmul(out, A, as, ak, B, M, N, Kd, bias, add);
    parallel_for(M, [=](int m0, int m1) {  // each range of rows writes only its own rows of out
        std::vector<real> acc(N);
        for (int m = m0; m < m1; m++) {
            std::fill(acc.begin(), acc.end(), (real)0);
            for (int k = 0; k < Kd; k++) {
                const real a = A[m * as + k * ak], *b = B + (int64_t)k * N;
                for (int n = 0; n < N; n++) acc[n] += a * b[n];
            }
            real* o = out + (int64_t)m * N;
            for (int n = 0; n < N; n++) o[n] = (add ? o[n] : 0) + (bias ? bias[n] : 0) + acc[n];
        }
    });
}

// --- a dot product, sum_i a[i] b[i], added up in order
static real dot(const real* a, const real* b, int n) {
    if constexpr (FAST) if (fast::on) return fast::dot(a, b, n);
    real s = 0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

// --- softmax over the n entries of each of M rows, in place or not:
//   p_i = exp(z_i - max z) / sum_j exp(z_j - max z)
// Subtracting the max changes nothing (it cancels) but keeps exp from
// overflowing. Attention, the router and the cross-entropy all use it.
static void softmax_forward(real* probs, const real* logits, int M, int n) {
    for (int m = 0; m < M; m++) {
        const real* z = logits + (int64_t)m * n;
        real* p = probs + (int64_t)m * n;
        real maxv = z[0], sum = 0;
        for (int i = 1; i < n; i++) maxv = std::max(maxv, z[i]);
        for (int i = 0; i < n; i++) sum += (p[i] = std::exp(z[i] - maxv));
        for (int i = 0; i < n; i++) p[i] /= sum;
    }
}
#if !MOE_INFERENCE_ONLY
// p_i = exp(z_i) / sum_j exp(z_j)  ->  dp_i/dz_k = p_i (delta_ik - p_k), so
//   dz_k += sum_i dp_i p_i (delta_ik - p_k) = p_k (dp_k - sum_i p_i dp_i)
static void softmax_backward(real* dlogits, const real* dprobs, const real* probs, int M, int n) {
    for (int m = 0; m < M; m++) {
        const real* p = probs + (int64_t)m * n;
        const real* dp = dprobs + (int64_t)m * n;
        real dot = 0;
        for (int i = 0; i < n; i++) dot += p[i] * dp[i];
        for (int i = 0; i < n; i++) dlogits[(int64_t)m * n + i] += p[i] * (dp[i] - dot);
    }
}
#endif

// --- Linear, as PyTorch's nn.Linear: out[M,OUT] = inp[M,IN] . w^T + b, with
// w [OUT, IN] row-major (PyTorch's layout) and b [OUT] or null. The product
// wants B = w^T [IN, OUT] row-major, so w is transposed first, into a copy
// of this thread's. (The fast build keeps every weight's transpose ready, in
// the layout its kernel reads: section 14.)
static void linear_forward(real* out, const real* inp, const real* w, const real* b, int M, int IN, int OUT) {
    if constexpr (FAST) if (fast::on) return fast::linear_forward(out, inp, w, b, M, IN, OUT);
    thread_local std::vector<real> wt;
    wt.resize((size_t)IN * OUT);
    for (int o = 0; o < OUT; o++)
        for (int i = 0; i < IN; i++) wt[(size_t)i * OUT + o] = w[(size_t)o * IN + i];
    matmul(out, inp, IN, 1, wt.data(), M, OUT, IN, b, false);
}
#if !MOE_INFERENCE_ONLY
// db += the sum over rows of dout: each bias element gathers every row's
// gradient, in row order.
static void bias_backward(real* db, const real* dout, int M, int OUT) {
    if constexpr (FAST) if (fast::on) return fast::bias_backward(db, dout, M, OUT);
    for (int m = 0; m < M; m++)
        for (int o = 0; o < OUT; o++) db[o] += dout[(int64_t)m * OUT + o];
}
// out = inp . w^T + b, so, as products:
//   dinp += dout . w       [M,OUT] . [OUT,IN]: w is row-major [OUT, IN] already
//   dw   += dout^T . inp   [OUT,M] . [M,IN]: dout read as its transpose, strides (1, OUT)
//   db   += sum over rows of dout
static void linear_backward(real* dinp, real* dw, real* db, const real* dout, const real* inp, const real* w, int M,
                            int IN, int OUT) {
    if (dinp) matmul(dinp, dout, OUT, 1, w, M, IN, OUT, nullptr, true);
    matmul(dw, dout, 1, OUT, inp, OUT, IN, M, nullptr, true);
    if (db) bias_backward(db, dout, M, OUT);
}
#endif

// --- GELU, the tanh form GPT-2 uses:
//   gelu(x) = x/2 (1 + tanh(u)),  u = sqrt(2/pi) (x + 0.044715 x^3)
// a smooth ReLU: near 0 for negative x, near x for positive. tanh(u) is
// saved (th) so that the backward pass need not compute it again. Elements
// are independent; they are shared out in chunks of 4096.
static constexpr real GELU_S = (real)0.7978845608028654;  // sqrt(2/pi)
static void gelu_forward(real* out, real* th, const real* inp, int64_t n) {
    if constexpr (FAST) if (fast::on) return fast::gelu_forward(out, th, inp, n);
    const int64_t chunk = 4096;
    parallel_for((int)((n + chunk - 1) / chunk), [=](int c0, int c1) {
        for (int64_t i = c0 * chunk; i < std::min(n, c1 * chunk); i++) {
            const real x = inp[i];
            th[i] = std::tanh(GELU_S * (x + (real)0.044715 * x * x * x));
            out[i] = (real)0.5 * x * (1 + th[i]);
        }
    });
}
#if !MOE_INFERENCE_ONLY
// d gelu/dx = (1 + tanh u)/2 + x/2 (1 - tanh^2 u) du/dx,
//   du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2)          (tanh' = 1 - tanh^2)
// Unlike the other backward functions it sets dinp instead of adding to it:
// its one caller (the expert MLP) hands it scratch that nothing else
// writes, which then need not be zeroed first.
static void gelu_backward(real* dinp, const real* inp, const real* th, const real* dout, int64_t n) {
    const int64_t chunk = 4096;
    parallel_for((int)((n + chunk - 1) / chunk), [=](int c0, int c1) {
        const int64_t i0 = c0 * chunk, i1 = std::min(n, c1 * chunk);
        for (int64_t i = i0; i < i1; i++) {
            real x = inp[i], t = th[i];
            real g = (real)0.5 * (1 + t) + (real)0.5 * x * (1 - t * t) * GELU_S * (1 + 3 * (real)0.044715 * x * x);
            dinp[i] = g * dout[i];
        }
    });
}
#endif

// ----------------------------------------------------------------------------
// 5. The Mixture of Experts
//
// A dense Transformer sends every token through one big MLP. An MoE layer
// has E smaller MLPs ("experts") and a router that scores them per token;
// each token is processed by only the K best-scoring experts. Parameters grow
// with E, compute per token with K: that is the point of sparsity.
//
//   p   = softmax(x . Wr^T)               router probabilities   [M, E]
//   top = the K largest entries of p      chosen experts         [M, K]
//   g   = p[top] (K = 1), or p[top] / sum(p[top]) (K > 1)        gates [M, K]
//   out = sum_j g_j * expert_{top_j}(x)
//
// The choice of experts is a discrete decision with no gradient. Learning
// still reaches the router through the gates: an expert whose output helps
// gets its gate pushed up, which raises its probability, which makes it more
// likely to be chosen. Below are the router (a Linear then a softmax), the
// top-k gate, the load-balancing loss, and the experts themselves.

// --- the router: logits[M,E] = x . Wr^T, a Linear without bias, then a
// softmax over the E experts of each row (softmax_forward, section 4).
static void router_forward(real* logits, const real* x, const LayerParams& w, int M) {
    if constexpr (FAST) if (fast::on) return fast::router_forward(logits, x, w, M);
    linear_forward(logits, x, w.router_w, nullptr, M, C, E);
}
#if !MOE_INFERENCE_ONLY
// The logits' gradient through the router Linear into x and Wr.
static void router_backward(real* dx, LayerParams& g, const real* drouter, const real* x, const LayerParams& p, int M) {
    if constexpr (FAST) if (fast::on) return fast::router_backward(dx, g, drouter, x, p, M);
    linear_backward(dx, g.router_w, nullptr, drouter, x, p.router_w, M, C, E);
}
#endif

// --- top-k gate: choose the K most probable experts of each row and weigh
// them. Rows with valid[m] == 0 (padding: no target, and no position with a
// target ever attends to them) are not routed at all: chosen = -1, gate = 0.
// Ties go to the lower expert index, as a stable sort would give them.
//
// Why renormalise for K > 1 but not for K = 1? With K > 1 the gates then sum
// to 1 whatever the router's confidence, which keeps the output's scale
// steady (Mixtral does this). With K = 1 renormalising gives g = p/p = 1, a
// constant: the router would get no gradient from the language-model loss
// at all, and only the auxiliary loss would train it. So with K = 1 the gate
// is the raw probability (Switch Transformer), and the loss reaches the router.
//
// Two interventions, used only to ask which experts matter (--ablate and
// --knockout, section 11), take experts away from the choice: off[e] != 0
// removes expert e of this layer for every token, and skip > 0 removes each
// token's `skip` most probable experts (DeepSeekMoE's redundancy test). The
// token then takes its next best, with gates from what remains, exactly as
// if the removed experts did not exist. Training never sets either.
struct Ablation {
    const uint8_t* off = nullptr;  // [E] or null: no expert removed
    int skip = 0;
};
//
// Loss-free balancing (MOE_BIAS_RATE; Wang et al. 2024, DeepSeek-V3) adds a
// per-expert bias b to the scores the choice is made on, p + b, and to
// nothing else: the gates are still taken from p. So b decides which experts
// a token gets, never how much each counts, and carries no gradient. After
// every training step, b moves towards an even load (bias_update, below)
// instead of an aux loss pulling the router's probabilities there.

// The expert with the highest score not yet taken (ties: the lower index).
static int best_untaken(const real* score, const bool* taken) {
    int best = -1;
    for (int e = 0; e < E; e++)
        if (!taken[e] && (best < 0 || score[e] > score[best])) best = e;
    return best;
}
static void topk_forward(int* chosen, real* gate, const real* probs, const uint8_t* valid, int M, Ablation ab = {},
                         const real* bias = nullptr, double top_p = TOP_P) {
    for (int m = 0; m < M; m++) {
        const real* p = probs + (int64_t)m * E;
        real biased[E];  // the scores the choice is made on
        if (bias)
            for (int e = 0; e < E; e++) biased[e] = p[e] + bias[e];
        const real* score = bias ? biased : p;
        int* c = chosen + (int64_t)m * K;
        real* g = gate + (int64_t)m * K;
        if (!valid[m]) {
            for (int j = 0; j < K; j++) c[j] = -1, g[j] = 0;
            continue;
        }
        bool taken[E];  // ablated experts, and the token's `skip` best, are taken before it chooses
        for (int e = 0; e < E; e++) taken[e] = ab.off && ab.off[e];
        for (int s = 0; s < ab.skip; s++) taken[best_untaken(score, taken)] = true;
        real sum = 0;
        for (int j = 0; j < K; j++) {  // K passes of "best not yet taken": K is tiny
            if (top_p > 0 && sum >= (real)top_p) {  // top-p (section 5's variants): enough mass, the rest stay empty
                c[j] = -1, g[j] = 0;
                continue;
            }
            const int best = best_untaken(score, taken);
            taken[best] = true;
            c[j] = best, g[j] = p[best], sum += p[best];
        }
        if (NORM_TOPK)
            for (int j = 0; j < K && c[j] >= 0; j++) g[j] /= sum;
    }
}
#if !MOE_INFERENCE_ONLY
// Without renormalisation g_j = p_{c_j}, so dp_{c_j} += dg_j.
// With it, g_j = p_j / s, s = sum_k p_k (p_j short for p_{c_j}):
//   dg_j/dp_i = delta_ij / s - p_j / s^2
//   dp_i += sum_j dg_j dg_j/dp_i = (dg_i - sum_j dg_j g_j) / s
// For K = 1 that is (dg - dg * 1) / s = 0: the zero gradient explained above.
// Unchosen experts get nothing from the gate; the aux loss below reaches them.
static void topk_backward(real* dprobs, const real* dgate, const int* chosen, const real* gate, const real* probs,
                          int M) {
    for (int m = 0; m < M; m++) {
        const int* c = chosen + (int64_t)m * K;
        if (c[0] < 0) continue;
        const real* dg = dgate + (int64_t)m * K;
        const real* g = gate + (int64_t)m * K;
        real* dp = dprobs + (int64_t)m * E;
        if (!NORM_TOPK) {
            for (int j = 0; j < K && c[j] >= 0; j++) dp[c[j]] += dg[j];
        } else {
            real s = 0, dot = 0;
            for (int j = 0; j < K && c[j] >= 0; j++) s += probs[(int64_t)m * E + c[j]], dot += dg[j] * g[j];
            for (int j = 0; j < K && c[j] >= 0; j++) dp[c[j]] += (dg[j] - dot) / s;
        }
    }
}
#endif

// --- the load-balancing loss (Switch Transformer, Fedus et al. 2021).
// Left alone, a router collapses: the expert that is chosen a little more
// often trains more, gets better, and is chosen more still. The aux loss
//   aux = E * sum_i f_i * P_i
//   f_i = fraction of the routing slots (N tokens x K; top-p: those taken) that went to expert i
//   P_i = mean router probability of expert i over the same N tokens
// is smallest when both are uniform: f_i = P_i = 1/E gives aux = 1, and all
// tokens on one expert gives f = P = one-hot and aux = E. f counts discrete
// choices and has no gradient, so it is treated as a constant; P carries the
// gradient, and it pushes probability away from the experts with high f:
//   d aux / d p[m,i] = E * f_i / N    for each of the N routed rows m.
// Only positions that carry a target count. Returns aux; f[E] is saved.
static real aux_forward(real* f, const real* probs, const int* chosen, const uint8_t* valid, int M) {
    int64_t n = 0, slots = 0;
    double P[E] = {}, cnt[E] = {};
    for (int m = 0; m < M; m++) {
        if (!valid[m]) continue;
        n++;
        for (int e = 0; e < E; e++) P[e] += probs[(int64_t)m * E + e];
        for (int j = 0; j < K; j++)
            if (const int c = chosen[(int64_t)m * K + j]; c >= 0) cnt[c] += 1, slots++;
    }
    double aux = 0;
    for (int e = 0; e < E; e++) {
        f[e] = n ? (real)(cnt[e] / (double)slots) : 0;
        aux += n ? (double)f[e] * (P[e] / (double)n) : 0;
    }
    return (real)(E * aux);
}
#if !MOE_INFERENCE_ONLY
static void aux_backward(real* dprobs, const real* f, const uint8_t* valid, int M, real daux) {
    int64_t n = 0;
    for (int m = 0; m < M; m++) n += valid[m];
    if (!n) return;
    for (int m = 0; m < M; m++)
        if (valid[m])
            for (int e = 0; e < E; e++) dprobs[(int64_t)m * E + e] += daux * E * f[e] / (real)n;
}

// Loss-free balancing's update (MOE_BIAS_RATE), after each training step,
// from the share of the step's routing slots each expert of the layer got
// (aux_forward's f): every bias moves by `rate` towards an even load,
//   b_e += rate * sign(1/E - f_e),
// up for an expert that got less than its share, down for one that got more.
// Then their mean is taken out: only differences between the biases change a
// choice, and this keeps them near zero.
static void bias_update(real* bias, const real* f, double rate) {
    double mean = 0;
    for (int e = 0; e < E; e++) {
        const double d = 1.0 / E - f[e];
        bias[e] += (real)(rate * ((d > 0) - (d < 0)));
        mean += bias[e];
    }
    mean /= E;
    for (int e = 0; e < E; e++) bias[e] -= (real)mean;
}
#endif

// --- the experts. Each is a GPT MLP: c_proj(gelu(c_fc(x))), C -> F -> C.
// Computing all E experts for every token and masking would cost E/K times
// too much. Instead: route first, then compute. A routing slot is one
// (token, j) pair of the top-k choice, S = (routed tokens) * K of them. A
// counting sort groups the slots by expert, the inputs of each expert are
// gathered into consecutive rows, each expert runs as ordinary dense Linear
// layers over its rows, and the outputs are scattered back with their gates.
// One expert over n rows: y[n,C] = c_proj(gelu(c_fc(x))), saving h (c_fc's
// output), th (GELU's tanh) and hg (GELU's output), each [n,F]. Expert e of
// the layer's weights p (e >= E: a shared expert, see below).
static void mlp_forward(real* y, real* h, real* th, real* hg, const real* x, const LayerParams& p, int e, int n) {
    linear_forward(h, x, p.fc_w[e], p.fc_b[e], n, C, F);
    gelu_forward(hg, th, h, (int64_t)n * F);
    linear_forward(y, hg, p.proj_w[e], p.proj_b[e], n, F, C);
}
#if !MOE_INFERENCE_ONLY
// Its backward, the three layers in reverse; dx and the gradients in g
// accumulate. dhg and dh [n,F] are scratch that this function sets rather
// than adds to (the product for dhg with add = false, then GELU's backward):
// zeroing 2*n*F floats per layer only to add to them cost 1-2% of a step.
static void mlp_backward(real* dx, LayerParams& g, real* dhg, real* dh, const real* dy, const real* x, const real* h,
                         const real* th, const real* hg, const LayerParams& p, int e, int n) {
    matmul(dhg, dy, C, 1, p.proj_w[e], n, F, C, nullptr, false);                         // dhg = dy . proj_w
    linear_backward(nullptr, g.proj_w[e], g.proj_b[e], dy, hg, p.proj_w[e], n, F, C);  // its weight and bias
    gelu_backward(dh, h, th, dhg, (int64_t)n * F);
    linear_backward(dx, g.fc_w[e], g.fc_b[e], dh, x, p.fc_w[e], n, C, F);
}
#endif

// Run fn(e) for each expert e, where the S routed slots are shared out
// among them (expert e has offset[e+1] - offset[e] of them). The experts
// are independent (their own weights, their own rows), so in what order, or
// on which thread, each runs changes nothing: part two runs them two at a
// time (section 18).
template <class Fn>
static void for_each_expert(int S, const int* offset, const Fn& fn) {
    if constexpr (FAST) if (fast::on) return fast::for_each_expert(S, offset, fn);
    for (int e = 0; e < E; e++) fn(e);
}

struct MoeActs {  // what one MoE layer saves for backward
    std::vector<int> offset;    // [E+1]: expert e owns sorted slots offset[e]..offset[e+1]
    std::vector<int> slot_src;  // [S]: sorted slot -> its index m*K + j in chosen/gate
    std::vector<int> slot_of;   // [M*K]: m*K + j -> its sorted slot, or -1 (not routed)
    std::vector<real> x;        // [S, C] gathered inputs
    std::vector<real> h;        // [S, F] c_fc output, before GELU
    std::vector<real> th;       // [S, F] tanh inside the GELU, for its backward
    std::vector<real> hg;       // [S, F] after GELU
    std::vector<real> y;        // [S, C] expert outputs, before the gate
};

// out[M,C] = sum_j gate[m,j] * expert_{chosen[m,j]}(inp[m]), for the
// layer's weights p: route (the counting sort), gather, run the experts,
// scatter.
static void experts_forward(real* out, MoeActs& a, const real* inp, const int* chosen, const real* gate,
                            const LayerParams& p, int M) {
    a.offset.assign(E + 1, 0);
    a.slot_of.assign((size_t)M * K, -1);
    for (int i = 0; i < M * K; i++)
        if (chosen[i] >= 0) a.offset[chosen[i] + 1]++;
    for (int e = 0; e < E; e++) a.offset[e + 1] += a.offset[e];
    int S = a.offset[E];
    a.slot_src.resize(S);
    std::vector<int> fill(a.offset.begin(), a.offset.end() - 1);
    for (int i = 0; i < M * K; i++)  // in token order, so each expert's rows keep it
        if (chosen[i] >= 0) a.slot_of[i] = fill[chosen[i]]++, a.slot_src[a.slot_of[i]] = i;
    a.h.resize((size_t)S * F), a.th.resize((size_t)S * F), a.hg.resize((size_t)S * F);
    if constexpr (FAST) if (fast::on && fast::experts_forward_dense(out, a, inp, gate, p, M)) return;
    a.x.resize((size_t)S * C), a.y.resize((size_t)S * C);
    real* xs = a.x.data();
    const int* src = a.slot_src.data();
    parallel_for(S, [=](int s0, int s1) {  // gather: each slot copies its token's row
        for (int s = s0; s < s1; s++) std::memcpy(xs + (size_t)s * C, inp + (int64_t)(src[s] / K) * C, C * sizeof(real));
    });
    for_each_expert(S, a.offset.data(), [&a, &p](int e) {
        int s0 = a.offset[e], n = a.offset[e + 1] - s0;
        if (n == 0) return;
        mlp_forward(&a.y[(size_t)s0 * C], &a.h[(size_t)s0 * F], &a.th[(size_t)s0 * F], &a.hg[(size_t)s0 * F],
                    &a.x[(size_t)s0 * C], p, e, n);
    });
    const int* slot_of = a.slot_of.data();
    const real* y = a.y.data();
    parallel_for(M, [=](int m0, int m1) {  // each token sums its own K outputs: no write conflicts
        for (int m = m0; m < m1; m++) {
            real* o = out + (int64_t)m * C;
            for (int i = 0; i < C; i++) o[i] = 0;
            for (int j = 0; j < K; j++) {
                int s = slot_of[(size_t)m * K + j];
                if (s < 0) continue;
                real g = gate[(size_t)m * K + j];
                for (int i = 0; i < C; i++) o[i] += g * y[(size_t)s * C + i];
            }
        }
    });
}
#if !MOE_INFERENCE_ONLY
// out_m = sum_j g_mj y_s (s the slot of (m, j)), so
//   dg_mj = dout_m . y_s    (the router's learning signal: did this expert help?)
//   dy_s  = g_mj dout_m
// then each expert's MLP backward over its rows, and each slot's input
// gradient added back to its token: dinp_m += sum_j dx_s.
// ws holds scratch for dy, dhg/dh and dx.
struct MoeGrad {
    std::vector<real> dy, dhg, dh, dx;
};
static void experts_backward(real* dinp, real* dgate, LayerParams& g, MoeGrad& ws, const real* dout, const real* inp,
                             const MoeActs& a, const real* gate, const LayerParams& p, int M) {
    if constexpr (FAST) if (fast::on && fast::experts_backward_dense(dinp, g, ws, dout, inp, a, gate, p, M)) return;
    const int S = a.offset[E];
    ws.dy.resize((size_t)S * C);  // every element is set below: no need to zero it
    // dx accumulates: each expert zeroes its own rows just before it uses
    // them (in parallel, and while they are in the cache). dhg and dh are set.
    ws.dhg.resize((size_t)S * F), ws.dh.resize((size_t)S * F), ws.dx.resize((size_t)S * C);
    const int* src = a.slot_src.data();
    const real* ys = a.y.data();
    real* dys = ws.dy.data();
    parallel_for(S, [=](int s0, int s1) {  // each slot is one (token, j): its own dgate and dy row
        for (int s = s0; s < s1; s++) {
            int i = src[s];
            const real* d = dout + (int64_t)(i / K) * C;
            const real* y = ys + (size_t)s * C;
            for (int c = 0; c < C; c++) dys[(size_t)s * C + c] = gate[i] * d[c];
            dgate[i] += dot(d, y, C);
        }
    });
    for_each_expert(S, a.offset.data(), [&a, &p, &g, &ws](int e) {  // each expert's gradients are its own
        int s0 = a.offset[e], n = a.offset[e + 1] - s0;
        if (n == 0) return;
        const size_t f0 = (size_t)s0 * F;
        zero(&ws.dx[(size_t)s0 * C], (size_t)n * C);
        mlp_backward(&ws.dx[(size_t)s0 * C], g, &ws.dhg[f0], &ws.dh[f0], &ws.dy[(size_t)s0 * C], &a.x[(size_t)s0 * C],
                     &a.h[f0], &a.th[f0], &a.hg[f0], p, e, n);
    });
    const int* slot_of = a.slot_of.data();
    const real* dx = ws.dx.data();
    parallel_for(M, [=](int m0, int m1) {  // each token adds up its own slots, in j order
        for (int m = m0; m < m1; m++)
            for (int j = 0; j < K; j++) {
                int s = slot_of[(size_t)m * K + j];
                if (s < 0) continue;
                for (int c = 0; c < C; c++) dinp[(int64_t)m * C + c] += dx[(size_t)s * C + c];
            }
    });
}
#endif

// --- the variants. Each is switched on by one constant in section 1 and
// leaves the default build untouched when off.
//
// Noisy top-k gating (MOE_NOISY_GATE; Shazeer et al. 2017, makeMoE). Early
// in training the router's scores are nearly equal, and a deterministic
// top-k keeps sending a token to the same experts, so the others never get
// the chance to become useful. Adding noise to the logits before the top-k
// explores; the noise's scale is learned per token and expert:
//   z' = z + eps * softplus(x . Wn^T),   eps ~ N(0, 1)
// and the router softmax and the top-k read z'. Only while training: at
// evaluation and sampling z' = z. (makeMoE keeps the noise on at evaluation
// too, so its test loss is that of a randomly perturbed router: a known
// mistake.) Here the noise only explores; the balancing is still the aux
// loss's (Shazeer's paper pairs the noise with a smooth load loss built on
// its distribution). At initialisation softplus(~0) = 0.69 is larger than
// the spread of the router's logits, so routing starts close to random and
// sharpens as the router learns to shrink the noise. Backward, with u = x . Wn^T and s = softplus(u):
//   dz += dz'   and   du = dz' * eps * sigmoid(u)     (softplus' = sigmoid)
// and du goes through the noise Linear like any other.
static inline real softplus(real u) { return u > 20 ? u : std::log1p(std::exp(u)); }
static void noise_forward(real* noisy, real* eps, const real* logits, const real* u, const uint8_t* valid, int M,
                          Rng& rng) {
    for (int64_t i = 0; i < (int64_t)M * E; i++) {  // one draw per routed (row, expert), in order
        eps[i] = valid[i / E] ? (real)rng.normal() : 0;
        noisy[i] = logits[i] + eps[i] * softplus(u[i]);
    }
}
#if !MOE_INFERENCE_ONLY
static void noise_backward(real* du, const real* dnoisy, const real* eps, const real* u, int M) {
    for (int64_t i = 0; i < (int64_t)M * E; i++) du[i] += dnoisy[i] * eps[i] / (1 + std::exp(-u[i]));
}
#endif

// Expert capacity (MOE_CAPACITY_FACTOR; Switch Transformer). On hardware
// that runs experts in parallel, each expert gets a buffer of fixed size:
//   capacity = ceil(CF * N * K / E)    slots per expert per batch (N tokens)
// and an expert chosen more often than that must drop the excess. A dropped
// slot contributes nothing: its token's other experts still count, and if
// all are dropped the token passes on through the residual connection
// alone. Which slots to drop? makeMoE keeps the earliest tokens of the batch,
// which biases against whatever comes late; here an expert keeps the slots
// with the highest gate weights, the ones it matters most to. (With K = 2 a
// first choice's gate is at least 0.5 and a second's at most 0.5, so first
// choices come first; GShard and Switch rank by choice explicitly.) Training only
// (evaluation and sampling give every token its experts). routed[M,K] is
// chosen with the dropped slots set to -1; returns the number dropped. No
// backward of its own: a dropped slot simply receives no gradient through
// its gate, while topk_backward still sees it in the renormalisation.
static int64_t capacity_forward(int* routed, const int* chosen, const real* gate, const uint8_t* valid, int M,
                                double cf) {
    int64_t n = 0, dropped = 0;
    for (int m = 0; m < M; m++) n += valid[m];
    const int64_t cap = (int64_t)std::ceil(cf * (double)n * K / E);
    std::vector<std::vector<int>> slots(E);  // each expert's slots m*K + j, in token order
    for (int i = 0; i < M * K; i++)
        if ((routed[i] = chosen[i]) >= 0) slots[chosen[i]].push_back(i);
    for (auto& s : slots) {
        if ((int64_t)s.size() <= cap) continue;
        // highest gate first; equal gates keep token order, so the result is deterministic
        // (a NaN gate sorts last: the training loop stops on the NaN loss anyway)
        auto key = [&](int i) { return std::isnan(gate[i]) ? -INFINITY : gate[i]; };
        std::stable_sort(s.begin(), s.end(), [&](int a, int b) { return key(a) > key(b); });
        for (size_t r = (size_t)cap; r < s.size(); r++) routed[s[r]] = -1, dropped++;
    }
    return dropped;
}

// Router z-loss (MOE_Z_COEF; ST-MoE, Zoph et al. 2022). Nothing in the
// softmax stops the router's logits from growing: softmax(z + c) is the same
// for any c, and large logits make the probabilities saturate and, in low
// precision, overflow. The z-loss penalises their size:
//   zl = mean over routed tokens of lse(z)^2,   lse(z) = log sum_e exp(z_e)
// on the raw logits (before any noise). With p = softmax(z):
//   d zl / d z_e = 2 lse(z) p_e / N
// The total loss adds Z_COEF * zl per layer. lse[M] is saved for backward.
static real zloss_forward(real* lse, const real* logits, const uint8_t* valid, int M) {
    double sum = 0;
    int64_t n = 0;
    for (int m = 0; m < M; m++) {
        const real* z = logits + (int64_t)m * E;
        real mx = *std::max_element(z, z + E), s = 0;
        for (int e = 0; e < E; e++) s += std::exp(z[e] - mx);
        lse[m] = mx + std::log(s);
        if (valid[m]) sum += (double)lse[m] * lse[m], n++;
    }
    return n ? (real)(sum / (double)n) : 0;
}
#if !MOE_INFERENCE_ONLY
static void zloss_backward(real* dlogits, const real* lse, const real* logits, const uint8_t* valid, int M, real dz) {
    int64_t n = 0;
    for (int m = 0; m < M; m++) n += valid[m];
    for (int m = 0; m < M; m++) {
        if (!valid[m]) continue;
        for (int e = 0; e < E; e++)
            dlogits[(int64_t)m * E + e] += dz * 2 * lse[m] * std::exp(logits[(int64_t)m * E + e] - lse[m]) / (real)n;
    }
}
#endif

// Shared experts (MOE_N_SHARED; DeepSeekMoE, Dai et al. 2024). Some
// knowledge every token needs (here: spelling out common patterns); if each
// routed expert must learn it, it is learned E times. NS shared experts
// process every token with weight 1, beside its K routed ones, so the
// routed experts are free to specialise:
//   out = sum_s shared_s(x) + sum_j g_j expert_{top_j}(x)
// Each is the same MLP as a routed expert, run over all M rows as a dense
// layer; backward is the MLP's backward with dout passed through unchanged.
//
// Fine-grained experts (DeepSeekMoE) need no code: MOE_FF sets the expert
// width F. E = 16, K = 4, F = C costs per token what E = 4, K = 1, F = 4C
// does (4 experts of width C = 1 of width 4C), but there are many more ways
// to combine experts. The parameter counts at start (total, and active per
// token) show the equal cost.

// Sigmoid gates (MOE_SIGMOID_GATE; DeepSeek-V3). A softmax makes the experts
// compete for one unit of probability: raising one score lowers every
// other. DeepSeek-V3 scores each expert on its own instead,
//   s_e = sigmoid(z_e)       in (0, 1), independent of the other experts
// and the top-k choice and the gates read s where they read p: the gates are
// s[top] / sum(s[top]) for K > 1. With K = 1 that normalisation would make
// the gate the constant 1 and cut the router off from the loss (see
// top-k's note), so K = 1 keeps the unnormalised gate s[top], as the
// softmax router does. The aux loss needs numbers that sum to 1 over the
// experts, so its P is taken from the normalised scores s'_e = s_e / S,
// S = sum_e s_e, as DeepSeek-V3's balance loss does. Backward:
//   sigmoid:        dz_e = ds_e * s_e (1 - s_e)
//   normalisation:  ds'_i/ds_k = (delta_ik - s'_i) / S, so
//                   ds_k += (ds'_k - sum_i ds'_i s'_i) / S
// (DeepSeek-V3 also scales the gates by a constant, 2.5; here the expert
// weights can learn any scale.)
static void sigmoid_forward(real* s, const real* z, int64_t n) {
    for (int64_t i = 0; i < n; i++) s[i] = 1 / (1 + std::exp(-z[i]));
}
// out[M,E] = s / (sum of its row): the scores as a distribution over the experts
static void normalize_forward(real* out, const real* s, int M) {
    for (int m = 0; m < M; m++) {
        real sum = 0;
        for (int e = 0; e < E; e++) sum += s[(int64_t)m * E + e];
        for (int e = 0; e < E; e++) out[(int64_t)m * E + e] = s[(int64_t)m * E + e] / sum;
    }
}
#if !MOE_INFERENCE_ONLY
static void sigmoid_backward(real* dz, const real* ds, const real* s, int64_t n) {
    for (int64_t i = 0; i < n; i++) dz[i] += ds[i] * s[i] * (1 - s[i]);
}
static void normalize_backward(real* ds, const real* dout, const real* out, const real* s, int M) {
    for (int m = 0; m < M; m++) {
        real sum = 0, dot = 0;
        for (int e = 0; e < E; e++) sum += s[(int64_t)m * E + e], dot += dout[(int64_t)m * E + e] * out[(int64_t)m * E + e];
        for (int e = 0; e < E; e++) ds[(int64_t)m * E + e] += (dout[(int64_t)m * E + e] - dot) / sum;
    }
}
#endif

// Dynamic top-p routing (MOE_TOP_P; Huang et al. 2024, "Harder tasks need
// more experts"). Top-k gives every token K experts, the easy ones and the
// hard ones alike. Top-p lets the router decide: a token takes experts in
// order of probability until the probabilities taken add up to P, at least
// one and at most MOE_TOP_K (topk_forward does the choosing). A confident
// router (one expert at 0.9) spends one expert; an unsure one spends more.
// So the cost per token is no longer a constant, and the progress line, the
// evaluation and the routing explorer report the mean experts per token.
// The gates are the raw probabilities, not renormalised over the experts
// taken: a token with one expert would otherwise get the constant gate 1
// and no router gradient. The loophole: a router that flattens its probabilities
// buys more experts for every token, and more experts lower the loss. The
// paper closes it with an entropy loss on the router's distribution, which
// rewards being sure:
//   ent = mean over routed tokens of H(p) = -sum_e p_e log p_e
//   d ent / d p_e = -(log p_e + 1) / N
// added to the loss with weight ENTROPY_COEF per layer. (A probability
// that underflows to 0 would make log p infinite: it is read as 1e-30.)
static real entropy_forward(const real* probs, const uint8_t* valid, int M) {
    double sum = 0;
    int64_t n = 0;
    for (int m = 0; m < M; m++) {
        if (!valid[m]) continue;
        n++;
        for (int e = 0; e < E; e++) {
            const double p = std::max(probs[(int64_t)m * E + e], (real)1e-30);
            sum -= p * std::log(p);
        }
    }
    return n ? (real)(sum / (double)n) : 0;
}
#if !MOE_INFERENCE_ONLY
static void entropy_backward(real* dprobs, const real* probs, const uint8_t* valid, int M, real dent) {
    int64_t n = 0;
    for (int m = 0; m < M; m++) n += valid[m];
    for (int m = 0; m < M; m++) {
        if (!valid[m]) continue;
        for (int e = 0; e < E; e++) {
            const real p = std::max(probs[(int64_t)m * E + e], (real)1e-30);
            dprobs[(int64_t)m * E + e] -= dent * (std::log(p) + 1) / (real)n;
        }
    }
}
#endif

// Where balance is measured (MOE_AUX_SCOPE; Qiu et al. 2025). The aux loss
// above counts f and P over the whole batch: a batch is balanced when its
// experts are, even if every sequence in it uses one expert only. With
// MOE_AUX_SCOPE=seq the same loss is computed over each sequence (each
// line, in line mode) on its own and averaged over the sequences,
//   aux = (1 / B') sum_b aux(sequence b)     (B' sequences with a target)
// which asks every sequence to spread its tokens over all experts
// (DeepSeek-V3 adds such a loss, with a tiny weight, beside its bias
// balancing). On data where each line is one domain, that is a pull
// against experts specialising by domain; Qiu et al. predict it costs
// quality. Each sequence's f is saved, fs[B,E]; backward is aux_backward
// over each sequence's rows, with daux / B'. The batch-wide f is still
// what the load reports and loss-free balancing read.
struct Seqs {  // the sequences packed into M rows: rows start[b] .. start[b] + len[b]
    const int* start = nullptr;
    const int* len = nullptr;
    int B = 0;
};
static int seqs_with_targets(const uint8_t* valid, Seqs sq) {
    int n = 0;
    for (int b = 0; b < sq.B; b++) n += std::any_of(valid + sq.start[b], valid + sq.start[b] + sq.len[b], [](uint8_t v) { return v; });
    return n;
}
static real aux_seq_forward(real* fs, const real* probs, const int* chosen, const uint8_t* valid, Seqs sq) {
    double sum = 0;
    for (int b = 0; b < sq.B; b++) {
        const int s = sq.start[b];
        sum += aux_forward(fs + (int64_t)b * E, probs + (int64_t)s * E, chosen + (int64_t)s * K, valid + s, sq.len[b]);
    }
    const int n = seqs_with_targets(valid, sq);
    return n ? (real)(sum / n) : 0;
}
#if !MOE_INFERENCE_ONLY
static void aux_seq_backward(real* dprobs, const real* fs, const uint8_t* valid, Seqs sq, real daux) {
    const int n = seqs_with_targets(valid, sq);
    if (n == 0) return;
    for (int b = 0; b < sq.B; b++) {
        const int s = sq.start[b];
        aux_backward(dprobs + (int64_t)s * E, fs + (int64_t)b * E, valid + s, sq.len[b], daux / (real)n);
    }
}
#endif

// --- cross-entropy of the next-token prediction, for positions whose target
// is not -1. probs[M,V] (the softmax of the logits) is saved for backward.
// Returns the summed loss (in double) and sets *count to the number of targets.
static double crossentropy_forward(real* probs, const real* logits, const int* targets, int M, int V,
                                   int64_t* count) {
    double sum = 0;
    *count = 0;
    for (int m = 0; m < M; m++) {
        if (targets[m] < 0) continue;
        softmax_forward(probs + (int64_t)m * V, logits + (int64_t)m * V, 1, V);
        sum -= std::log((double)probs[(int64_t)m * V + targets[m]]);
        ++*count;
    }
    return sum;
}
#if !MOE_INFERENCE_ONLY
// loss = -(1/N) sum_m log p[m, y_m], p = softmax(z)  ->  dz[m,i] += (p[m,i] - [i == y_m]) / N
static void crossentropy_backward(real* dlogits, const real* probs, const int* targets, int M, int V, real scale) {
    for (int m = 0; m < M; m++) {
        if (targets[m] < 0) continue;
        for (int i = 0; i < V; i++)
            dlogits[(int64_t)m * V + i] += scale * (probs[(int64_t)m * V + i] - (i == targets[m] ? 1 : 0));
    }
}
#endif

// ----------------------------------------------------------------------------
// 6. Attention, and the rest of the block
//
// The layers of the Transformer around the experts: the token and position
// embedding that makes the rows, the residual connections that carry them
// through the blocks, the layernorm in front of each half of a block, and
// causal self-attention, the one place where positions talk to each other.

// --- token and position embedding: out[M,C] = wte[tok[i]] + wpe[pos[i]]
// Attention by itself cannot tell the order of its inputs (it sums over
// them), so each row is given where it stands as well as what it is: a
// learned vector per position, added to the token's. That is also why the
// model cannot read past BLOCK_SIZE positions: the table ends there.
static void encoder_forward(real* out, const int* tok, const int* pos, const real* wte, const real* wpe, int M) {
    parallel_for(M, [=](int m0, int m1) {
        for (int i = m0; i < m1; i++) {
            real* o = out + (int64_t)i * C;
            const real* we = wte + (int64_t)tok[i] * C;
            const real* pe = wpe + (int64_t)pos[i] * C;
            for (int c = 0; c < C; c++) o[c] = we[c] + pe[c];
        }
    });
}
#if !MOE_INFERENCE_ONLY
// A lookup's gradient goes back to the row it read: every position adds its
// dout to the row of its token and to the row of its position. (Two
// positions may share a token, so this loop is not shared out: two threads
// would add to the same row.)
static void encoder_backward(real* dwte, real* dwpe, const real* dout, const int* tok, const int* pos, int M) {
    for (int i = 0; i < M; i++) {
        const real* d = dout + (int64_t)i * C;
        real* dwe = dwte + (int64_t)tok[i] * C;
        real* dpe = dwpe + (int64_t)pos[i] * C;
        for (int c = 0; c < C; c++) dwe[c] += d[c], dpe[c] += d[c];
    }
}
#endif

// --- the residual connection x + f(x): out[M,C] = a + b, row by row (out may
// be a itself). Each block adds to the stream instead of replacing it, so a
// block that has learned nothing yet passes its input on unchanged, and the
// gradient reaches the first layers undiminished however deep the stack. Its backward is in model_backward: the gradient of the sum
// passes unchanged to both a and b.
static void residual_forward(real* out, const real* a, const real* b, int M) {
    parallel_for(M, [=](int m0, int m1) {
        for (size_t i = (size_t)m0 * C; i < (size_t)m1 * C; i++) out[i] = a[i] + b[i];
    });
}

// --- LayerNorm. The stream grows as blocks add to it; normalising what
// each half of a block reads (GPT-2's "pre-norm") keeps the inputs of
// attention and of the router at one scale through the stack, so the
// router's softmax neither saturates nor flattens as the model deepens.
// Over the C channels of each of M rows, eps 1e-5:
//   out = (x - mean) * rstd * w + b,   rstd = 1 / sqrt(var + eps)
// with the biased variance (divided by C, as PyTorch). mean and rstd [M]
// are saved for backward.
static void layernorm_forward(real* out, real* mean, real* rstd, const real* inp, const real* w, const real* b,
                              int M) {
    if constexpr (FAST) if (fast::on) return fast::layernorm_forward(out, mean, rstd, inp, w, b, M);
    parallel_for(M, [=](int m0, int m1) {  // rows are independent
        for (int m = m0; m < m1; m++) {
            const real* x = inp + (int64_t)m * C;
            real mu = 0, var = 0;
            for (int i = 0; i < C; i++) mu += x[i];
            mu /= C;
            for (int i = 0; i < C; i++) var += (x[i] - mu) * (x[i] - mu);
            var /= C;
            const real rs = 1 / std::sqrt(var + (real)1e-5);
            real* o = out + (int64_t)m * C;
            for (int i = 0; i < C; i++) o[i] = (x[i] - mu) * rs * w[i] + b[i];
            mean[m] = mu, rstd[m] = rs;
        }
    });
}
#if !MOE_INFERENCE_ONLY
// With n = (x - mean) * rstd and out = n * w + b:
//   dw += dout * n,  db += dout,  dn = dout * w.
// n depends on every x of the row through mean and rstd. Differentiating,
//   dx_i = rstd * (dn_i - mean_j(dn_j) - n_i * mean_j(dn_j * n_j)):
// the gradient minus its mean (the mean is subtracted out) and minus its
// component along n (the scale is divided out). dx is a row's own, so the
// rows are shared out; dw and db sum over all the rows, so for them the
// channels are shared out instead, each adding up its rows in order.
static void layernorm_backward(real* dinp, real* dw, real* db, const real* dout, const real* inp, const real* w,
                               const real* mean, const real* rstd, int M) {
    if constexpr (FAST) if (fast::on) return fast::layernorm_backward(dinp, dw, db, dout, inp, w, mean, rstd, M);
    parallel_for(M, [=](int m0, int m1) {
        for (int m = m0; m < m1; m++) {
            const real* x = inp + (int64_t)m * C;
            const real* d = dout + (int64_t)m * C;
            const real mu = mean[m], rs = rstd[m];
            real dn_mean = 0, dn_n_mean = 0;
            for (int i = 0; i < C; i++) dn_mean += d[i] * w[i], dn_n_mean += d[i] * w[i] * ((x[i] - mu) * rs);
            dn_mean /= C, dn_n_mean /= C;
            real* dx = dinp + (int64_t)m * C;
            for (int i = 0; i < C; i++) {
                real n = (x[i] - mu) * rs, dn = d[i] * w[i];
                dx[i] += rs * (dn - dn_mean - n * dn_n_mean);
            }
        }
    });
    parallel_for(C, [=](int c0, int c1) {
        for (int m = 0; m < M; m++)
            for (int i = c0; i < c1; i++) {
                const real* x = inp + (int64_t)m * C;
                const real g = dout[(int64_t)m * C + i];
                dw[i] += g * ((x[i] - mean[m]) * rstd[m]);
                db[i] += g;
            }
    });
}
#endif

// --- Causal self-attention over packed rows. qkv[M,3C] comes from c_attn
// (q in channels 0..C, k in C..2C, v in 2C..3C; head h owns channels
// h*hs..(h+1)*hs of each). Sequence b is rows start[b]..start[b]+len[b].
// For each head, position t of a sequence attends to its positions s <= t:
//   att[t,s] = softmax_s(q_t . k_s / sqrt(hs)),  y_t = sum_s att[t,s] v_s.
// Dividing by sqrt(hs) keeps the scores' spread independent of the head size
// (a dot product of hs unit-variance terms has variance hs), so the softmax
// does not saturate. att is saved for backward: for sequence b and head h a
// [len, len] block (zero above the diagonal) at att + att_off[b] + h*len*len.
// y is [M,C]. Each (sequence, head) pair is independent: they are shared out.
// drop (null, or laid out as att) is the dropout mask of the weights while
// training (section 7): y_t = sum_s att[t,s] drop[t,s] v_s; att keeps the
// weights before the mask, which the softmax's backward needs.
//
// attention_forward_head is the work of one head h of one sequence of T
// positions: qkv and y point at the sequence's first row, att and drop at
// the head's [T, T] block.
static void attention_forward_head(real* y, real* att, const real* qkv, int T, int h, const real* drop) {
    const real scale = 1 / std::sqrt((real)HS);
    for (int t = 0; t < T; t++) {
        const real* q = qkv + (int64_t)t * 3 * C + h * HS;
        real* a = att + (int64_t)t * T;  // the scores of row t, then its weights
        for (int s = 0; s <= t; s++) a[s] = dot(q, qkv + (int64_t)s * 3 * C + C + h * HS, HS) * scale;
        softmax_forward(a, a, 1, t + 1);
        for (int s = t + 1; s < T; s++) a[s] = 0;  // the future: no weight
        const real* d = drop ? drop + (int64_t)t * T : nullptr;  // this row's mask
        real* yt = y + (int64_t)t * C + h * HS;
        for (int j = 0; j < HS; j++) yt[j] = 0;
        for (int s = 0; s <= t; s++) {
            const real* v = qkv + (int64_t)s * 3 * C + 2 * C + h * HS;
            const real w = d ? a[s] * d[s] : a[s];
            for (int j = 0; j < HS; j++) yt[j] += w * v[j];
        }
    }
}
static void attention_forward(real* y, real* att, const real* qkv, const int* start, const int* len,
                              const int64_t* att_off, int B, const real* drop) {
    if constexpr (FAST) if (fast::on) return fast::attention_forward(y, att, qkv, start, len, att_off, B, drop);
    parallel_for(B * N_HEAD, [=](int i0, int i1) {
        for (int i = i0; i < i1; i++) {
            const int b = i / N_HEAD, h = i % N_HEAD;
            const int64_t blk = att_off[b] + (int64_t)h * len[b] * len[b];
            attention_forward_head(y + (int64_t)start[b] * C, att + blk, qkv + (int64_t)start[b] * 3 * C, len[b], h,
                                   drop ? drop + blk : nullptr);
        }
    });
}
#if !MOE_INFERENCE_ONLY
// Backward, for one head and one query position t (dy_t given):
//   y_t = sum_s a_s v_s        ->  dv_s += a_s dy_t,  da_s = dy_t . v_s
//   a = softmax(z)             ->  dz_s = a_s (da_s - sum_r a_r da_r)
//   z_s = q_t . k_s * scale    ->  dq_t += scale dz_s k_s,  dk_s += scale dz_s q_t
// With a dropout mask d, y_t = sum_s (a_s d_s) v_s: the value gradient uses
// a_s d_s, and da_s = d_s (dy_t . v_s) before the softmax's backward.
// Each (b, h) pair writes only its own rows and channels of dqkv, so the
// pairs are shared out as in the forward pass.
static void attention_backward_head(real* dqkv, const real* dy, const real* att, const real* qkv, int T, int h,
                                    const real* drop) {
    const real scale = 1 / std::sqrt((real)HS);
    for (int t = 0; t < T; t++) {
        const real* a = att + (int64_t)t * T;
        const real* dyt = dy + (int64_t)t * C + h * HS;
        const real* q = qkv + (int64_t)t * 3 * C + h * HS;
        real* dq = dqkv + (int64_t)t * 3 * C + h * HS;
        const real* d = drop ? drop + (int64_t)t * T : nullptr;
        real da[BLOCK_SIZE], sum = 0;  // da_s, and sum_r a_r da_r
        for (int s = 0; s <= t; s++) {
            const real* v = qkv + (int64_t)s * 3 * C + 2 * C + h * HS;
            real* dv = dqkv + (int64_t)s * 3 * C + 2 * C + h * HS;
            const real w = d ? a[s] * d[s] : a[s];
            da[s] = d ? dot(dyt, v, HS) * d[s] : dot(dyt, v, HS);
            for (int j = 0; j < HS; j++) dv[j] += w * dyt[j];
            sum += a[s] * da[s];
        }
        for (int s = 0; s <= t; s++) {
            const real dz = a[s] * (da[s] - sum) * scale;
            const real* k = qkv + (int64_t)s * 3 * C + C + h * HS;
            real* dk = dqkv + (int64_t)s * 3 * C + C + h * HS;
            for (int j = 0; j < HS; j++) dq[j] += dz * k[j], dk[j] += dz * q[j];
        }
    }
}
static void attention_backward(real* dqkv, const real* dy, const real* att, const real* qkv, const int* start,
                               const int* len, const int64_t* att_off, int B, const real* drop) {
    if constexpr (FAST) if (fast::on) return fast::attention_backward(dqkv, dy, att, qkv, start, len, att_off, B, drop);
    parallel_for(B * N_HEAD, [=](int i0, int i1) {
        for (int i = i0; i < i1; i++) {
            const int b = i / N_HEAD, h = i % N_HEAD;
            const int64_t blk = att_off[b] + (int64_t)h * len[b] * len[b];
            attention_backward_head(dqkv + (int64_t)start[b] * 3 * C, dy + (int64_t)start[b] * C, att + blk,
                                    qkv + (int64_t)start[b] * 3 * C, len[b], h, drop ? drop + blk : nullptr);
        }
    });
}
#endif

// ----------------------------------------------------------------------------
// 7. The model
//
// makemore's Transformer with a Mixture of Experts in place of each MLP:
//
//   x = wte[tokens] + wpe[positions]
//   for each of the N_LAYER blocks:
//       x = x + attn(ln_1(x))       causal self-attention
//       x = x + moe(ln_2(x))        router -> top-k -> gate-weighted experts
//   logits = lm_head(ln_f(x))
//   loss = mean cross-entropy + aux_coef * (sum over layers of aux)
//          (+ Z_COEF * (sum over layers of the z-loss), if switched on)
//
// Every activation that backward needs is kept under its own name, per
// layer, sized for the current batch. Nothing is shared scratch that a later
// layer overwrites: the backward pass of layer l reads what layer l saved,
// whatever came after it. The cost is memory, M rows of a few C-wide (and,
// in the experts, F-wide) arrays per layer, which at these sizes is a few
// megabytes; the benefit is that each backward reads like its derivation.
//
// What one block saves. The residual stream is saved at the two points
// where it is normalised (x, x_mid), since layernorm's backward needs its
// input; ln1/ln2 are the normalised rows the Linear layers read, which their
// weight gradients need; att holds the attention weights, so the backward
// pass need not redo the softmax; the router's probabilities and the chosen
// experts and gates are what top-k, the aux loss and the experts need.
struct LayerActs {
    std::vector<real> x;                        // [M,C] residual stream entering the block
    std::vector<real> ln1, ln1_mean, ln1_rstd;  // [M,C], [M], [M]
    std::vector<real> qkv;                      // [M,3C]
    std::vector<real> att;                      // per sequence [H,len,len]
    std::vector<real> atty;                     // [M,C] attention output, before c_proj
    std::vector<real> x_mid;                    // [M,C] x + attn(ln_1(x))
    std::vector<real> ln2, ln2_mean, ln2_rstd;  // [M,C], [M], [M]
    std::vector<real> logits;                   // [M,E] router logits
    std::vector<real> probs;                    // [M,E] router probabilities (sigmoid gates: the scores s)
    std::vector<int> chosen;                    // [M,K] chosen experts (-1: not routed)
    std::vector<real> gate;                     // [M,K] gate weights
    std::vector<real> f;                        // [E] fraction of slots per expert
    real aux = 0;                               // this layer's load-balancing loss
    MoeActs moe;
    std::vector<real> moe_out;  // [M,C]
    // the variants, when switched on
    std::vector<real> noise_u, noise_eps, noisy;  // [M,E] x.Wn^T, the N(0,1) draws, the noisy logits
    std::vector<int> routed;                      // [M,K] chosen minus the slots capacity dropped
    int64_t dropped = 0;                          // slots dropped by capacity
    std::vector<real> lse;                        // [M] logsumexp of the router logits, for the z-loss
    real z = 0;                                   // this layer's z-loss
    std::vector<real> sh_h, sh_th, sh_hg;         // [NS,M,F] the shared experts' hidden layers
    std::vector<real> sh_y;                       // [M,C] scratch: one shared expert's output
    std::vector<real> pnorm;                      // [M,E] sigmoid gates: the scores normalised, for the aux loss
    std::vector<real> f_seq;                      // [B,E] aux scope seq: each sequence's f
    bool seq_scope = false;                       // the aux loss was measured per sequence
    real ent = 0;                                 // top-p: mean entropy of the router's probabilities
    bool noise_on = false;                        // noise was added in this forward pass
    // dropout's masks (--dropout, while training): 0 or 1/(1-P) per value
    std::vector<real> att_mask;             // laid out as att
    std::vector<real> proj_mask, moe_mask;  // [M,C] on attention's c_proj output, on the MoE block's output
};

// The model: its parameters (and, when training, their gradients and the
// two AdamW moments, each a buffer of the same layout, section 3), and the
// activations of the last forward pass, which the backward pass reads.
// The loss terms are kept apart (cross-entropy, aux, z-loss) so that the
// progress line and the tests can show each one.
struct Model {
    int V = 0;  // vocabulary size, token 0 included: set by the data, not compiled in
    std::vector<TensorInfo> tensors;
    size_t n_params = 0;
    std::vector<real> params;
    Params p;
    // Loss-free balancing's biases (MOE_BIAS_RATE; topk_forward): [N_LAYER, E].
    // Model state, saved with the weights, but no parameter: no gradient, no
    // AdamW moments. Empty when the build has no bias balancing.
    std::vector<real> score_bias;
#if !MOE_INFERENCE_ONLY
    std::vector<real> grads, adam_m, adam_v;  // same layout as params
    Params g;
#endif
    // the last forward pass, packed (see the encoder): M rows
    int B = 0, M = 0;
    std::vector<int> start, len;       // [B] where each sequence's rows begin, and how many
    std::vector<int64_t> att_off;      // [B] where each sequence's attention blocks begin
    std::vector<int> tok, pos, targets;  // [M] token, position, target (-1: none)
    std::vector<uint8_t> valid;        // [M] 1 where a target exists (all, when sampling)
    LayerActs L[N_LAYER];
    std::vector<real> x_out, lnf, lnf_mean, lnf_rstd;  // [M,C], [M,C], [M], [M]
    std::vector<real> logits, probs;                    // [M,V]
    double ce_sum = 0, ce = 0;                          // summed and mean cross-entropy
    int64_t n_targets = 0;
    real aux_sum = 0, aux_coef = 0;
    real z_sum = 0;        // summed router z-loss (MOE_Z_COEF)
    real ent_sum = 0;      // summed router entropy (top-p, MOE_ENTROPY_COEF)
    int64_t dropped = 0, slots = 0;  // routing slots dropped by capacity, of all slots
    int64_t routed = 0;              // routed rows, summed over layers: slots / routed = experts per token
    // Set while training: noisy gating draws from it, and expert capacity
    // applies. Null at evaluation and sampling.
    Rng* train_rng = nullptr;
    double capacity_factor = CAPACITY_FACTOR;  // a variable so a test can compare factors in one binary
    double top_p = TOP_P;                      // ... and top-p thresholds
    // Dropout (--dropout): its probability, and while training the generator
    // of its masks (null at evaluation and sampling: nothing is dropped).
    real dropout = 0;
    Rng* drop_rng = nullptr;
    bool dropped_out = false;    // the last forward pass drew masks
    std::vector<real> emb_mask;  // [M,C] on the embeddings' sum
    // Experts taken out of the routing (--ablate, --knockout; see
    // topk_forward): ablated[l * E + e] != 0 removes expert e of layer l, and
    // skip_top removes each token's most probable experts. Empty and 0 while
    // training.
    std::vector<uint8_t> ablated;
    int skip_top = 0;
};
static Ablation ablation_of(const Model& m, int l) {
    return {m.ablated.empty() ? nullptr : &m.ablated[(size_t)l * E], m.skip_top};
}
static const real* score_bias_of(const Model& m, int l) {
    return m.score_bias.empty() ? nullptr : &m.score_bias[(size_t)l * E];
}

// The parameters of one expert (c_fc and c_proj, weights and biases): what
// the parameter count line subtracts E - K times per layer to give the
// parameters a token uses.
[[maybe_unused]] static int64_t expert_params() { return (int64_t)F * C + F + (int64_t)C * F + C; }

// The MoE block for M rows, x = ln_2 of the residual stream:
//   router logits -> (noise) -> softmax (or sigmoid) -> top-k (or top-p)
//   -> (capacity) -> aux loss (per batch, or per sequence of sq), (entropy),
//   (z-loss) -> the routed experts -> (plus the shared experts) -> out[M,C]
// model_forward runs it for a batch, model_step for one sampled token.
static void moe_forward(real* out, LayerActs& a, const real* x, const LayerParams& w, const uint8_t* valid, int M,
                        Rng* train_rng, double capacity_factor, Ablation ab = {}, const real* bias = nullptr,
                        Seqs sq = {}, double top_p = TOP_P) {
    a.logits.resize((size_t)M * E), a.probs.resize((size_t)M * E), a.chosen.resize((size_t)M * K);
    a.gate.resize((size_t)M * K), a.f.resize(E);
    router_forward(a.logits.data(), x, w, M);
    const real* z = a.logits.data();
    a.noise_on = NOISY_GATE && train_rng;
    if (a.noise_on) {
        a.noise_u.resize((size_t)M * E), a.noise_eps.resize((size_t)M * E), a.noisy.resize((size_t)M * E);
        linear_forward(a.noise_u.data(), x, w.noise_w, nullptr, M, C, E);
        noise_forward(a.noisy.data(), a.noise_eps.data(), a.logits.data(), a.noise_u.data(), valid, M, *train_rng);
        z = a.noisy.data();
    }
    if (SIGMOID_GATE) sigmoid_forward(a.probs.data(), z, (int64_t)M * E);
    else softmax_forward(a.probs.data(), z, M, E);
    topk_forward(a.chosen.data(), a.gate.data(), a.probs.data(), valid, M, ab, bias, top_p);
    const int* routed = a.chosen.data();
    a.dropped = 0;
    if (capacity_factor > 0 && train_rng) {
        a.routed.resize((size_t)M * K);
        a.dropped = capacity_forward(a.routed.data(), a.chosen.data(), a.gate.data(), valid, M, capacity_factor);
        routed = a.routed.data();
    }
    const real* P = a.probs.data();  // what the aux loss averages: probabilities, or the normalised sigmoid scores
    if (SIGMOID_GATE) a.pnorm.resize((size_t)M * E), normalize_forward(a.pnorm.data(), P, M), P = a.pnorm.data();
    a.aux = aux_forward(a.f.data(), P, a.chosen.data(), valid, M);  // f over the batch, whatever the scope
    a.seq_scope = AUX_SCOPE == Scope::seq && sq.B > 0;
    if (a.seq_scope) a.f_seq.resize((size_t)sq.B * E), a.aux = aux_seq_forward(a.f_seq.data(), P, a.chosen.data(), valid, sq);
    if (TOP_P > 0 || ENTROPY_COEF > 0) a.ent = entropy_forward(a.probs.data(), valid, M);
    if (Z_COEF > 0) a.lse.resize(M), a.z = zloss_forward(a.lse.data(), a.logits.data(), valid, M);
    experts_forward(out, a.moe, x, routed, a.gate.data(), w, M);
    if (NS > 0) {
        a.sh_h.resize((size_t)NS * M * F), a.sh_th.resize((size_t)NS * M * F), a.sh_hg.resize((size_t)NS * M * F);
        a.sh_y.resize((size_t)M * C);
        for (int s = 0; s < NS; s++) {
            const size_t o = (size_t)s * M * F;
            mlp_forward(a.sh_y.data(), &a.sh_h[o], &a.sh_th[o], &a.sh_hg[o], x, w, E + s, M);
            for (size_t i = 0; i < (size_t)M * C; i++) out[i] += a.sh_y[i];
        }
    }
}

// A model of vocabulary size V with every buffer allocated and zero: the
// table of tensors for V, the parameters (and gradients and moments), and
// the named views into them. The weights are set by init_params (a fresh
// run) or by load_model (a checkpoint). The gradients start at zero, as
// model_backward wants them; AdamW leaves them so after every step.
static void model_init(Model& m, int V) {
    m.V = V;
    m.tensors = param_layout(V);
    m.n_params = m.tensors.back().offset + m.tensors.back().size;
    m.params.assign(m.n_params, 0);
    point_params(m.p, m.params.data(), m.tensors);
    m.score_bias.assign(BIAS_RATE > 0 ? (size_t)N_LAYER * E : 0, 0);
#if !MOE_INFERENCE_ONLY
    m.grads.assign(m.n_params, 0), m.adam_m.assign(m.n_params, 0), m.adam_v.assign(m.n_params, 0);
    point_params(m.g, m.grads.data(), m.tensors);
#endif
}

// The length of one forward pass (model_forward, or a sample's tokens). The
// plain build needs nothing here; the fast one keeps, for as long as the
// pass lasts, a copy of the weights in the layout its matmul reads fastest
// (section 14).
struct ForwardPass {
    explicit ForwardPass(const Model& m) { if constexpr (FAST) if (fast::on) fast::forward_begin(m); }
    ~ForwardPass() { if constexpr (FAST) if (fast::on) fast::forward_end(); }
    ForwardPass(const ForwardPass&) = delete;
    ForwardPass& operator=(const ForwardPass&) = delete;
};

// --- dropout (Srivastava et al. 2014; --dropout P). While training, each
// value of a few chosen activations is set to zero with probability P, and
// the rest are scaled by 1/(1-P), so that every value keeps its expected
// size: at evaluation nothing is dropped and nothing scaled. A model that
// cannot count on any one unit being there spreads what it learns, and
// overfits less. nanoGPT drops four things, and so does this model: the
// embeddings' sum, the attention weights, and the output of each residual
// branch (attention's c_proj, and the MLP's, which here is the MoE block).
// The mask goes on the block's output, after the experts are summed with
// their gates, not on each expert's output: it then does what it does in
// the dense model the block replaces, so that the two compare, and each
// gate's gradient (dout . y, section 5) still sees its expert's whole
// output. Backward multiplies by the same mask: out = x * mask, so
// dx = dout * mask. The masks come from a generator of their own, saved in
// last.safetensors, so that --resume draws the same ones.
static void dropout_mask(std::vector<real>& mask, size_t n, real p, Rng& rng) {
    mask.resize(n);
    const real keep = 1 / (1 - p);
    for (size_t i = 0; i < n; i++) mask[i] = rng.uniform() < p ? 0 : keep;
}
// out = x * mask, n values (out may be x)
static void apply_mask(real* out, const real* x, const real* mask, size_t n) {
    parallel_for((int)((n + 4095) / 4096), [=](int c0, int c1) {
        for (size_t i = (size_t)c0 * 4096; i < std::min(n, (size_t)c1 * 4096); i++) out[i] = x[i] * mask[i];
    });
}

// Pack a batch, inputs and targets [B,T] (targets null when sampling), into
// rows (section 4): sequence b keeps its positions up to its last target
// (all T when sampling); what follows is padding, and is dropped. Sets the
// rows' tokens, positions and targets, where each sequence starts, and the
// size of the attention blocks; returns that size.
static int64_t pack_batch(Model& m, const int* inputs, const int* targets, int B, int T) {
    m.B = B;
    m.start.resize(B), m.len.resize(B), m.att_off.resize(B);
    m.tok.clear(), m.pos.clear(), m.targets.clear();
    int64_t att_size = 0;
    for (int b = 0; b < B; b++) {
        int n = T;
        if (targets)
            while (n > 0 && targets[b * T + n - 1] < 0) n--;
        m.start[b] = (int)m.tok.size(), m.len[b] = n, m.att_off[b] = att_size;
        att_size += (int64_t)N_HEAD * n * n;
        for (int t = 0; t < n; t++) {
            m.tok.push_back(inputs[b * T + t]), m.pos.push_back(t);
            m.targets.push_back(targets ? targets[b * T + t] : -1);
        }
    }
    m.M = (int)m.tok.size();
    m.valid.resize(m.M);
    for (int i = 0; i < m.M; i++) m.valid[i] = targets ? m.targets[i] >= 0 : 1;
    return att_size;
}

// inputs, targets: [B,T]. targets may be null (sampling): then every position
// is used and no loss is computed. Returns ce + aux_coef * aux_sum (+ Z_COEF * z_sum,
// + ENTROPY_COEF * ent_sum).
// The cross-entropy is a mean over the positions with a target, so that the
// loss of a batch of short names and one of long names are on one scale;
// the aux loss is a sum over layers, each about 1 when balanced, so
// aux_coef sets its weight against the language model for the whole stack.
static double model_forward(Model& m, const int* inputs, const int* targets, int B, int T, real aux_coef) {
    const int64_t att_size = pack_batch(m, inputs, targets, B, T);
    const int M = m.M, V = m.V;
    m.aux_coef = aux_coef;
    // Size every saved activation for these M rows. resize keeps the memory
    // of a larger batch, so after the first step nothing is allocated.
    for (auto& a : m.L) {
        a.x.resize((size_t)M * C), a.ln1.resize((size_t)M * C), a.ln1_mean.resize(M), a.ln1_rstd.resize(M);
        a.qkv.resize((size_t)M * 3 * C), a.att.resize((size_t)att_size), a.atty.resize((size_t)M * C);
        a.x_mid.resize((size_t)M * C), a.ln2.resize((size_t)M * C), a.ln2_mean.resize(M), a.ln2_rstd.resize(M);
        a.moe_out.resize((size_t)M * C);  // moe_forward sizes the router's activations
    }
    m.x_out.resize((size_t)M * C), m.lnf.resize((size_t)M * C), m.lnf_mean.resize(M), m.lnf_rstd.resize(M);
    m.logits.resize((size_t)M * V), m.probs.resize((size_t)M * V);

    // The forward pass proper: each layer reads the previous one's output
    // and writes its own named activations.
    const ForwardPass pass(m);
    const bool drop = m.dropped_out = m.drop_rng && m.dropout > 0;  // masks drawn in this order: deterministic
    const size_t MC = (size_t)M * C;
    encoder_forward(m.L[0].x.data(), m.tok.data(), m.pos.data(), m.p.wte, m.p.wpe, M);
    if (drop) dropout_mask(m.emb_mask, MC, m.dropout, *m.drop_rng), apply_mask(m.L[0].x.data(), m.L[0].x.data(), m.emb_mask.data(), MC);
    m.aux_sum = 0, m.z_sum = 0, m.ent_sum = 0, m.dropped = 0, m.slots = 0, m.routed = 0;
    for (int l = 0; l < N_LAYER; l++) {
        LayerActs& a = m.L[l];
        const LayerParams& w = m.p.h[l];
        if (drop) {
            dropout_mask(a.att_mask, (size_t)att_size, m.dropout, *m.drop_rng);
            dropout_mask(a.proj_mask, MC, m.dropout, *m.drop_rng), dropout_mask(a.moe_mask, MC, m.dropout, *m.drop_rng);
        }
        layernorm_forward(a.ln1.data(), a.ln1_mean.data(), a.ln1_rstd.data(), a.x.data(), w.ln1_w, w.ln1_b, M);
        linear_forward(a.qkv.data(), a.ln1.data(), w.attn_w, w.attn_b, M, C, 3 * C);
        attention_forward(a.atty.data(), a.att.data(), a.qkv.data(), m.start.data(), m.len.data(), m.att_off.data(), B,
                          drop ? a.att_mask.data() : nullptr);
        linear_forward(a.x_mid.data(), a.atty.data(), w.attn_proj_w, w.attn_proj_b, M, C, C);
        if (drop) apply_mask(a.x_mid.data(), a.x_mid.data(), a.proj_mask.data(), MC);
        residual_forward(a.x_mid.data(), a.x_mid.data(), a.x.data(), M);
        layernorm_forward(a.ln2.data(), a.ln2_mean.data(), a.ln2_rstd.data(), a.x_mid.data(), w.ln2_w, w.ln2_b, M);
        moe_forward(a.moe_out.data(), a, a.ln2.data(), w, m.valid.data(), M, m.train_rng, m.capacity_factor,
                    ablation_of(m, l), score_bias_of(m, l), {m.start.data(), m.len.data(), B}, m.top_p);
        if (drop) apply_mask(a.moe_out.data(), a.moe_out.data(), a.moe_mask.data(), MC);
        m.aux_sum += a.aux, m.z_sum += a.z, m.ent_sum += a.ent;
        m.dropped += a.dropped, m.slots += a.moe.offset[E] + a.dropped;
        m.routed += std::count(m.valid.begin(), m.valid.end(), 1);
        real* next = l + 1 < N_LAYER ? m.L[l + 1].x.data() : m.x_out.data();
        residual_forward(next, a.x_mid.data(), a.moe_out.data(), M);
    }
    layernorm_forward(m.lnf.data(), m.lnf_mean.data(), m.lnf_rstd.data(), m.x_out.data(), m.p.lnf_w, m.p.lnf_b, M);
    linear_forward(m.logits.data(), m.lnf.data(), m.p.lm_head, nullptr, M, C, V);
    // The loss: mean cross-entropy over the positions with a target, plus
    // the weighted load-balancing loss of every layer.
    m.ce_sum = 0, m.ce = 0, m.n_targets = 0;
    if (!targets) return 0;
    m.ce_sum = crossentropy_forward(m.probs.data(), m.logits.data(), m.targets.data(), M, V, &m.n_targets);
    m.ce = m.n_targets ? m.ce_sum / (double)m.n_targets : 0;
    return m.ce + (double)aux_coef * m.aux_sum + Z_COEF * m.z_sum + ENTROPY_COEF * m.ent_sum;
}

#if !MOE_INFERENCE_ONLY
struct Backward {  // scratch for gradients flowing between layers; reused by every layer
    std::vector<real> dres, dln, datty, dqkv, dlogits, dgate, dprobs, drouter;
    MoeGrad moe;
    std::vector<real> dnoise, sh_dhg, sh_dh, dpnorm;  // the variants' scratch
    std::vector<real> dmask;                  // [M,C] a branch's gradient through its dropout mask
} g_bw;

// Why one set of scratch buffers is enough here (unlike the activations):
// gradients flow through one layer at a time, and what one layer leaves in
// dln or dqkv the next layer down no longer needs once it has used it.
//
// The MoE block's backward, in reverse: experts (and shared experts) give
// the gradients of x and of the gates; the gates' flows through top-k into
// the probabilities, joined by the aux loss's; the softmax turns it into the
// logits' gradient, which (with the noise's and the z-loss's share) goes
// through the router Linear into x. dx accumulates.
static void moe_backward(real* dx, LayerParams& g, const real* dout, const LayerActs& a, const real* x,
                         const LayerParams& p, const uint8_t* valid, int M, real aux_coef, real z_coef,
                         real ent_coef = 0, Seqs sq = {}) {
    Backward& w = g_bw;
    w.dgate.assign((size_t)M * K, 0), w.dprobs.assign((size_t)M * E, 0), w.drouter.assign((size_t)M * E, 0);
    experts_backward(dx, w.dgate.data(), g, w.moe, dout, x, a.moe, a.gate.data(), p, M);
    for (int s = 0; s < NS; s++) {  // a shared expert's output enters with weight 1: dout passes straight in
        const size_t o = (size_t)s * M * F;
        w.sh_dhg.resize((size_t)M * F), w.sh_dh.resize((size_t)M * F);
        mlp_backward(dx, g, w.sh_dhg.data(), w.sh_dh.data(), dout, x, &a.sh_h[o], &a.sh_th[o], &a.sh_hg[o], p, E + s, M);
    }
    topk_backward(w.dprobs.data(), w.dgate.data(), a.chosen.data(), a.gate.data(), a.probs.data(), M);
    real* dP = w.dprobs.data();  // the aux loss's P: the probabilities, or the sigmoid scores normalised
    if (SIGMOID_GATE) w.dpnorm.assign((size_t)M * E, 0), dP = w.dpnorm.data();
    if (a.seq_scope) aux_seq_backward(dP, a.f_seq.data(), valid, sq, aux_coef);
    else aux_backward(dP, a.f.data(), valid, M, aux_coef);
    if (SIGMOID_GATE) normalize_backward(w.dprobs.data(), dP, a.pnorm.data(), a.probs.data(), M);
    if (ent_coef != 0) entropy_backward(w.dprobs.data(), a.probs.data(), valid, M, ent_coef);
    if (SIGMOID_GATE) sigmoid_backward(w.drouter.data(), w.dprobs.data(), a.probs.data(), (int64_t)M * E);
    else softmax_backward(w.drouter.data(), w.dprobs.data(), a.probs.data(), M, E);  // d(logits the softmax read)
    if (a.noise_on) {
        w.dnoise.assign((size_t)M * E, 0);
        noise_backward(w.dnoise.data(), w.drouter.data(), a.noise_eps.data(), a.noise_u.data(), M);
        linear_backward(dx, g.noise_w, nullptr, w.dnoise.data(), x, p.noise_w, M, C, E);
    }
    if (Z_COEF > 0) zloss_backward(w.drouter.data(), a.lse.data(), a.logits.data(), valid, M, z_coef);
    router_backward(dx, g, w.drouter.data(), x, p, M);
}

// The backward pass walks the forward pass in reverse. dres carries the
// gradient of the residual stream: a residual connection x + f(x) passes
// dres through unchanged and adds f's input gradient to it, which is why
// every backward above accumulates. Gradients land in m.grads, which the
// caller zeroes before.
// (The order of the calls below is the forward pass's, read from the end:
// each backward needs the activations its forward saved, all still there.)
static void model_backward(Model& m) {
    const int M = m.M, V = m.V;
    const size_t MC = (size_t)M * C;
    Backward& w = g_bw;
    // Zero the buffers this pass accumulates into, then start from the loss:
    // cross-entropy -> lm_head -> ln_f, which gives dres at the top.
    zero(w.dres, (size_t)M * C), zero(w.dlogits, (size_t)M * V), zero(w.dln, (size_t)M * C);
    if (m.n_targets)
        crossentropy_backward(w.dlogits.data(), m.probs.data(), m.targets.data(), M, V, (real)(1.0 / (double)m.n_targets));
    linear_backward(w.dln.data(), m.g.lm_head, nullptr, w.dlogits.data(), m.lnf.data(), m.p.lm_head, M, C, V);
    layernorm_backward(w.dres.data(), m.g.lnf_w, m.g.lnf_b, w.dln.data(), m.x_out.data(), m.p.lnf_w, m.lnf_mean.data(),
                       m.lnf_rstd.data(), M);
    for (int l = N_LAYER - 1; l >= 0; l--) {
        LayerActs& a = m.L[l];
        const LayerParams& p = m.p.h[l];
        LayerParams& g = m.g.h[l];
        // the MoE half: x_out = x_mid + moe(ln_2(x_mid)) (* its dropout mask)
        const real* dbranch = w.dres.data();
        if (m.dropped_out) w.dmask.resize(MC), apply_mask(w.dmask.data(), w.dres.data(), a.moe_mask.data(), MC), dbranch = w.dmask.data();
        zero(w.dln, (size_t)M * C);
        moe_backward(w.dln.data(), g, dbranch, a, a.ln2.data(), p, m.valid.data(), M, m.aux_coef, (real)Z_COEF,
                     (real)ENTROPY_COEF, {m.start.data(), m.len.data(), m.B});
        layernorm_backward(w.dres.data(), g.ln2_w, g.ln2_b, w.dln.data(), a.x_mid.data(), p.ln2_w, a.ln2_mean.data(),
                           a.ln2_rstd.data(), M);
        // the attention half: x_mid = x + c_proj(attention(c_attn(ln_1(x))))
        // (each buffer zeroed just before the pass that adds into it)
        zero(w.datty, (size_t)M * C);
        if (m.dropped_out) apply_mask(w.dmask.data(), w.dres.data(), a.proj_mask.data(), MC);  // dbranch points at it
        linear_backward(w.datty.data(), g.attn_proj_w, g.attn_proj_b, dbranch, a.atty.data(), p.attn_proj_w, M, C, C);
        zero(w.dqkv, (size_t)M * 3 * C);
        attention_backward(w.dqkv.data(), w.datty.data(), a.att.data(), a.qkv.data(), m.start.data(), m.len.data(),
                           m.att_off.data(), m.B, m.dropped_out ? a.att_mask.data() : nullptr);
        zero(w.dln, (size_t)M * C);
        linear_backward(w.dln.data(), g.attn_w, g.attn_b, w.dqkv.data(), a.ln1.data(), p.attn_w, M, C, 3 * C);
        layernorm_backward(w.dres.data(), g.ln1_w, g.ln1_b, w.dln.data(), a.x.data(), p.ln1_w, a.ln1_mean.data(),
                           a.ln1_rstd.data(), M);
    }
    if (m.dropped_out) apply_mask(w.dres.data(), w.dres.data(), m.emb_mask.data(), MC);
    encoder_backward(m.g.wte, m.g.wpe, w.dres.data(), m.tok.data(), m.pos.data(), M);
}

// ----------------------------------------------------------------------------
// 8. AdamW (Loshchilov & Hutter), written as PyTorch computes it:
//   p -= lr * wd * p                               decoupled weight decay
//   m  = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
//   p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
// m is a running mean of the gradient (momentum), v of its square; dividing
// by sqrt(v) gives every parameter a step of about lr whatever the scale of
// its gradient. Both start at zero, which biases them towards zero for the
// first steps: dividing by 1 - b^t undoes that. The decay is "decoupled":
// it shrinks the weight directly instead of joining the gradient, so Adam's
// scaling does not undo it. Weight decay applies to every parameter, as in
// makemore, or (decay_2d, --decay 2d) to the 2-D ones only, matrices and
// embeddings, as nanoGPT: pulling a bias or a layernorm gain towards zero
// regularises nothing, it only fights the scale the layer needs. The
// gradient is zeroed as it is used, ready for the next backward pass
// (model_backward accumulates).
struct AdamW {
    float lr = 5e-4f, weight_decay = 0.01f, beta1 = 0.9f, beta2 = 0.99f, eps = 1e-8f;
    bool decay_2d = false;
};
// Does tensor t decay under o?
static bool decays(const AdamW& o, const TensorInfo& t) { return !o.decay_2d || t.shape.size() >= 2; }
// The constants of step t, computed once per step.
struct AdamStep {
    real decay, step_size, bc2_sqrt, b1, b2, eps;
};
static AdamStep adam_step(const AdamW& o, int64_t t) {
    const double bc1 = 1 - std::pow((double)o.beta1, (double)t), bc2 = 1 - std::pow((double)o.beta2, (double)t);
    return {(real)(1 - (double)o.lr * o.weight_decay), (real)(o.lr / bc1), (real)std::sqrt(bc2), o.beta1, o.beta2,
            o.eps};
}
// One parameter p with moments m, v and gradient g (zeroed here). The fast
// AdamW (section 17) calls this same function, so both give the same bits.
static inline void adam_update_one(real& p, real& m, real& v, real& g, const AdamStep& s) {
    const real gr = g;
    g = 0;
    m = s.b1 * m + (1 - s.b1) * gr;
    v = s.b2 * v + (1 - s.b2) * gr * gr;
    p = p * s.decay - s.step_size * m / (std::sqrt(v) / s.bc2_sqrt + s.eps);
}
static void adamw_update(Model& m, const AdamW& o, int64_t t) {
    if constexpr (FAST) if (fast::on) return fast::adamw_update(m, o, t);
    AdamStep s = adam_step(o, t), keep = s;
    keep.decay = 1;  // for the tensors that do not decay
    for (const auto& ti : m.tensors)
        for (size_t i = ti.offset; i < ti.offset + ti.size; i++)
            adam_update_one(m.params[i], m.adam_m[i], m.adam_v[i], m.grads[i], decays(o, ti) ? s : keep);
}

// --- the learning-rate schedule (nanoGPT's), for step t = 1, 2, ... Warmup
// rises linearly from lr / (warmup + 1) to lr over the first `warmup` steps:
// AdamW's moments start from nothing, and full-size steps on them would
// throw the weights about before the estimates settle. The cosine then
// falls from lr to min_lr, reached after `decay_steps` (nanoGPT's
// lr_decay_iters; it counts steps from 0, it = t - 1, and so does this):
// large steps while the loss falls fast, small ones to settle at the end.
struct Schedule {
    double lr = 5e-4, min_lr = 5e-5;
    int64_t warmup = 0, decay_steps = 1;
    bool cosine = false;
};
static double lr_at(const Schedule& s, int64_t t) {
    const int64_t it = t - 1;
    if (it < s.warmup) return s.lr * (double)(it + 1) / (double)(s.warmup + 1);
    if (!s.cosine) return s.lr;
    if (it > s.decay_steps) return s.min_lr;
    const double ratio = (double)(it - s.warmup) / (double)(s.decay_steps - s.warmup);
    return s.min_lr + 0.5 * (1 + std::cos(3.141592653589793 * ratio)) * (s.lr - s.min_lr);
}

// --- gradient clipping (--grad-clip), as torch.nn.utils.clip_grad_norm_:
// when the norm of all the gradients together, sqrt(sum g^2) over every
// parameter (the aux and z-loss's shares are in them), exceeds max_norm,
// every gradient is scaled by max_norm / (norm + 1e-6). One unlucky batch
// then moves the weights no further than a typical one. The tensors' sums
// are shared out, each summed in double and in order, then added in tensor
// order: the same norm for any number of threads.
static double grad_norm(const Model& m) {
    std::vector<double> sq(m.tensors.size());
    const TensorInfo* ts = m.tensors.data();
    const real* g = m.grads.data();
    double* out = sq.data();
    parallel_for((int)m.tensors.size(), [=](int i0, int i1) {
        for (int i = i0; i < i1; i++) {
            double s = 0;
            for (size_t j = ts[i].offset; j < ts[i].offset + ts[i].size; j++) s += (double)g[j] * g[j];
            out[i] = s;
        }
    });
    return std::sqrt(std::accumulate(sq.begin(), sq.end(), 0.0));
}
// Clip to max_norm; returns the norm before clipping.
static double clip_gradients(Model& m, double max_norm) {
    const double norm = grad_norm(m), coef = max_norm / (norm + 1e-6);
    if (coef < 1)
        for (real& x : m.grads) x *= (real)coef;
    return norm;
}
#endif

// ----------------------------------------------------------------------------
// 9. Data
//
// Tokens are bytes. The vocabulary is the set of distinct bytes in the
// training file, sorted; token i+1 is byte vocab[i], and token 0 is kept for
// the start/end marker. So any file works, UTF-8 included (a multi-byte
// character is simply several tokens).
//
// Line mode (the default, makemore's): every non-empty line is one example.
// A line c1..cn becomes
//     input  [0, c1, ..., cn, pad...]      target [c1, ..., cn, 0, -1...]
// so the model learns to start a line and to end it; -1 marks positions that
// predict nothing. The context T is the longest line + 1. A seeded
// permutation sets aside min(1000, 10%) of the lines as the test split.
//
// Text mode (moe.c, makeMoE on tiny Shakespeare): the file is one stream of
// bytes; the first 90% trains, the rest tests, and a training example is a
// random window of T = BLOCK_SIZE inputs and the T bytes that follow them.

// The whole file as bytes. The checks come first so that the common
// mistakes get a message that says what to do, not just "cannot open".
// Files are read whole, so a size limit keeps a wrong path (a disk image, a
// pipe that never ends) from becoming an out-of-memory kill. A pipe (say
// --eval <(head names.txt)) is read to its end under the same limit.
constexpr uint64_t MAX_FILE_BYTES = (uint64_t)1 << 30;

// Running out of memory says what was being loaded and how big it was, not
// just "std::bad_alloc".
[[noreturn]] static void out_of_memory(const std::string& what, uint64_t bytes) {
    fail("out of memory " + what + " (" + std::to_string(bytes) + " bytes): free some memory or raise the limit "
         "(ulimit -v), or use a smaller file");
}

static std::string read_file(const std::string& path, uint64_t max_bytes = MAX_FILE_BYTES) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (!fs::exists(path, ec)) fail("cannot open '" + path + "': no such file (check the path given with -i/--input-file)");
    if (fs::is_directory(path, ec)) fail("'" + path + "' is a directory, not a file: give a text file with -i/--input-file");
    const bool pipe = fs::is_fifo(path, ec);
    if (!fs::is_regular_file(path, ec) && !pipe) fail("'" + path + "' is not a file or a pipe (a device?): give a file on disk");
    uint64_t size = pipe ? 0 : fs::file_size(path, ec);
    if (ec) fail("cannot read the size of '" + path + "': " + ec.message());
    auto too_big = [&](const std::string& how) {
        fail("'" + path + "' " + how + "; moe.cpp reads its inputs into memory and takes at most " +
             std::to_string(max_bytes) + " bytes here: use a smaller file");
    };
    if (size > max_bytes) too_big("has " + std::to_string(size) + " bytes");
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "rb"), std::fclose);
    if (!f) fail("cannot open '" + path + "': " + std::strerror(errno));
    std::string s;
    try {
        s.reserve(size);
        char buf[1 << 16];
        size_t n;
        while ((n = std::fread(buf, 1, sizeof buf, f.get())) > 0 && s.size() <= max_bytes) s.append(buf, n);
    } catch (const std::bad_alloc&) {
        out_of_memory("reading '" + path + "'", std::max<uint64_t>(size, s.size()));
    }
    if (std::ferror(f.get())) fail("error reading '" + path + "': " + std::strerror(errno));
    if (s.size() > max_bytes) too_big(pipe ? "(a pipe) goes on past that" : "grew past that while being read");
    return s;
}

// The non-empty lines of s: f(start, length, number) for each, with its
// 1-based line number in the file for error messages. A CRLF line ending
// counts as LF. Nothing is copied: line mode reads a file of millions of
// short lines, and a container per line would cost more than its bytes.
template <class F>
static void for_each_line(const std::string& s, F f) {
    size_t start = 0;
    int64_t number = 0;
    while (start < s.size()) {
        size_t end = s.find('\n', start);
        if (end == std::string::npos) end = s.size();
        number++;
        size_t len = end - start;
        if (len && s[start + len - 1] == '\r') len--;
        if (len) f(start, len, number);
        start = end + 1;
    }
}
// The same lines as strings, for small files (a log, a list of prompts).
struct Line {
    std::string text;
    int64_t number;
};
static std::vector<Line> split_lines(const std::string& s) {
    std::vector<Line> out;
    for_each_line(s, [&](size_t start, size_t len, int64_t number) { out.push_back({s.substr(start, len), number}); });
    return out;
}

// The sorted set of distinct bytes: sorted, so the same data always gives
// the same token numbers, and a checkpoint's vocabulary can be compared.
static std::string vocab_of(const bool seen[256]) {
    std::string v;
    for (int c = 0; c < 256; c++)
        if (seen[c]) v.push_back((char)c);
    return v;
}
static std::string vocab_of(const std::string& bytes) {
    bool seen[256] = {};
    for (unsigned char c : bytes) seen[c] = true;
    return vocab_of(seen);
}

// A byte as a person wants to read it in an error message.
static std::string describe_byte(unsigned char c) {
    char buf[32];
    if (c >= 32 && c < 127) std::snprintf(buf, sizeof buf, "'%c' (0x%02x)", c, c);
    else std::snprintf(buf, sizeof buf, "0x%02x", c);
    return buf;
}

// Bytes to tokens with a given vocabulary, appended to `out`; `where` names
// the input in errors.
template <class Token>
static void encode_into(std::vector<Token>& out, const char* s, size_t n, const std::string& vocab,
                        const std::string& where) {
    int lut[256];  // byte -> token, -1 for bytes outside the vocabulary
    std::fill(lut, lut + 256, -1);
    for (size_t i = 0; i < vocab.size(); i++) lut[(unsigned char)vocab[i]] = (int)i + 1;
    for (size_t i = 0; i < n; i++) {
        int t = lut[(unsigned char)s[i]];
        if (t < 0)
            fail(where + ": byte " + describe_byte((unsigned char)s[i]) +
                 " is not in the model's vocabulary (the bytes of the file it was trained on)");
        out.push_back((Token)t);
    }
}
static std::vector<int> encode(const std::string& s, const std::string& vocab, const std::string& where) {
    std::vector<int> out;
    out.reserve(s.size());
    encode_into(out, s.data(), s.size(), vocab, where);
    return out;
}

// Line mode's examples, packed: line i is the tokens tok[start[i] ..
// start[i+1]), without markers. One buffer for all lines and one offset
// each, so memory follows the file's bytes (2 bytes a token, 4 a line)
// whatever the lines' lengths.
static_assert(MAX_FILE_BYTES < ((uint64_t)1 << 32), "LineSet's 32-bit offsets need files under 4 GiB");
struct LineSet {
    std::vector<uint16_t> tok;       // tokens are 0..256
    std::vector<uint32_t> start{0};  // size() + 1 offsets
    size_t size() const { return start.size() - 1; }
    bool empty() const { return size() == 0; }
    const uint16_t* line(size_t i) const { return tok.data() + start[i]; }
    int length(size_t i) const { return (int)(start[i + 1] - start[i]); }
    void add(const uint16_t* t, size_t n) {
        tok.insert(tok.end(), t, t + n);
        start.push_back((uint32_t)tok.size());
    }
};

// The non-empty lines of `raw` encoded with `vocab`, in file order.
static LineSet encode_lines(const std::string& raw, const std::string& vocab, const std::string& path) {
    LineSet out;
    for_each_line(raw, [&](size_t s, size_t len, int64_t number) {
        encode_into(out.tok, raw.data() + s, len, vocab, path + ":" + std::to_string(number));
        out.start.push_back((uint32_t)out.tok.size());
    });
    return out;
}

// Line numbers in the order of their lines' contents: with them, a sample
// is looked up among the data's lines (makemore's report: memorised or new)
// without a second copy of every line.
static bool line_less(const LineSet& s, size_t a, const uint16_t* b, int nb) {
    return std::lexicographical_compare(s.line(a), s.line(a) + s.length(a), b, b + nb);
}
static std::vector<uint32_t> sorted_order(const LineSet& s) {
    std::vector<uint32_t> order(s.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return line_less(s, a, s.line(b), s.length(b)); });
    return order;
}
static bool contains(const LineSet& s, const std::vector<uint32_t>& order, const std::vector<int>& line) {
    std::vector<uint16_t> t(line.begin(), line.end());
    auto it = std::lower_bound(order.begin(), order.end(), 0,
                               [&](uint32_t a, int) { return line_less(s, a, t.data(), (int)t.size()); });
    return it != order.end() && s.length(*it) == (int)t.size() && std::equal(t.begin(), t.end(), s.line(*it));
}

// A data set after splitting and encoding, for either mode.
struct Dataset {
    bool text = false;
    std::string vocab;  // token i+1 is byte vocab[i]
    int T = 0;          // positions per example
    LineSet train, test;                     // line mode
    std::vector<int> train_text, test_text;  // text mode: encoded bytes
    std::vector<uint32_t> train_order, test_order;  // line mode: sorted_order of each, for contains()
    uint64_t bytes = 0, hash = 0;  // the file's size and FNV-1a hash: a checkpoint remembers its data by them
};

// Text mode: one stream, the first 90% trains and the last 10% tests.
static void split_text(Dataset& d, const std::string& raw, const std::string& path) {
    d.T = BLOCK_SIZE;
    size_t n_train = raw.size() * 9 / 10;
    if (n_train < (size_t)BLOCK_SIZE + 1 || raw.size() - n_train < 2)
        fail("'" + path + "' has " + std::to_string(raw.size()) + " bytes; text mode needs at least " +
             std::to_string((BLOCK_SIZE + 1) * 10 / 9 + 3) +
             " (90% of it must hold one window of BLOCK_SIZE + 1 bytes): use a longer file or a smaller "
             "-DMOE_BLOCK_SIZE");
    d.train_text.reserve(n_train), d.test_text.reserve(raw.size() - n_train);
    encode_into(d.train_text, raw.data(), n_train, d.vocab, path);
    encode_into(d.test_text, raw.data() + n_train, raw.size() - n_train, d.vocab, path);
}

// Line mode: each non-empty line is an example; a seeded shuffle sets aside
// the test lines.
static void split_lines_data(Dataset& d, const std::string& raw, const std::string& path, uint64_t seed,
                             const std::string& vocab) {
    size_t n_lines = 0, longest = 0;
    bool seen[256] = {};
    for_each_line(raw, [&](size_t s, size_t len, int64_t number) {
        if (std::memchr(raw.data() + s, '\0', len))
            fail(path + ":" + std::to_string(number) +
                 ": a NUL byte: this looks like a binary file, not lines of text (use --text to train on raw bytes)");
        if ((int64_t)len + 1 > BLOCK_SIZE)
            fail(path + ":" + std::to_string(number) + ": line of " + std::to_string(len) + " bytes needs " +
                 std::to_string(len + 1) + " positions but BLOCK_SIZE is " + std::to_string(BLOCK_SIZE) +
                 "; shorten the line, use --text, or rebuild with -DMOE_BLOCK_SIZE=" + std::to_string(len + 1));
        for (size_t i = s; i < s + len; i++) seen[(unsigned char)raw[i]] = true;
        n_lines++, longest = std::max(longest, len);
    });
    if (!n_lines) fail("'" + path + "' has no non-empty lines: line mode needs one example per line");
    d.vocab = vocab.empty() ? vocab_of(seen) : vocab;
    d.T = (int)longest + 1;
    LineSet all = encode_lines(raw, d.vocab, path);
    // The split is a seeded shuffle, as makemore's: the same seed gives the
    // same test set, which --resume relies on (it reuses the run's seed).
    std::vector<uint32_t> perm(n_lines);
    std::iota(perm.begin(), perm.end(), 0);
    Rng r = make_rng(seed, STREAM_SPLIT);
    for (size_t i = perm.size(); i > 1; i--) std::swap(perm[i - 1], perm[r.below(i)]);  // Fisher-Yates
    size_t n_test = std::min<size_t>(1000, n_lines / 10);
    for (size_t i = 0; i < perm.size(); i++) (i < n_test ? d.test : d.train).add(all.line(perm[i]), all.length(perm[i]));
    d.train_order = sorted_order(d.train), d.test_order = sorted_order(d.test);
}

// vocab: the checkpoint's when resuming, else empty (taken from the file).
// The bytes `raw` of a file named `path` (for messages) as a data set.
static Dataset dataset_from_bytes(const std::string& raw, const std::string& path, bool text, uint64_t seed,
                                  const std::string& vocab) {
    Dataset d;
    d.text = text;
    if (raw.empty()) fail("'" + path + "' is empty: give a file with one example per line, or any text with --text");
    if (text) {
        d.vocab = vocab.empty() ? vocab_of(raw) : vocab;
        split_text(d, raw, path);
    } else {
        split_lines_data(d, raw, path, seed, vocab);
    }
    return d;
}

// FNV-1a, 64 bits: a fingerprint of a file, enough to tell one data file
// from another (not a defence against someone forging one).
static uint64_t fnv1a(const std::string& s) {
    uint64_t h = 1469598103934665603ull;
    for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
    return h;
}
static Dataset load_dataset(const std::string& path, bool text, uint64_t seed, const std::string& vocab) {
    const std::string raw = read_file(path);
    try {
        Dataset d = dataset_from_bytes(raw, path, text, seed, vocab);
        d.bytes = raw.size(), d.hash = fnv1a(raw);
        return d;
    } catch (const std::bad_alloc&) {
        out_of_memory("encoding the data file '" + path + "'", raw.size());
    }
}

// A file of lines to evaluate (--eval, --val), with a model's vocabulary:
// its lines encoded, and the context they need (the longest line + 1).
// `flag` names the option in errors.
struct LineFile {
    LineSet lines;
    int T = 0;
};
// A line needs its length + 1 positions, and a model has learned only the
// positions of its training context: a longer line would be scored with
// position vectors that never trained, so it is refused.
static LineFile load_line_file(const std::string& path, const std::string& vocab, const std::string& flag, int context) {
    const std::string raw = read_file(path);
    size_t longest = 0;
    for_each_line(raw, [&](size_t, size_t len, int64_t number) {
        if ((int64_t)len + 1 > context)
            fail(flag + ": " + path + ":" + std::to_string(number) + ": line of " + std::to_string(len) +
                 " bytes, but the model was trained on lines of at most " + std::to_string(context - 1) +
                 " (its context is " + std::to_string(context) + " positions): evaluate shorter lines");
        longest = std::max(longest, len);
    });
    LineFile lf;
    try {
        lf = {encode_lines(raw, vocab, path), (int)longest + 1};
    } catch (const std::bad_alloc&) {
        out_of_memory(flag + ": encoding '" + path + "'", raw.size());
    }
    if (lf.lines.empty()) fail(flag + ": '" + path + "' has no non-empty lines to evaluate");
    return lf;
}

// Fill inputs/targets [n, T] with the lines numbered in `which`, in the
// layout above: input [0, c1..cn, 0...], target [c1..cn, 0, -1...].
static void lines_batch(int* inputs, int* targets, const LineSet& lines, const std::vector<size_t>& which, int T) {
    for (size_t b = 0; b < which.size(); b++) {
        const uint16_t* l = lines.line(which[b]);
        int* in = inputs + b * T;
        int* tg = targets + b * T;
        int n = lines.length(which[b]);
        for (int t = 0; t < T; t++) {
            in[t] = t == 0 ? 0 : t <= n ? l[t - 1] : 0;
            tg[t] = t < n ? l[t] : t == n ? 0 : -1;
        }
    }
}

#if !MOE_INFERENCE_ONLY
// A training batch of B examples drawn at random, with replacement (as
// makemore's sampler draws them). This is the only use of the training
// generator, so the generator state alone fixes the rest of a run.
static void train_batch(std::vector<int>& inputs, std::vector<int>& targets, const Dataset& d, int B, Rng& rng) {
    inputs.resize((size_t)B * d.T), targets.resize((size_t)B * d.T);
    if (!d.text) {
        std::vector<size_t> which(B);
        for (auto& w : which) w = rng.below(d.train.size());
        lines_batch(inputs.data(), targets.data(), d.train, which, d.T);
        return;
    }
    for (int b = 0; b < B; b++) {  // text mode: a random window and the byte after each position
        size_t s = rng.below(d.train_text.size() - d.T);
        for (int t = 0; t < d.T; t++) inputs[b * d.T + t] = d.train_text[s + t], targets[b * d.T + t] = d.train_text[s + t + 1];
    }
}
#endif

// ----------------------------------------------------------------------------
// 10. Checkpoints
//
// safetensors: 8 bytes of little-endian header length, a JSON header, then
// the raw little-endian float32 data of every tensor. The header maps each
// tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
// into the data) and "__metadata__" to string values: here the model's
// configuration and the vocabulary, so a checkpoint is self-describing.
//
// model.safetensors  the weights with the best test loss (for eval, sampling)
// last.safetensors   the latest weights plus the training state (AdamW
//                    moments as the flat tensors adamw.m and adamw.v, the
//                    step, the generator state and the best test loss), so
//                    --resume continues bit for bit as if never stopped.
//
// A checkpoint is written to a temporary file, flushed to disk, then renamed
// over the old one: a rename is atomic, so a crash leaves the old file or the
// new one, never half of either. Loading trusts nothing: every size, offset,
// dtype and shape is checked before a byte is used.

using Meta = std::map<std::string, std::string>;

// The temporary file that becomes `path`: path.tmp.PID, a name of this
// process's own, so that two processes writing the same file never share
// (or rename away) each other's half-written bytes.
static std::string process_id() {
#if defined(__unix__) || defined(__APPLE__)
    return std::to_string((long long)getpid());
#else
    return "0";
#endif
}
static std::string temp_name(const std::string& path) { return path + ".tmp." + process_id(); }

// Write a file so that a crash never leaves half of it: body() writes
// everything to a temporary file, which is forced to the disk (fsync) and
// only then renamed over path. A rename is atomic, so readers see the old
// file or the new one. Any failure removes the temporary file, leaves the old
// one as it was, and names `what` was being written.
static void write_atomic(const std::string& path, const std::string& what, const std::function<bool(FILE*)>& body) {
    namespace fs = std::filesystem;
    const std::string tmp = temp_name(path);
    auto bad = [&](const std::string& step) {
        std::string err = std::strerror(errno);
        std::error_code ec;
        fs::remove(tmp, ec);
        fail("cannot write " + what + " '" + path + "' (" + step + ": " + err + "); the previous " + what +
             ", if any, is untouched. Check the disk space and the permissions of the work dir (-o)");
    };
    {
        std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(tmp.c_str(), "wb"), std::fclose);
        if (!f) bad("open " + tmp);
        bool ok = body(f.get());
        // fwrite may buffer: only a successful fflush means the bytes reached
        // the kernel, and only fsync that they reached the disk.
        if (!ok || std::fflush(f.get()) != 0) bad("write");
#if defined(__unix__) || defined(__APPLE__)
        if (fsync(fileno(f.get())) != 0) bad("fsync");
#endif
        FILE* raw = f.release();  // close by hand: its error matters too
        if (std::fclose(raw) != 0) bad("close");
    }
    std::error_code ec;
    fs::rename(tmp, path, ec);
    if (ec) {
        errno = ec.value();
        bad("rename to " + path);
    }
#if defined(__unix__) || defined(__APPLE__)
    // The rename is an entry in the directory, which has its own blocks: a
    // power cut could lose it unless the directory is flushed too.
    const std::string dir = fs::path(path).parent_path().empty() ? "." : fs::path(path).parent_path().string();
    if (int fd = open(dir.c_str(), O_RDONLY); fd >= 0) fsync(fd), close(fd);
#endif
}
static void write_text_atomic(const std::string& path, const std::string& what, const std::string& text) {
    write_atomic(path, what, [&](FILE* f) { return std::fwrite(text.data(), 1, text.size(), f) == text.size(); });
}

#if !MOE_INFERENCE_ONLY  // only training writes checkpoints
// JSON strings escape '"', '\\' and control bytes; every other byte passes.
static std::string json_escape(const std::string& s) {
    std::string o;
    for (unsigned char c : s) {
        if (c == '"' || c == '\\') o += '\\', o += (char)c;
        else if (c < 0x20) {
            char b[8];
            std::snprintf(b, sizeof b, "\\u%04x", c);
            o += b;
        } else o += (char)c;
    }
    return o;
}

static std::string hex_encode(const std::string& bytes) {
    static const char* d = "0123456789abcdef";
    std::string o;
    for (unsigned char c : bytes) o += d[c >> 4], o += d[c & 15];
    return o;
}


// One tensor to save: its name, its shape, and where its values are.
struct SaveTensor {
    std::string name;
    std::vector<int64_t> shape;
    const real* data;
};

static void write_safetensors(const std::string& path, const std::vector<SaveTensor>& ts, const Meta& meta) {
    // The header: metadata first, then the tensors in order, each one's data
    // following the previous one's, so the offsets are a running sum.
    std::string h = "{\"__metadata__\":{";
    bool first = true;
    for (const auto& kv : meta) {
        h += (first ? "\"" : ",\"") + json_escape(kv.first) + "\":\"" + json_escape(kv.second) + "\"";
        first = false;
    }
    h += "}";
    uint64_t off = 0;
    for (const auto& t : ts) {
        int64_t n = 1;
        std::string shape;
        for (size_t i = 0; i < t.shape.size(); i++) n *= t.shape[i], shape += (i ? "," : "") + std::to_string(t.shape[i]);
        h += ",\"" + json_escape(t.name) + "\":{\"dtype\":\"F32\",\"shape\":[" + shape + "],\"data_offsets\":[" +
             std::to_string(off) + "," + std::to_string(off + 4 * n) + "]}";
        off += 4 * n;
    }
    h += "}";
    while (h.size() % 8) h += ' ';  // keeps the data 8-byte aligned, as the reference writer does

    write_atomic(path, "checkpoint", [&](FILE* f) {
        unsigned char len[8];  // the header length, little-endian
        for (int i = 0; i < 8; i++) len[i] = (unsigned char)((uint64_t)h.size() >> (8 * i));
        bool ok = std::fwrite(len, 1, 8, f) == 8 && std::fwrite(h.data(), 1, h.size(), f) == h.size();
        std::vector<unsigned char> buf;
        for (const auto& t : ts) {
            int64_t n = 1;
            for (int64_t s : t.shape) n *= s;
            buf.resize((size_t)n * 4);
            for (int64_t i = 0; i < n; i++) {  // float32, little-endian, whatever the host
                float v = (float)t.data[i];
                uint32_t u;
                std::memcpy(&u, &v, 4);
                for (int b = 0; b < 4; b++) buf[(size_t)i * 4 + b] = (unsigned char)(u >> (8 * b));
            }
            ok = ok && std::fwrite(buf.data(), 1, buf.size(), f) == buf.size();
        }
        return ok;
    });
}
#endif

// --- reading: a small JSON parser, enough for a safetensors header. Numbers
// are kept as their text and converted, strictly, where they are used. A
// header is untrusted input: every read is bounds-checked, the nesting depth
// is limited, and any surprise is an error naming the byte where it happened.
struct Json {
    enum Kind { NUL, BOOL, NUM, STR, ARR, OBJ } kind = NUL;
    std::string s;  // STR, or the text of a NUM
    std::vector<Json> arr;
    std::vector<std::pair<std::string, Json>> obj;
};

// A recursive-descent parser: value() looks at one character and hands over
// to the rule for an object, an array, a string, a number or a literal; each
// rule consumes exactly its own text and leaves i just after it. Every read
// checks i against the end first, so truncated input is an error, not a read
// past the buffer.
struct JsonParser {
    const std::string& s;
    size_t i = 0;  // the next byte to read
    [[noreturn]] void error(const std::string& what) { fail("invalid JSON at byte " + std::to_string(i) + ": " + what); }
    void ws() {  // skip whitespace, as JSON allows between any two tokens
        while (i < s.size() && (s[i] == ' ' || s[i] == '\t' || s[i] == '\n' || s[i] == '\r')) i++;
    }
    // The four hex digits after the 'u' at s[i] (i is left on the last).
    unsigned hex4() {
        if (i + 4 >= s.size()) error("short \\u escape");
        unsigned v = 0;
        for (int k = 1; k <= 4; k++) {
            char h = s[i + k];
            int d = h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : h >= 'A' && h <= 'F' ? h - 'A' + 10 : -1;
            if (d < 0) error("bad \\u escape");
            v = v * 16 + (unsigned)d;
        }
        i += 4;
        return v;
    }
    // Code point v as UTF-8: 1 to 4 bytes, the leading one saying how many.
    static void utf8(std::string& o, unsigned v) {
        if (v < 0x80) {
            o += (char)v;
        } else if (v < 0x800) {
            o += (char)(0xC0 | v >> 6), o += (char)(0x80 | (v & 0x3F));
        } else if (v < 0x10000) {
            o += (char)(0xE0 | v >> 12), o += (char)(0x80 | (v >> 6 & 0x3F)), o += (char)(0x80 | (v & 0x3F));
        } else {
            o += (char)(0xF0 | v >> 18), o += (char)(0x80 | (v >> 12 & 0x3F)), o += (char)(0x80 | (v >> 6 & 0x3F));
            o += (char)(0x80 | (v & 0x3F));
        }
    }
    // A string, with its escapes decoded. Raw control bytes are invalid JSON.
    std::string str() {
        if (s[i] != '"') error("expected a string");
        std::string o;
        for (i++;; i++) {
            if (i >= s.size()) error("unterminated string");
            char c = s[i];
            if (c == '"') break;
            if ((unsigned char)c < 0x20) error("control character in a string");
            if (c != '\\') {
                o += c;
                continue;
            }
            if (++i >= s.size()) error("unterminated escape");
            switch (s[i]) {
                case '"': o += '"'; break;
                case '\\': o += '\\'; break;
                case '/': o += '/'; break;
                case 'b': o += '\b'; break;
                case 'f': o += '\f'; break;
                case 'n': o += '\n'; break;
                case 'r': o += '\r'; break;
                case 't': o += '\t'; break;
                case 'u': {  // a UTF-16 code unit, decoded to UTF-8 (Python's json.dumps writes these)
                    unsigned v = hex4();
                    if (v >= 0xDC00 && v <= 0xDFFF) error("\\u escape: a low surrogate without a high one");
                    if (v >= 0xD800 && v <= 0xDBFF) {  // a surrogate pair: \uD83D\uDE00 is one code point
                        if (i + 2 >= s.size() || s[i + 1] != '\\' || s[i + 2] != 'u')
                            error("\\u escape: a high surrogate without its low one");
                        i += 2;
                        const unsigned lo = hex4();
                        if (lo < 0xDC00 || lo > 0xDFFF) error("\\u escape: a high surrogate without its low one");
                        v = 0x10000 + ((v - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    utf8(o, v);
                    break;
                }
                default: error("bad escape");
            }
        }
        i++;
        return o;
    }
    // Any value. depth counts the enclosing objects and arrays: a header is
    // two deep, so a limit of 8 stops a file of ten thousand '[' from
    // exhausting the stack.
    Json value(int depth) {
        if (depth > 8) error("nested too deeply");
        ws();
        if (i >= s.size()) error("unexpected end");
        Json j;
        char c = s[i];
        if (c == '{') {
            j.kind = Json::OBJ;
            i++, ws();
            if (i < s.size() && s[i] == '}') return i++, j;
            for (;;) {
                ws();
                if (i >= s.size()) error("unexpected end");
                std::string k = str();
                ws();
                if (i >= s.size() || s[i] != ':') error("expected ':'");
                i++;
                j.obj.emplace_back(k, value(depth + 1));
                ws();
                if (i < s.size() && s[i] == ',') i++;
                else if (i < s.size() && s[i] == '}') return i++, j;
                else error("expected ',' or '}'");
            }
        }
        if (c == '[') {
            j.kind = Json::ARR;
            i++, ws();
            if (i < s.size() && s[i] == ']') return i++, j;
            for (;;) {
                j.arr.push_back(value(depth + 1));
                ws();
                if (i < s.size() && s[i] == ',') i++;
                else if (i < s.size() && s[i] == ']') return i++, j;
                else error("expected ',' or ']'");
            }
        }
        if (c == '"') return j.kind = Json::STR, j.s = str(), j;
        if (c == '-' || (c >= '0' && c <= '9')) {  // kept as text; json_uint checks it where it is used
            size_t b = i;
            while (i < s.size() && (std::isdigit((unsigned char)s[i]) || strchr("+-.eE", s[i]))) i++;
            return j.kind = Json::NUM, j.s = s.substr(b, i - b), j;
        }
        for (const char* w : {"true", "false", "null"})
            if (s.compare(i, strlen(w), w) == 0) return i += strlen(w), j.kind = *w == 'n' ? Json::NUL : Json::BOOL, j;
        error("unexpected character");
    }
};

// What the header says about one tensor, and the file in memory.
struct StTensor {
    std::string dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0, end = 0;
};
struct Checkpoint {
    std::string path;
    Meta meta;
    std::map<std::string, StTensor> tensors;
    std::string data;  // the bytes after the header
};

// A JSON number that must be a plain non-negative integer (shapes, offsets).
static uint64_t json_uint(const Json& j, const std::string& what) {
    if (j.kind != Json::NUM || j.s.empty() || j.s.size() > 15 || !std::all_of(j.s.begin(), j.s.end(), ::isdigit))
        fail(what + " must be a non-negative integer");
    return std::stoull(j.s);
}

// Validate a safetensors file given as bytes: the header length fits the
// file, the header is a JSON object, each tensor is F32 with offsets inside
// the data that agree with its shape, and the tensors tile the data exactly
// (no overlap, no gap, nothing left over). Which tensors must be there is
// load_model's business. (The fuzzer calls this directly.)
static Checkpoint parse_safetensors(const std::string& raw, const std::string& path) {
    Checkpoint ck;
    ck.path = path;
    const uint64_t max_header = 1 << 20;
    auto bad = [&](const std::string& why) { fail("checkpoint '" + path + "' is not a valid safetensors file: " + why); };
    // The first 8 bytes: the header length, little-endian whatever the host.
    if (raw.size() < 8) bad("shorter than the 8-byte header length (truncated?)");
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | (unsigned char)raw[i];
    if (n > raw.size() - 8) bad("header length " + std::to_string(n) + " runs past the end of the file (truncated?)");
    if (n > max_header) bad("header length " + std::to_string(n) + " is absurd (more than 1 MiB)");
    // Then the JSON header, then the data, which the offsets index from 0.
    std::string header = raw.substr(8, n);
    ck.data = raw.substr(8 + n);
    Json root;
    try {
        JsonParser p{header};
        root = p.value(0);
        p.ws();
        if (p.i != header.size()) p.error("trailing characters");
    } catch (const std::runtime_error& e) {
        bad(std::string("header: ") + e.what());
    }
    // The header maps names to tensors, plus "__metadata__" (strings only).
    if (root.kind != Json::OBJ) bad("the header is not a JSON object");
    std::vector<std::pair<uint64_t, uint64_t>> ranges;  // each tensor's [begin, end), to check the tiling
    for (const auto& kv : root.obj) {
        const std::string& name = kv.first;
        if (name == "__metadata__") {
            if (kv.second.kind != Json::OBJ) bad("__metadata__ is not an object");
            for (const auto& m : kv.second.obj) {
                if (m.second.kind != Json::STR) bad("__metadata__ value '" + m.first + "' is not a string");
                ck.meta[m.first] = m.second.s;
            }
            continue;
        }
        if (ck.tensors.count(name)) bad("tensor '" + name + "' appears twice");
        if (kv.second.kind != Json::OBJ) bad("entry '" + name + "' is not an object");
        // A tensor: its dtype, shape and data_offsets, each checked before
        // anything is computed from it (the shape's size in particular, so a
        // crafted shape cannot overflow or ask for terabytes).
        StTensor t;
        const Json *dt = nullptr, *sh = nullptr, *of = nullptr;
        for (const auto& f : kv.second.obj) {
            if (f.first == "dtype") dt = &f.second;
            else if (f.first == "shape") sh = &f.second;
            else if (f.first == "data_offsets") of = &f.second;
        }
        if (!dt || !sh || !of || dt->kind != Json::STR || sh->kind != Json::ARR || of->kind != Json::ARR ||
            of->arr.size() != 2)
            bad("tensor '" + name + "' lacks a proper dtype, shape or data_offsets");
        t.dtype = dt->s;
        uint64_t numel = 1;
        for (const auto& d : sh->arr) {
            t.shape.push_back((int64_t)json_uint(d, "a dimension of '" + name + "'"));
            uint64_t dim = (uint64_t)t.shape.back();
            if (dim && numel > ((uint64_t)1 << 40) / dim) bad("tensor '" + name + "' is absurdly large");
            numel *= dim;  // checked first, so it cannot overflow
        }
        t.begin = json_uint(of->arr[0], "data_offsets of '" + name + "'");
        t.end = json_uint(of->arr[1], "data_offsets of '" + name + "'");
        if (t.dtype != "F32") bad("tensor '" + name + "' has dtype " + t.dtype + "; moe.cpp reads F32 only");
        if (t.end < t.begin || t.end > ck.data.size())
            bad("tensor '" + name + "' has data_offsets outside the data (truncated file?)");
        if (t.end - t.begin != numel * 4) bad("tensor '" + name + "': data_offsets disagree with its shape");
        ranges.push_back({t.begin, t.end});
        ck.tensors[name] = t;
    }
    // Sorted by offset, the tensors must cover the data exactly once.
    std::sort(ranges.begin(), ranges.end());
    uint64_t at = 0;
    for (const auto& r : ranges) {
        if (r.first != at) bad(r.first < at ? "two tensors overlap" : "a gap between tensors");
        at = r.second;
    }
    if (at != ck.data.size()) bad("the data section has " + std::to_string(ck.data.size() - at) + " stray bytes");
    return ck;
}

// Read a checkpoint file, refusing at once one too large to be a checkpoint.
static Checkpoint read_safetensors(const std::string& path) {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (!fs::exists(path, ec))
        fail("checkpoint '" + path + "' does not exist: train first (./moe), or point to one with -o/--work-dir or --checkpoint");
    // The largest checkpoint this build can write: a vocabulary of all 256
    // bytes, weights and both AdamW moments, and a generous header.
    const std::vector<TensorInfo> layout = param_layout(MAX_VOCAB);
    const uint64_t max_header = 1 << 20, max_size = 8 + max_header + 3 * 4 * (layout.back().offset + layout.back().size);
    if (fs::file_size(path, ec) > max_size && !ec)
        fail("checkpoint '" + path + "' has " + std::to_string(fs::file_size(path, ec)) +
             " bytes, more than any checkpoint of this build (" + std::to_string(max_size) +
             "): it is not one, or it was made with larger -DMOE_... constants");
    return parse_safetensors(read_file(path, max_size), path);
}

// Copy tensor `name` of shape `shape` into dst, converting float32 to real.
static bool copy_tensor(real* dst, const Checkpoint& ck, const std::string& name, const std::vector<int64_t>& shape,
                        bool required) {
    auto it = ck.tensors.find(name);
    if (it == ck.tensors.end()) {
        if (required) fail("checkpoint '" + ck.path + "' lacks tensor '" + name + "'");
        return false;
    }
    if (it->second.shape != shape) {
        std::string got, want;
        for (auto d : it->second.shape) got += (got.empty() ? "" : ",") + std::to_string(d);
        for (auto d : shape) want += (want.empty() ? "" : ",") + std::to_string(d);
        fail("checkpoint '" + ck.path + "': tensor '" + name + "' has shape [" + got + "] but this build expects [" +
             want + "]");
    }
    // Decode little-endian float32 byte by byte (right on any host) and
    // refuse non-finite weights: a NaN would only surface steps later.
    const char* src = ck.data.data() + it->second.begin;
    int64_t n = (int64_t)((it->second.end - it->second.begin) / 4);
    for (int64_t i = 0; i < n; i++) {
        uint32_t u = 0;
        for (int b = 3; b >= 0; b--) u = u << 8 | (unsigned char)src[i * 4 + b];
        float v;
        std::memcpy(&v, &u, 4);
        if (!std::isfinite(v)) fail("checkpoint '" + ck.path + "': tensor '" + name + "' holds NaN or infinity");
        dst[i] = v;
    }
    return true;
}

// Metadata values, which must be present (and integers, for meta_int).
static std::string meta_get(const Checkpoint& ck, const std::string& key) {
    auto it = ck.meta.find(key);
    if (it == ck.meta.end())
        fail("checkpoint '" + ck.path + "' lacks metadata '" + key + "': it was not written by moe.cpp");
    return it->second;
}
static int64_t meta_int(const Checkpoint& ck, const std::string& key) {
    std::string v = meta_get(ck, key);
    char* end = nullptr;
    errno = 0;
    long long x = std::strtoll(v.c_str(), &end, 10);
    if (v.empty() || *end || errno) fail("checkpoint '" + ck.path + "': metadata '" + key + "' is not an integer");
    return x;
}

// Build the model a checkpoint describes: its configuration must match the
// constants this binary was compiled with, and the error says how to rebuild.
static void load_model(Model& m, const Checkpoint& ck) {
    // Keys added after the first release may be absent: such a checkpoint
    // was written before the constant existed, with its default value.
    struct {
        const char* key;
        int compiled;
        const char* macro;
        int if_absent;  // -1: the key must be present
    } consts[] = {{"n_layer", N_LAYER, "MOE_N_LAYER", -1},     {"n_head", N_HEAD, "MOE_N_HEAD", -1},
                  {"n_embd", C, "MOE_N_EMBD", -1},             {"n_experts", E, "MOE_N_EXPERTS", -1},
                  {"top_k", K, "MOE_TOP_K", -1},               {"block_size", BLOCK_SIZE, "MOE_BLOCK_SIZE", -1},
                  {"norm_topk", NORM_TOPK ? 1 : 0, "MOE_NORM_TOPK", -1}, {"ff", F, "MOE_FF", 4 * C},
                  {"noisy_gate", NOISY_GATE, "MOE_NOISY_GATE", 0},       {"n_shared", NS, "MOE_N_SHARED", 0},
                  {"sigmoid_gate", SIGMOID_GATE, "MOE_SIGMOID_GATE", 0}};
    // Every constant that differs is named at once, with one rebuild line
    // that sets them all.
    std::string diff, flags;
    for (const auto& c : consts) {
        int64_t v = c.if_absent != -1 && !ck.meta.count(c.key) ? c.if_absent : meta_int(ck, c.key);
        if (v == c.compiled) continue;
        diff += std::string(diff.empty() ? "" : ", ") + c.key + "=" + std::to_string(v) + " (this binary: " + c.macro + "=" +
                std::to_string(c.compiled) + ")";
        flags += std::string(" -D") + c.macro + "=" + std::to_string(v);
    }
    // Top-p's threshold decides how many experts each token gets, at
    // evaluation too: the build must have the one the model was trained with.
    const std::string tp = ck.meta.count("top_p") ? meta_get(ck, "top_p") : "0";
    if (tp != fmt("%g", TOP_P)) {
        diff += std::string(diff.empty() ? "" : ", ") + "top_p=" + tp + " (0: top-k; this binary: MOE_TOP_P=" +
                fmt("%g", TOP_P) + ")";
        flags += " -DMOE_TOP_P=" + tp;
    }
    if (!diff.empty())
        fail("checkpoint '" + ck.path + "' has " + diff + ": rebuild with" + flags + " (g++" + flags + " ... or cmake -B build" +
             flags + ")");
    // Loss-free balancing's biases are part of the model (they change every
    // choice): a build with them loads only checkpoints that have them.
    const std::string br = ck.meta.count("bias_rate") ? meta_get(ck, "bias_rate") : "0";
    if ((br != "0") != (BIAS_RATE > 0))
        fail("checkpoint '" + ck.path + "' was trained " +
             (br != "0" ? "with loss-free balancing (bias_rate=" + br + ")" : std::string("without loss-free balancing")) +
             " but this binary was built with MOE_BIAS_RATE=" + fmt("%g", BIAS_RATE) + ": rebuild with -DMOE_BIAS_RATE=" + br);
    // (capacity_factor and z_coef change training, not the tensors: train()
    // checks them when resuming; any build may evaluate or sample.)
    // The data mode and the vocabulary: the vocabulary sets V, the size of
    // wte and lm_head, so it is validated before the model is built from it.
    std::string mode = meta_get(ck, "mode");
    if (mode != "lines" && mode != "text") fail("checkpoint '" + ck.path + "': metadata 'mode' must be lines or text");
    std::string hex = meta_get(ck, "vocab"), vocab;
    auto nib = [](char h) { return h >= '0' && h <= '9' ? h - '0' : h >= 'a' && h <= 'f' ? h - 'a' + 10 : -1; };
    for (size_t i = 0; i < hex.size(); i += 2) {
        if (i + 1 >= hex.size() || nib(hex[i]) < 0 || nib(hex[i + 1]) < 0)
            fail("checkpoint '" + ck.path + "': metadata 'vocab' is not lowercase hex, two digits per byte");
        vocab += (char)(nib(hex[i]) * 16 + nib(hex[i + 1]));
    }
    if (vocab.empty() || vocab_of(vocab) != vocab)
        fail("checkpoint '" + ck.path + "': metadata 'vocab' must list distinct bytes in increasing order");
    // Every tensor of this build must be present with its exact shape; the
    // only others allowed are the optimizer's.
    model_init(m, (int)vocab.size() + 1);
    std::set<std::string> known = {"adamw.m", "adamw.v"};
    for (const auto& t : m.tensors) {
        copy_tensor(m.params.data() + t.offset, ck, t.name, std::vector<int64_t>(t.shape.begin(), t.shape.end()), true);
        known.insert(t.name);
    }
    for (int l = 0; l < (int)m.score_bias.size() / E; l++) {
        copy_tensor(&m.score_bias[(size_t)l * E], ck, score_bias_name(l), {E}, true);
        known.insert(score_bias_name(l));
    }
    for (const auto& kv : ck.tensors)
        if (!known.count(kv.first)) fail("checkpoint '" + ck.path + "' has an unexpected tensor '" + kv.first + "'");
}

// The vocabulary bytes of a checkpoint that load_model has already validated.
static std::string checkpoint_vocab(const Checkpoint& ck) {
    std::string hex = meta_get(ck, "vocab"), v;
    for (size_t i = 0; i + 1 < hex.size(); i += 2) v += (char)std::stoi(hex.substr(i, 2), nullptr, 16);
    return v;
}

// ----------------------------------------------------------------------------
// 11. Evaluation and sampling, and the reports

// Evaluation asks two questions of a model: how well does it predict (the
// mean cross-entropy, in nats per token: ln V for a model that knows
// nothing, 0 for one that is always sure and right), and how does it route
// (the expert load, the fraction of routing slots each expert of each layer
// took). Both are sums over many forward passes, turned into means at the
// end (finish).
struct EvalResult {
    double loss = 0;                 // mean cross-entropy, nats per predicted token
    int64_t tokens = 0;              // predicted tokens
    std::vector<double> load;        // [N_LAYER * E] fraction of routing slots per expert
    double slots = 0, routed = 0;    // routing slots taken, rows routed (both summed over layers)
    std::vector<double> experts;     // [N_LAYER] experts per token (top-p: it varies)
};

// Expert load per layer, e.g. "L0 0.25 0.25 0.25 0.25 | L1 ...": balanced
// routing reads 1/E everywhere; a collapsed layer has one entry near 1.
static std::string print_load(const std::vector<double>& load) {
    std::string s;
    char b[32];
    for (int l = 0; l < N_LAYER; l++) {
        s += l ? " | L" + std::to_string(l) : "L" + std::to_string(l);
        for (int e = 0; e < E; e++) std::snprintf(b, sizeof b, " %.2f", load[(size_t)l * E + e]), s += b;
    }
    return s;
}

// Top-p's experts per token, the mean over layers and then each layer's:
// "1.634 (L0 1.20 L1 1.71 ...)". (With top-k it is K everywhere.)
static std::string print_experts(const EvalResult& r) {
    std::string s = fmt("%.3f (", r.routed > 0 ? r.slots / r.routed : NAN);
    for (int l = 0; l < N_LAYER; l++) s += (l ? " L" : "L") + std::to_string(l) + fmt(" %.2f", r.experts[l]);
    return s + ")";
}

// --- what the router did. The load says how much each expert gets; to see
// WHAT each expert gets, evaluation can also count, per layer, where each
// token's first choice went, split by the kind of byte the token is reading
// (its input): does one expert take the digits and another the letters?
// A Routing collects those counts over any number of forward passes.
enum { CLS_MARKER, CLS_LETTER, CLS_DIGIT, CLS_OPERATOR, CLS_OTHER, N_CLASS };
static const char* const CLASS_NAMES[N_CLASS] = {"marker", "letters", "digits", "operators", "punct/space"};
// The probe (below: routing dynamics) is the first PROBE_TOKENS routed tokens.
constexpr size_t PROBE_TOKENS = 8192;
struct Routing {
    std::vector<int> cls;          // [V] class of each token
    std::vector<double> first;     // [N_LAYER, E] tokens whose first choice was expert e
    std::vector<double> by_class;  // [N_LAYER, N_CLASS, E] the same, per class of the input byte
    std::vector<int16_t> picks;    // [probe token, N_LAYER, K] every choice of the probe's tokens
    std::vector<int> read, next;   // [probe token] the token read, and the one to predict
    // Top-p: slots taken and tokens routed, summed over layers, per class of
    // the byte read, and (last) from a '=' to the line's end: an answer.
    std::vector<double> slots_by, rows_by;  // [N_CLASS + 1]
    int eq = -1, newline = -1;              // the tokens of '=' and of a newline (text mode), -1 if none
};
static Routing routing_for(const std::string& vocab) {
    Routing r;
    r.cls.push_back(CLS_MARKER);  // token 0 starts (and ends) every line
    for (unsigned char c : vocab)
        r.cls.push_back(std::isalpha(c) || c >= 0x80 ? CLS_LETTER  // UTF-8 bytes count as letters
                        : std::isdigit(c)            ? CLS_DIGIT
                        : c && std::strchr("+-*/=<>%", c) ? CLS_OPERATOR  // (strchr finds the NUL too)
                                                     : CLS_OTHER);
    r.first.assign((size_t)N_LAYER * E, 0), r.by_class.assign((size_t)N_LAYER * N_CLASS * E, 0);
    r.slots_by.assign(N_CLASS + 1, 0), r.rows_by.assign(N_CLASS + 1, 0);
    auto token_of = [&](char c) { size_t at = vocab.find(c); return at == std::string::npos ? -1 : 1 + (int)at; };
    r.eq = token_of('='), r.newline = token_of('\n');
    return r;
}
// Routing counts of the last forward pass: the load into load[N_LAYER * E],
// the first choices into rt (if any).
static void add_routing(std::vector<double>& load, Routing* rt, const Model& m) {
    load.resize((size_t)N_LAYER * E);
    for (int l = 0; l < N_LAYER; l++) {
        const std::vector<int>& ch = m.L[l].chosen;
        for (int c : ch)
            if (c >= 0) load[(size_t)l * E + c] += 1;
        if (!rt) continue;
        for (int i = 0; i < m.M; i++) {
            int e = ch[(size_t)i * K];
            if (e < 0) continue;
            rt->first[(size_t)l * E + e] += 1;
            rt->by_class[((size_t)l * N_CLASS + rt->cls[m.tok[i]]) * E + e] += 1;
        }
    }
    for (int b = 0; rt && TOP_P > 0 && b < m.B; b++) {  // experts per token, by what the token reads
        bool answer = false;  // at or after a '=' of this line
        for (int i = m.start[b]; i < m.start[b] + m.len[b]; i++) {
            const int tok = m.tok[i];
            answer = (answer && tok != 0 && tok != rt->newline) || tok == rt->eq;
            if (m.L[0].chosen[(size_t)i * K] < 0) continue;
            double n = 0;
            for (int l = 0; l < N_LAYER; l++)
                for (int j = 0; j < K; j++) n += m.L[l].chosen[(size_t)i * K + j] >= 0;
            rt->slots_by[rt->cls[tok]] += n, rt->rows_by[rt->cls[tok]] += N_LAYER;
            if (answer) rt->slots_by[N_CLASS] += n, rt->rows_by[N_CLASS] += N_LAYER;
        }
    }
    for (int i = 0; rt && i < m.M && rt->read.size() < PROBE_TOKENS; i++) {
        if (m.L[0].chosen[(size_t)i * K] < 0) continue;  // not routed (no target)
        for (int l = 0; l < N_LAYER; l++)
            for (int j = 0; j < K; j++) rt->picks.push_back((int16_t)m.L[l].chosen[(size_t)i * K + j]);
        rt->read.push_back(m.tok[i]), rt->next.push_back(m.targets.empty() ? -1 : m.targets[i]);
    }
}

// --- routing dynamics (after OLMoE, Muennighoff et al. 2024). A fixed probe
// (the test split's first PROBE_TOKENS tokens) is routed at every
// evaluation; three measures per layer tell when and how the routing settles.
// `picks` is Routing::picks: [token, layer, K].
static bool picked(const int16_t* p, int e) {
    for (int j = 0; j < K; j++)
        if (p[j] == e) return true;
    return false;
}
// Router saturation: the mean over probe tokens of |top-K now ∩ top-K at the
// end| / K (top-p: over the number taken at the end). 1: the routing is
// already the final one; a router that chooses at random scores K/E on
// average. Its rise against step shows when the routing stops changing.
static double saturation(const std::vector<int16_t>& now, const std::vector<int16_t>& end, int l) {
    const size_t n = std::min(now.size(), end.size()) / ((size_t)N_LAYER * K);
    double sum = 0;
    for (size_t t = 0; t < n; t++) {
        const size_t at = (t * N_LAYER + l) * K;
        int shared = 0, taken = 0;  // taken: K, or with top-p as many as the final routing took
        for (int j = 0; j < K; j++) shared += now[at + j] >= 0 && picked(&end[at], now[at + j]), taken += end[at + j] >= 0;
        sum += (double)shared / taken;
    }
    return n ? sum / (double)n : NAN;
}
// Co-activation: c[a * E + b] = P(expert b chosen | expert a chosen), over the
// probe's tokens, for a != b (the diagonal is left 0). Each row sums to K - 1
// (every token that chose a chose K - 1 others); spread evenly over the
// other E - 1 experts, the experts pair at random, and a cell near 1 means b
// is almost always chosen beside a. With K = 1 it is all 0.
static std::vector<double> coactivation(const std::vector<int16_t>& picks, int l, std::vector<double>* counts = nullptr) {
    std::vector<double> both((size_t)E * E, 0), with(E, 0);
    for (size_t at = (size_t)l * K; at < picks.size(); at += (size_t)N_LAYER * K)
        for (int j = 0; j < K && picks[at + j] >= 0; j++) {  // (top-p leaves the last slots empty: -1)
            with[picks[at + j]] += 1;
            for (int i = 0; i < K && picks[at + i] >= 0; i++)
                if (i != j) both[(size_t)picks[at + j] * E + picks[at + i]] += 1;
        }
    if (counts) *counts = both;
    for (int a = 0; a < E; a++)
        for (int b = 0; b < E; b++) both[(size_t)a * E + b] /= with[a] > 0 ? with[a] : 1;
    return both;
}
// Vocabulary specialisation: for each token seen at least 10 times in
// `bytes` (the tokens read, or the tokens to predict), the largest share of
// its occurrences in which one expert is among the chosen, averaged over
// those tokens. 1: every occurrence of a byte goes to the same expert, a
// router keyed on the byte; a router choosing at random gives about K/E.
static double vocab_specialisation(const std::vector<int16_t>& picks, const std::vector<int>& bytes, int l) {
    std::map<int, std::vector<double>> seen;  // token -> occurrences with each expert chosen, and in all (last)
    for (size_t t = 0; t < bytes.size() && (t + 1) * N_LAYER * K <= picks.size(); t++) {
        std::vector<double>& c = seen[bytes[t]];
        c.resize(E + 1);
        for (int j = 0; j < K; j++)
            if (const int e = picks[(t * N_LAYER + l) * K + j]; e >= 0) c[e] += 1;
        c[E] += 1;
    }
    double sum = 0;
    int n = 0;
    for (const auto& [token, c] : seen)
        if (c[E] >= 10) sum += *std::max_element(c.begin(), c.begin() + E) / c[E], n++;
    return n ? sum / n : NAN;
}
// Turn sums into means: loss per token, and each layer's counts into fractions.
static void finish(EvalResult& r, double sum) {
    r.loss = r.tokens ? sum / (double)r.tokens : NAN;
    r.experts.resize(N_LAYER);
    for (int l = 0; l < N_LAYER; l++) {
        double n = 0;
        for (int e = 0; e < E; e++) n += r.load[(size_t)l * E + e];
        r.experts[l] = r.routed > 0 ? n / (r.routed / N_LAYER) : NAN;
        for (int e = 0; e < E; e++) r.load[(size_t)l * E + e] /= n > 0 ? n : 1;
    }
}

// Evaluation is the forward pass alone, with aux_coef 0, summing the
// cross-entropy over every predicted token. It touches no generator.
// Line mode: the first `limit` lines (all, if fewer), 64 lines per forward pass.
static EvalResult eval_lines(Model& m, const LineSet& lines, int T, size_t limit, Routing* rt = nullptr) {
    EvalResult r;
    r.load.assign((size_t)N_LAYER * E, 0);
    double sum = 0;
    size_t n = std::min(limit, lines.size());
    std::vector<int> in, tg;
    for (size_t b0 = 0; b0 < n; b0 += 64) {
        std::vector<size_t> which;
        for (size_t i = b0; i < std::min(n, b0 + 64); i++) which.push_back(i);
        in.resize(which.size() * T), tg.resize(which.size() * T);
        lines_batch(in.data(), tg.data(), lines, which, T);
        model_forward(m, in.data(), tg.data(), (int)which.size(), T, 0);
        sum += m.ce_sum, r.tokens += m.n_targets, r.slots += (double)m.slots, r.routed += (double)m.routed;
        add_routing(r.load, rt, m);
    }
    finish(r, sum);
    return r;
}

// Text mode: consecutive windows of BLOCK_SIZE (the last one may be shorter),
// at most `limit` windows.
static EvalResult eval_text(Model& m, const std::vector<int>& toks, size_t limit, Routing* rt = nullptr) {
    EvalResult r;
    r.load.assign((size_t)N_LAYER * E, 0);
    double sum = 0;
    std::vector<int> in, tg;
    size_t windows = 0;
    // Windows of one length go 16 to a batch; the final, shorter window of the
    // stream gets a batch of its own.
    for (size_t s = 0; s + 1 < toks.size() && windows < limit;) {
        int B = 0, T = (int)std::min<size_t>(BLOCK_SIZE, toks.size() - 1 - s);
        in.clear(), tg.clear();
        while (B < 16 && windows < limit && s + T < toks.size()) {  // full windows of length T
            in.insert(in.end(), toks.begin() + s, toks.begin() + s + T);
            tg.insert(tg.end(), toks.begin() + s + 1, toks.begin() + s + T + 1);
            B++, windows++, s += T;
        }
        model_forward(m, in.data(), tg.data(), B, T, 0);
        sum += m.ce_sum, r.tokens += m.n_targets, r.slots += (double)m.slots, r.routed += (double)m.routed;
        add_routing(r.load, rt, m);
    }
    finish(r, sum);
    return r;
}

// Pick the next token from the logits of one position. temperature 0 takes
// the most likely token; top_k > 0 keeps only the k most likely.
// Temperature divides the logits before the softmax: below 1 it sharpens the
// distribution towards the likeliest tokens, above 1 it flattens it. top_k
// cuts the long tail of unlikely tokens, each of which alone is rare but
// which together are drawn often enough to spoil a sample.
static int sample_token(const real* logits, int V, double temperature, int top_k, Rng& rng) {
    // temperature 0: the argmax (the first of equal maxima)
    if (temperature <= 0) return (int)(std::max_element(logits, logits + V) - logits);
    std::vector<double> z(logits, logits + V);
    if (top_k > 0 && top_k < V) {
        std::vector<double> sorted = z;
        std::nth_element(sorted.begin(), sorted.begin() + (top_k - 1), sorted.end(), std::greater<double>());
        double cut = sorted[top_k - 1];
        for (double& v : z)
            if (v < cut) v = -INFINITY;
    }
    double maxv = *std::max_element(z.begin(), z.end()), sum = 0;
    for (double& v : z) sum += (v = std::exp((v - maxv) / temperature));
    // Inverse transform sampling: walk the cumulative weights until they pass u.
    double u = rng.uniform() * sum;
    for (int i = 0; i < V; i++)
        if ((u -= z[i]) < 0) return i;
    return V - 1;
}

// --- sampling with a KV cache. Generating token t with model_forward would
// rerun all t positions, though only the last one is new: the keys and
// values of the earlier positions do not change (attention looks only
// backwards). So each layer keeps them in a cache, and one step runs the new
// token alone through the same layer functions, attending over the cache:
// the cost of a token grows with t (the attention), not with t^2.
// One layer's cache: the key and value of every position so far, [BLOCK_SIZE, C]
// each, and kt, part two's copy of the keys, transposed (section 16).
struct KVLayer {
    std::vector<real> k, v, kt;
};
struct KVCache {
    KVLayer L[N_LAYER];
    int len = 0;  // positions cached
    // one token's activations, reused by every step
    std::vector<real> x, ln, qkv, y, att, proj, out, logits;
    LayerActs moe;  // the MoE block's activations for the one token (only the router's and experts' are used)
};

// Attention for one new position pos of a sequence whose earlier keys and
// values are in the cache c: attention_forward's loop body for t = pos. The
// new row's key and value (in qkv, [3C]) go into the cache first; y [C] gets
// the heads' outputs, att [N_HEAD, BLOCK_SIZE] their weights.
static void attention_step(real* y, real* att, const real* qkv, KVLayer& c, int pos) {
    c.k.resize((size_t)BLOCK_SIZE * C), c.v.resize((size_t)BLOCK_SIZE * C);
    std::memcpy(&c.k[(size_t)pos * C], qkv + C, C * sizeof(real));
    std::memcpy(&c.v[(size_t)pos * C], qkv + 2 * C, C * sizeof(real));
    if constexpr (FAST) if (fast::on) return fast::attention_step(y, att, qkv, c, pos);
    const real scale = 1 / std::sqrt((real)HS);
    for (int h = 0; h < N_HEAD; h++) {
        real* a = att + h * BLOCK_SIZE;
        for (int s = 0; s <= pos; s++) a[s] = dot(qkv + h * HS, &c.k[(size_t)s * C + h * HS], HS) * scale;
        softmax_forward(a, a, 1, pos + 1);
        for (int j = 0; j < HS; j++) y[h * HS + j] = 0;
        for (int s = 0; s <= pos; s++)
            for (int j = 0; j < HS; j++) y[h * HS + j] += a[s] * c.v[(size_t)s * C + h * HS + j];
    }
}

// Run token `tok` at position cache.len; leaves its logits in cache.logits.
static void model_step(Model& m, KVCache& c, int tok) {
    const ForwardPass pass(m);
    const int pos = c.len;
    const uint8_t valid = 1;
    real mu, rs;  // layernorm statistics, not needed afterwards
    c.x.resize(C), c.ln.resize(C), c.qkv.resize(3 * C), c.y.resize(C), c.proj.resize(C);
    c.att.resize(N_HEAD * BLOCK_SIZE), c.out.resize(C), c.logits.resize(m.V);
    encoder_forward(c.x.data(), &tok, &pos, m.p.wte, m.p.wpe, 1);
    // The same layers as model_forward, for one row.
    for (int l = 0; l < N_LAYER; l++) {
        const LayerParams& w = m.p.h[l];
        layernorm_forward(c.ln.data(), &mu, &rs, c.x.data(), w.ln1_w, w.ln1_b, 1);
        linear_forward(c.qkv.data(), c.ln.data(), w.attn_w, w.attn_b, 1, C, 3 * C);
        attention_step(c.y.data(), c.att.data(), c.qkv.data(), c.L[l], pos);
        linear_forward(c.proj.data(), c.y.data(), w.attn_proj_w, w.attn_proj_b, 1, C, C);
        for (int i = 0; i < C; i++) c.x[i] += c.proj[i];
        layernorm_forward(c.ln.data(), &mu, &rs, c.x.data(), w.ln2_w, w.ln2_b, 1);
        moe_forward(c.out.data(), c.moe, c.ln.data(), w, &valid, 1, nullptr, 0, ablation_of(m, l), score_bias_of(m, l));
        for (int i = 0; i < C; i++) c.x[i] += c.out[i];
    }
    layernorm_forward(c.ln.data(), &mu, &rs, c.x.data(), m.p.lnf_w, m.p.lnf_b, 1);
    linear_forward(c.logits.data(), c.ln.data(), m.p.lm_head, nullptr, 1, C, m.V);
    c.len++;
}

// Extend ctx by up to max_new tokens, calling emit(token, ms) for each.
// Line mode stops at the end marker or when the line fills the trained
// context. Text mode runs on when the cache is full: positions are absolute
// (wpe), so the window slides by refilling the cache with the last half.
static std::vector<int> generate(Model& m, std::vector<int> ctx, int max_new, bool lines, int context,
                                 double temperature, int top_k, Rng& rng,
                                 const std::function<void(int, double)>& emit) {
    KVCache cache;
    const ForwardPass pass(m);  // one copy of the weights for the whole sample (section 14)
    size_t fed = ctx.size() - std::min<size_t>(ctx.size(), BLOCK_SIZE);  // ctx[fed..] is in the cache
    for (size_t i = fed; i < ctx.size(); i++) model_step(m, cache, ctx[i]);
    for (int i = 0; i < max_new; i++) {
        if (lines && (int)ctx.size() >= context) break;
        double t0 = now_ms();
        if (!lines) cache.logits[0] = -INFINITY;  // token 0 marks lines; a byte stream never holds it
        int next = sample_token(cache.logits.data(), m.V, temperature, top_k, rng);
        if (lines && next == 0) break;
        ctx.push_back(next);
        if (cache.len == BLOCK_SIZE) {  // slide: keep the last BLOCK_SIZE/2 tokens, recomputed at new positions
            cache.len = 0;
            for (size_t j = ctx.size() - BLOCK_SIZE / 2; j < ctx.size(); j++) model_step(m, cache, ctx[j]);
        } else {
            model_step(m, cache, next);
        }
        if (emit) emit(next, now_ms() - t0);
    }
    return ctx;
}

// Tokens back to bytes; token 0, the line marker, is not a byte.
// (The inverse of encode in section 9.)
static std::string decode(const std::vector<int>& toks, const std::string& vocab) {
    std::string s;
    for (int t : toks)
        if (t > 0) s += vocab[t - 1];
    return s;
}

// makemore's report: samples sorted into those seen in training, those in
// the test split (generalised to a real name) and new ones.
static void print_line_samples(Model& m, const std::string& vocab, int context, int n, double temperature,
                               int top_k, Rng& rng, const Dataset* d) {
    std::vector<std::string> in_train, in_test, fresh;
    for (int i = 0; i < n; i++) {
        std::vector<int> toks = generate(m, {0}, BLOCK_SIZE, true, context, temperature, top_k, rng, nullptr);
        std::string s = decode(toks, vocab);
        toks.erase(toks.begin());  // the start marker
        (d && contains(d->train, d->train_order, toks)  ? in_train
         : d && contains(d->test, d->test_order, toks) ? in_test
                                                       : fresh)
            .push_back(s);
    }
    std::printf("--------------------------------------------------------------------------------\n");
    if (!d) {
        for (const auto& s : fresh) std::printf("%s\n", s.c_str());
        return;
    }
    auto show = [](const char* what, const std::vector<std::string>& v) {
        std::printf("%zu samples that are %s:\n", v.size(), what);
        for (const auto& s : v) std::printf("%s\n", s.c_str());
    };
    show("in train", in_train), show("in test", in_test), show("new", fresh);
    std::printf("--------------------------------------------------------------------------------\n");
}

// --- reports for a reader: routing tables, arithmetic accuracy, and the
// routing explorer. Colours are ANSI escape codes, used only when stdout is
// a terminal (a pipe or a file gets plain text; NO_COLOR turns them off).
// (isatty is POSIX; elsewhere the reports are always plain text.)
static bool stdout_is_terminal() {
#if defined(__unix__) || defined(__APPLE__)
    return isatty(fileno(stdout)) && !std::getenv("NO_COLOR");
#else
    return false;
#endif
}

// One table per layer: a row per name (a file, a character class), a column
// per expert, each cell the share of that row's tokens whose first choice
// was the expert, then the row's token count. counts[row] is [N_LAYER, E].
// On a terminal the cells are shaded, darker for a larger share, so a glance
// shows which expert took what.
static void print_routing(const std::string& title, const std::vector<std::string>& rows,
                          const std::vector<std::vector<double>>& counts) {
    const bool tty = stdout_is_terminal();
    int w = 8;
    for (const auto& r : rows) w = std::max(w, (int)r.size());
    std::printf("%s\n", title.c_str());
    for (int l = 0; l < N_LAYER; l++) {
        std::printf("layer %-*d", w - 4, l);
        for (int e = 0; e < E; e++) std::printf("   e%-3d", e);
        std::printf("   tokens\n");
        for (size_t r = 0; r < rows.size(); r++) {
            double n = 0;
            for (int e = 0; e < E; e++) n += counts[r][(size_t)l * E + e];
            if (n == 0) continue;
            std::printf("  %-*s", w, rows[r].c_str());
            for (int e = 0; e < E; e++) {
                double v = counts[r][(size_t)l * E + e] / n;
                if (tty)  // 256-colour greys: 255 is white, 236 nearly black
                    std::printf(" \x1b[48;5;%dm\x1b[38;5;%dm %.3f\x1b[0m", 255 - (int)std::lround(v * 19),
                                v > 0.5 ? 255 : 232, v);
                else
                    std::printf("  %.3f", v);
            }
            std::printf(" %8.0f\n", n);
        }
    }
}
// The same counts by character class: Routing.by_class as rows.
static void print_routing_by_class(const Routing& rt) {
    std::vector<std::string> rows(CLASS_NAMES, CLASS_NAMES + N_CLASS);
    std::vector<std::vector<double>> counts(N_CLASS, std::vector<double>((size_t)N_LAYER * E));
    for (int l = 0; l < N_LAYER; l++)
        for (int c = 0; c < N_CLASS; c++)
            for (int e = 0; e < E; e++) counts[c][(size_t)l * E + e] = rt.by_class[((size_t)l * N_CLASS + c) * E + e];
    print_routing("routing by the class of the byte read: share of tokens whose first choice is expert e", rows, counts);
    if (TOP_P == 0) return;
    std::printf("experts per token (top-p, mean over layers) by the byte read:");
    for (int c = 0; c <= N_CLASS; c++)
        if (rt.rows_by[c] > 0)
            std::printf("%s %s %.3f", c ? "," : "", c < N_CLASS ? CLASS_NAMES[c] : "from '=' to the line's end",
                        rt.slots_by[c] / rt.rows_by[c]);
    std::printf("\n");
}

// --- arithmetic: a line "a+b=c", "a-b=c" or "a*b=c" is right when c is the
// decimal value of a op b. parse_arith splits a line of that shape (c may be
// anything) and returns false for any other line.
static bool parse_arith(const std::string& s, int64_t* value, std::string* prompt, std::string* answer) {
    size_t i = 0;
    auto number = [&](int64_t* v) {
        size_t j = i;
        for (*v = 0; i < s.size() && i - j < 9 && std::isdigit((unsigned char)s[i]); i++) *v = *v * 10 + (s[i] - '0');
        return i > j;
    };
    int64_t a, b;
    if (!number(&a) || i >= s.size() || !std::strchr("+-*", s[i]) || s[i] == 0) return false;
    char op = s[i++];
    if (!number(&b) || i >= s.size() || s[i] != '=') return false;
    *value = op == '+' ? a + b : op == '-' ? a - b : a * b;
    *prompt = s.substr(0, i + 1), *answer = s.substr(i + 1);
    return true;
}

constexpr int ARITH_SAMPLES = 1000;  // lines sampled for the sampled accuracy

// Two measures. Sampled: of ARITH_SAMPLES free samples (at --temperature), those that are
// arithmetic, and how many of those are right (the model chooses its own,
// maybe easy, problems). Greedy: the model completes the held-out prompts
// "a op b=" of `file` with its most likely tokens, and the answer must be
// exact: the harder and fairer test. Returns the greedy accuracy.
// The greedy accuracy on the prompts of `file`; the first wrong answers go
// to `wrong` (if given). Greedy decoding draws nothing from a generator.
struct Score {
    int right = 0, total = 0;
    double share() const { return (double)right / total; }
};
static Score arith_greedy(Model& m, const std::string& vocab, int context, const std::string& file,
                          std::vector<std::string>* wrong) {
    int total = 0, right = 0;
    Rng unused = make_rng(0, STREAM_SAMPLE);
    for (const auto& l : split_lines(read_file(file))) {
        int64_t value;
        std::string prompt, answer;
        if (!parse_arith(l.text, &value, &prompt, &answer)) continue;
        std::vector<int> ctx = {0}, p = encode(prompt, vocab, file + ":" + std::to_string(l.number));
        ctx.insert(ctx.end(), p.begin(), p.end());
        std::string got = decode(generate(m, ctx, BLOCK_SIZE, true, context, 0, 0, unused, nullptr), vocab).substr(prompt.size());
        total++;
        if (got == std::to_string(value)) right++;
        else if (wrong && wrong->size() < 5) wrong->push_back(prompt + got + " (want " + std::to_string(value) + ")");
    }
    if (!total) fail("--arith: '" + file + "' has no lines of the form a+b=c, a-b=c or a*b=c");
    return {right, total};
}
static double arith_report(Model& m, const std::string& vocab, int context, const std::string& file,
                           double temperature, Rng& rng) {
    std::vector<std::string> wrong;
    const Score greedy = arith_greedy(m, vocab, context, file, &wrong);
    const int right = greedy.right, total = greedy.total;
    std::printf("arith greedy: %d / %d held-out prompts completed correctly (%.1f%%)\n", right, total, 100.0 * right / total);
    for (const auto& w : wrong) std::printf("  wrong: %s\n", w.c_str());
    int parsed = 0, correct = 0;
    for (int i = 0; i < ARITH_SAMPLES; i++) {
        std::string s = decode(generate(m, {0}, BLOCK_SIZE, true, context, temperature, 0, rng, nullptr), vocab), prompt,
                    answer;
        int64_t value;
        if (!parse_arith(s, &value, &prompt, &answer)) continue;
        parsed++, correct += answer == std::to_string(value);
    }
    std::printf("arith sampled: %d samples, %d are arithmetic, %d of those correct (%.1f%%)\n", ARITH_SAMPLES, parsed,
                correct, parsed ? 100.0 * correct / parsed : 0.0);
    return greedy.share();
}

// --- the routing explorer: run one line of text through the model and show,
// layer by layer, the expert each byte went to first (on a terminal, each
// byte coloured by its expert; otherwise a row of expert numbers under the
// text), and with `gates` every chosen expert and its gate weight, per byte.
static const int EXPERT_COLOURS[16] = {196, 46, 33, 226, 201, 51, 208, 93, 118, 250, 124, 22, 17, 136, 53, 30};
static char expert_digit(int e) { return e < 0 ? '.' : e < 10 ? (char)('0' + e) : e < 36 ? (char)('a' + e - 10) : '#'; }
// The text is encoded with the model's vocabulary (a byte it never saw is an
// error that names it) and run through one forward pass without targets,
// so every position is routed; the tables below read m.L[l].chosen.
static void route_line(Model& m, const std::string& vocab, bool text_mode, int context, const std::string& s,
                       bool gates) {
    std::vector<int> toks = text_mode ? std::vector<int>{} : std::vector<int>{0}, p = encode(s, vocab, "--route");
    toks.insert(toks.end(), p.begin(), p.end());
    if (toks.empty()) fail("--route: nothing to route: give some text");
    if ((int)toks.size() > context)  // positions past the trained context have untrained embeddings
        fail("--route: '" + s + "' has " + std::to_string(s.size()) + " bytes; this model was trained on at most " +
             std::to_string(context - !text_mode) + ": route a shorter text");
    const int T = (int)toks.size();
    model_forward(m, toks.data(), nullptr, 1, T, 0);
    std::string shown;  // ^ for the line marker, ? for bytes that would upset a terminal
    for (int t : toks) shown += t == 0 ? '^' : std::isprint((unsigned char)vocab[t - 1]) ? vocab[t - 1] : '?';
    const bool tty = stdout_is_terminal();
    std::printf("route \"%s\"%s\n", s.c_str(), text_mode ? "" : "  (^ is the line start)");
    if (!tty) std::printf("       %s\n", shown.c_str());
    for (int l = 0; l < N_LAYER; l++) {
        std::printf("  L%-3d ", l);
        for (int i = 0; i < T; i++) {
            int e = m.L[l].chosen[(size_t)i * K];
            if (tty) std::printf("\x1b[48;5;%dm\x1b[38;5;%dm%c\x1b[0m", EXPERT_COLOURS[e % 16], 232, shown[i]);
            else std::putchar(expert_digit(e));
        }
        std::putchar('\n');
    }
    if (tty) {
        std::printf("  experts:");
        for (int e = 0; e < E; e++) std::printf(" \x1b[48;5;%dm\x1b[38;5;232m %d \x1b[0m", EXPERT_COLOURS[e % 16], e);
        std::printf("\n");
    } else {
        std::printf("  (each digit: the first-choice expert of the byte above it, in that layer)\n");
    }
    if (!gates) return;
    std::printf("  byte ");
    for (int l = 0; l < N_LAYER; l++) std::printf(" | L%-*d", 8 * K - 2 + (TOP_P > 0 ? 4 : 0), l);
    std::printf("\n");
    for (int i = 0; i < T; i++) {
        std::printf("  %-4c ", shown[i]);
        for (int l = 0; l < N_LAYER; l++) {
            std::printf(" |");
            int n = 0;  // top-p: how many experts the byte got in this layer
            for (int j = 0; j < K; j++) {
                const int e = m.L[l].chosen[(size_t)i * K + j];
                if (e < 0) std::printf("        ");
                else std::printf(" e%-2d%.2f", e, (double)m.L[l].gate[(size_t)i * K + j]), n++;
            }
            if (TOP_P > 0) std::printf(" (%d)", n);
        }
        std::printf("\n");
    }
}

// --- pictures. SVG is text: a figure is a few hundred lines, rectangles,
// polylines and text elements, and any browser shows it. Two kinds are
// enough here: line plots (curves over training) and heatmaps (routing).
// A plot is a list of Series, each a named, coloured polyline; dashed ones
// are the --val files, so that they read apart from train and test.
struct Series {
    std::string name, colour;
    bool dashed = false;
    std::vector<std::pair<double, double>> pts;  // (x, y), x increasing
};
static const char* const PALETTE[20] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
                                        "#7f7f7f", "#bcbd22", "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896",
                                        "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7", "#dbdb8d", "#9edae5"};

// Text placed in SVG must escape the five characters XML gives a meaning
// to; a file name with '&' or '<' would otherwise break the picture.
static std::string svg_escape(const std::string& s) {
    std::string o;
    for (unsigned char c : s)
        o += c == '<' ? "&lt;" : c == '>' ? "&gt;" : c == '&' ? "&amp;" : c == '"' ? "&quot;" : std::string(1, (char)c);
    return o;
}
static void svg_text(std::string& o, double x, double y, const std::string& t, const char* attrs = "") {
    o += "<text x=\"" + fmt("%.1f", x) + "\" y=\"" + fmt("%.1f", y) + "\" " + attrs + ">" + svg_escape(t) + "</text>\n";
}
// A round tick spacing giving about n ticks over `range`: 1, 2 or 5 x 10^k.
static double nice_step(double range, double n) {
    double raw = range / std::max(n, 2.0), p = std::pow(10, std::floor(std::log10(raw))), f = raw / p;
    return (f < 1.5 ? 1 : f < 3.5 ? 2 : f < 7.5 ? 5 : 10) * p;
}

// A line plot in the box (x, y, w, h): axes with ticks, one polyline per
// series, the legend in a column on the right (if `legend`). y0, y1 fix the
// y range (NAN: fit the data).
static void svg_plot(std::string& o, double x, double y, double w, double h, const std::string& title,
                     const std::string& xlabel, const std::vector<Series>& ss, bool legend = true, double y0 = NAN,
                     double y1 = NAN) {
    double xmin = INFINITY, xmax = -INFINITY, ymin = INFINITY, ymax = -INFINITY;
    for (const auto& s : ss)
        for (auto [px, py] : s.pts)
            if (std::isfinite(py)) xmin = std::min(xmin, px), xmax = std::max(xmax, px), ymin = std::min(ymin, py), ymax = std::max(ymax, py);
    if (!(xmin <= xmax)) xmin = 0, xmax = 1, ymin = 0, ymax = 1;  // nothing to draw yet
    if (xmax == xmin) xmax = xmin + 1;
    if (!std::isnan(y0)) ymin = y0;
    if (!std::isnan(y1)) ymax = y1;
    if (ymax - ymin < 1e-9) ymin -= 0.5, ymax += 0.5;
    double pad = std::isnan(y0) ? 0.04 * (ymax - ymin) : 0;
    ymin -= pad, ymax += pad;
    const double legend_w = legend ? 150 : 20, px0 = x + 52, px1 = x + w - legend_w, py0 = y + 24, py1 = y + h - 34;
    auto X = [&](double v) { return px0 + (v - xmin) / (xmax - xmin) * (px1 - px0); };
    auto Y = [&](double v) { return py1 - (v - ymin) / (ymax - ymin) * (py1 - py0); };
    svg_text(o, x + 4, y + 15, title, "font-weight=\"bold\"");
    o += "<rect x=\"" + fmt("%.1f", px0) + "\" y=\"" + fmt("%.1f", py0) + "\" width=\"" + fmt("%.1f", px1 - px0) +
         "\" height=\"" + fmt("%.1f", py1 - py0) + "\" fill=\"none\" stroke=\"#888\"/>\n";
    bool x_whole = true;  // steps: ticked 50, 51, never 50.1
    for (const auto& s : ss)
        for (auto pt : s.pts) x_whole = x_whole && pt.first == std::floor(pt.first);
    for (int axis = 0; axis < 2; axis++) {  // gridlines and tick labels: x, then y
        double lo = axis ? ymin : xmin, hi = axis ? ymax : xmax;
        double st = nice_step(hi - lo, axis ? (py1 - py0) / 40 : (px1 - px0) / 70);
        if (axis == 0 && x_whole) st = std::max(st, 1.0);
        for (double v = std::ceil(lo / st) * st; v <= hi + 1e-9 * st; v += st) {
            std::string label = fmt(st >= 1 ? "%.0f" : st >= 0.1 ? "%.1f" : st >= 0.01 ? "%.2f" : "%.3f", v);
            if (axis == 0) {
                o += "<line x1=\"" + fmt("%.1f", X(v)) + "\" x2=\"" + fmt("%.1f", X(v)) + "\" y1=\"" + fmt("%.1f", py0) +
                     "\" y2=\"" + fmt("%.1f", py1) + "\" stroke=\"#eee\"/>\n";
                svg_text(o, X(v), py1 + 14, label, "text-anchor=\"middle\"");
            } else {
                o += "<line x1=\"" + fmt("%.1f", px0) + "\" x2=\"" + fmt("%.1f", px1) + "\" y1=\"" + fmt("%.1f", Y(v)) +
                     "\" y2=\"" + fmt("%.1f", Y(v)) + "\" stroke=\"#eee\"/>\n";
                svg_text(o, px0 - 4, Y(v) + 4, label, "text-anchor=\"end\"");
            }
        }
    }
    svg_text(o, (px0 + px1) / 2, py1 + 28, xlabel, "text-anchor=\"middle\" fill=\"#555\"");
    for (size_t i = 0; i < ss.size(); i++) {
        std::string pts;
        for (auto [px, py] : ss[i].pts)
            if (std::isfinite(py)) pts += fmt("%.1f", X(px)) + "," + fmt("%.1f", Y(std::clamp(py, ymin, ymax))) + " ";
        std::string dash = ss[i].dashed ? "\" stroke-dasharray=\"5,3" : "";
        o += "<polyline fill=\"none\" stroke-width=\"1.6\" stroke=\"" + ss[i].colour + dash + "\" points=\"" + pts + "\"/>\n";
        // A few points are marked as well: one point draws no line at all.
        if (ss[i].pts.size() <= 30)
            for (auto [px, py] : ss[i].pts)
                if (std::isfinite(py))
                    o += "<circle r=\"2.5\" fill=\"" + ss[i].colour + "\" cx=\"" + fmt("%.1f", X(px)) + "\" cy=\"" +
                         fmt("%.1f", Y(std::clamp(py, ymin, ymax))) + "\"/>\n";
        if (!legend) continue;
        double ly = py0 + 8 + 16 * (double)i;
        o += "<line x1=\"" + fmt("%.1f", px1 + 10) + "\" x2=\"" + fmt("%.1f", px1 + 30) + "\" y1=\"" + fmt("%.1f", ly) +
             "\" y2=\"" + fmt("%.1f", ly) + "\" stroke-width=\"2\" stroke=\"" + ss[i].colour + dash + "\"/>\n";
        svg_text(o, px1 + 34, ly + 4, ss[i].name.size() > 18 ? ss[i].name.substr(0, 17) + "~" : ss[i].name);
    }
}

// A heatmap at (x, y): a row per name, a column per name, each cell shaded
// from white (lo) to dark blue (hi) and labelled with its value. Returns the
// height used.
static double svg_heatmap(std::string& o, double x, double y, double label_w, double cell_w, const std::string& title,
                          const std::vector<std::string>& rows, const std::vector<std::string>& cols,
                          const std::vector<std::vector<double>>& v, double lo, double hi, const char* format) {
    const double cell_h = 20;
    svg_text(o, x, y + 14, title, "font-weight=\"bold\"");
    for (size_t c = 0; c < cols.size(); c++)
        svg_text(o, x + label_w + (c + 0.5) * cell_w, y + 32, cols[c], "text-anchor=\"middle\" fill=\"#555\"");
    for (size_t r = 0; r < rows.size(); r++) {
        double ry = y + 38 + r * cell_h;
        svg_text(o, x + label_w - 6, ry + 14, rows[r], "text-anchor=\"end\"");
        for (size_t c = 0; c < cols.size(); c++) {
            double t = std::isfinite(v[r][c]) ? std::clamp((v[r][c] - lo) / (hi - lo > 0 ? hi - lo : 1), 0.0, 1.0) : 0;
            char fill[16];
            std::snprintf(fill, sizeof fill, "#%02x%02x%02x", (int)(255 - t * 222), (int)(255 - t * 175), (int)(255 - t * 95));
            double cx = x + label_w + c * cell_w;
            o += "<rect x=\"" + fmt("%.1f", cx) + "\" y=\"" + fmt("%.1f", ry) + "\" width=\"" + fmt("%.1f", cell_w - 1) +
                 "\" height=\"" + fmt("%.1f", cell_h - 1) + "\" fill=\"" + fill + "\"/>\n";
            svg_text(o, cx + cell_w / 2, ry + 14, std::isfinite(v[r][c]) ? fmt(format, v[r][c]) : "-",
                     t > 0.55 ? "text-anchor=\"middle\" fill=\"white\"" : "text-anchor=\"middle\"");
        }
    }
    return 38 + rows.size() * cell_h + 12;
}
// The opening of an SVG document of w x h pixels, with a white background
// (a transparent one reads badly in a dark-themed viewer).
static std::string svg_begin(double w, double h) {
    return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"" + fmt("%.0f", w) + "\" height=\"" + fmt("%.0f", h) +
           "\" viewBox=\"0 0 " + fmt("%.0f", w) + " " + fmt("%.0f", h) +
           "\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n";
}

// --- the training report. Every evaluation adds a row to the history: the
// losses and the expert load. The history is kept in DIR/log.tsv (so that
// --resume continues it) and drawn, with the routing of the latest
// evaluation, in DIR/report.svg.
// log.tsv is the plain-text twin of the report: one row per evaluation,
// tab-separated, with a header naming every column, so that a spreadsheet,
// pandas or gnuplot can read it without moe.cpp.
struct LogRow {
    int64_t step = 0;
    double train = NAN, test = NAN;
    std::vector<double> val;   // the loss on each --val file
    std::vector<double> load;  // [N_LAYER * E] on the test split
    double lr = NAN;           // the learning rate of the step
    double experts = NAN;      // top-p: experts per token on the test split (a column only then)
};
static std::string log_tsv(const std::vector<LogRow>& hist, const std::vector<std::string>& val_names) {
    std::string s = "step\ttrain\ttest\tlr";
    for (const auto& v : val_names) s += "\tval:" + v;
    for (int l = 0; l < N_LAYER; l++)
        for (int e = 0; e < E; e++) s += "\tload:L" + std::to_string(l) + "e" + std::to_string(e);
    if (TOP_P > 0) s += "\texperts_per_token";
    s += "\n";
    for (const auto& r : hist) {
        s += std::to_string(r.step) + fmt("\t%.6f", r.train) + fmt("\t%.6f", r.test) + fmt("\t%.6e", r.lr);
        for (double v : r.val) s += fmt("\t%.6f", v);
        for (double v : r.load) s += fmt("\t%.5f", v);
        if (TOP_P > 0) s += fmt("\t%.4f", r.experts);
        s += "\n";
    }
    return s;
}
// The rows of a log written by log_tsv with the same columns, up to step
// up_to (a resumed run repeats the steps after its checkpoint). Empty if the
// file is missing or not such a log.
[[maybe_unused]] static std::vector<LogRow> read_log(const std::string& path, const std::vector<std::string>& val_names, int64_t up_to) {
    std::vector<LogRow> hist;
    std::string raw;
    try {
        raw = read_file(path);
    } catch (const std::runtime_error&) {
        return hist;
    }
    std::vector<Line> lines = split_lines(raw);
    if (lines.empty() || lines[0].text + "\n" != log_tsv({}, val_names)) return hist;
    for (size_t i = 1; i < lines.size(); i++) {
        std::vector<double> f;
        const char* p = lines[i].text.c_str();
        for (char* end;; p = end + (*end == '\t')) {
            f.push_back(std::strtod(p, &end));
            if (end == p || (*end != '\t' && *end)) return {};
            if (!*end) break;
        }
        const size_t n_load = (size_t)N_LAYER * E;
        if (f.size() != 4 + val_names.size() + n_load + (TOP_P > 0)) return {};
        // the step must be a whole number in range: converting anything else to an integer is undefined
        if (!(f[0] >= 0 && f[0] <= 1e12 && f[0] == std::floor(f[0]))) return {};
        LogRow r;
        r.step = (int64_t)f[0], r.train = f[1], r.test = f[2], r.lr = f[3];
        r.val.assign(f.begin() + 4, f.begin() + 4 + val_names.size());
        r.load.assign(f.begin() + 4 + val_names.size(), f.begin() + 4 + val_names.size() + n_load);
        if (TOP_P > 0) r.experts = f.back();
        if (r.step <= up_to) hist.push_back(r);
    }
    return hist;
}

// Shares of first choices [row][e] for one layer, from counts [N_LAYER * E].
static std::vector<double> shares(const std::vector<double>& counts, int l) {
    std::vector<double> v(counts.begin() + (size_t)l * E, counts.begin() + (size_t)(l + 1) * E);
    double n = std::accumulate(v.begin(), v.end(), 0.0);
    for (double& x : v) x = n > 0 ? x / n : NAN;
    return v;
}

// report.svg: the loss curves, the expert load of each layer over training,
// and per layer the routing heatmaps (by --val file, and by byte class).
// The probe's routing at each evaluation of a run, and from it each
// layer's saturation against the latest (routing dynamics, above).
struct Settling {
    std::vector<int64_t> steps;
    std::vector<std::vector<int16_t>> picks;  // [evaluation] Routing::picks
};
static std::vector<Series> saturation_series(const Settling& s) {
    std::vector<Series> out;
    for (int l = 0; l < N_LAYER; l++) {
        out.push_back({"layer " + std::to_string(l), PALETTE[l % 20], l >= 20, {}});
        for (size_t i = 0; i < s.steps.size(); i++)
            out.back().pts.push_back({(double)s.steps[i], saturation(s.picks[i], s.picks.back(), l)});
    }
    return out;
}
// The first step from which a layer's saturation stays at 0.9 or above, or -1.
static int64_t settled_at(const Settling& s, int l) {
    int64_t at = -1;
    for (size_t i = 0; i < s.steps.size(); i++) {
        const bool high = saturation(s.picks[i], s.picks.back(), l) >= 0.9;
        at = high ? (at < 0 ? s.steps[i] : at) : -1;
    }
    return at;
}
// The end-of-run summary of the routing dynamics.
[[maybe_unused]] static void print_dynamics(const Settling& s, const Routing& last) {
    if (s.steps.empty() || last.read.empty()) return;
    std::printf("routing dynamics, on the first %zu test tokens at each of this run's %zu evaluations:\n", last.read.size(),
                s.steps.size());
    std::printf("  layer  saturation >= 0.9 from step   vocabulary specialisation: by byte read  by byte to predict\n");
    for (int l = 0; l < N_LAYER; l++) {
        const int64_t at = settled_at(s, l);
        const std::string when = at < 0 || (at == s.steps.back() && s.steps.size() > 1) ? "only at the end" : std::to_string(at);
        std::printf("  %-5d  %-27s  %40.3f  %18.3f\n", l, when.c_str(),
                    vocab_specialisation(last.picks, last.read, l), vocab_specialisation(last.picks, last.next, l));
    }
    if (K < 2) return;
    std::printf("co-activation at the last evaluation: P(expert b chosen | expert a chosen), row a, column b\n");
    for (int l = 0; l < N_LAYER; l++) {
        const std::vector<double> c = coactivation(last.picks, l);
        std::printf("  layer %d", l);
        for (int b = 0; b < E; b++) std::printf("     e%-2d", b);
        std::printf("\n");
        for (int a = 0; a < E; a++) {
            std::printf("    e%-4d", a);
            for (int b = 0; b < E; b++) std::printf(a == b ? "       -" : "   %.3f", c[(size_t)a * E + b]);
            std::printf("\n");
        }
    }
}
[[maybe_unused]] static std::string training_svg(const std::string& title, const std::vector<LogRow>& hist,
                                const std::vector<std::string>& val_names, const std::vector<std::vector<double>>& by_file,
                                const Routing& rt, const Settling& settle = {}) {
    const double W = 980;
    const int ncol = std::min(N_LAYER, 4), nrow = (N_LAYER + ncol - 1) / ncol;
    size_t longest = 11;  // "punct/space"
    for (const auto& v : val_names) longest = std::max(longest, v.size());
    const double label_w = 12 + 7 * (double)longest, cell_w = 36, heat_w = label_w + E * cell_w + 20;
    const int hcol = std::max(1, std::min(N_LAYER, (int)(W / heat_w)));
    std::vector<std::string> cols;
    for (int e = 0; e < E; e++) cols.push_back("e" + std::to_string(e));
    std::vector<std::string> class_rows;
    for (int c = 0; c < N_CLASS; c++) {
        double n = 0;
        for (int e = 0; e < E; e++) n += rt.by_class[(size_t)c * E + e];  // layer 0: every layer sees the same tokens
        if (n > 0) class_rows.push_back(CLASS_NAMES[c]);
    }
    const double heat_h = (val_names.empty() ? 0 : 38 + 20 * val_names.size() + 12) + 38 + 20 * class_rows.size() + 12;
    const double H0 = 40 + 320 + 14 * ((E - 1) / 12) + nrow * 190 + 30 + ((N_LAYER + hcol - 1) / hcol) * heat_h + 10;
    const bool settling = E > 1 && !settle.steps.empty();
    const double H = H0 + (settling ? 230 : 0);
    std::string o = svg_begin(W, H);
    // the title on lines of at most ~140 characters, broken at " | "
    std::vector<std::string> tl = {""};
    for (size_t a = 0, b; a < title.size(); a = b + 3) {
        b = std::min(title.find(" | ", a), title.size());
        std::string part = title.substr(a, b - a);
        if (!tl.back().empty() && tl.back().size() + part.size() > 140) tl.push_back("");
        tl.back() += (tl.back().empty() ? "" : " | ") + part;
    }
    for (size_t i = 0; i < tl.size() && i < 2; i++) svg_text(o, 10, 20 + 16 * (double)i, tl[i], "font-weight=\"bold\"");
    std::vector<Series> loss = {{"train", PALETTE[0], false, {}}, {"test", PALETTE[1], false, {}}};
    for (size_t v = 0; v < val_names.size(); v++) loss.push_back({val_names[v], PALETTE[(2 + v) % 20], true, {}});
    for (const auto& r : hist) {
        loss[0].pts.push_back({(double)r.step, r.train}), loss[1].pts.push_back({(double)r.step, r.test});
        for (size_t v = 0; v < r.val.size() && v < val_names.size(); v++) loss[2 + v].pts.push_back({(double)r.step, r.val[v]});
    }
    svg_plot(o, 0, 40, W, 300, "loss (nats per token)", "step", loss);
    for (int l = 0; l < N_LAYER; l++) {
        std::vector<Series> load;
        for (int e = 0; e < E; e++) {
            load.push_back({"expert " + std::to_string(e), PALETTE[e % 20], e >= 20, {}});
            for (const auto& r : hist) load.back().pts.push_back({(double)r.step, r.load[(size_t)l * E + e]});
        }
        double w = W / ncol;
        svg_plot(o, (l % ncol) * w, 360 + 14 * ((E - 1) / 12) + (l / ncol) * 190, w, 190, "layer " + std::to_string(l) + ": expert load",
                 "step", load, false, 0, 1);
    }
    // one legend for all the load panels, in a row above them
    for (int e = 0; e < E; e++) {
        double lx = 10 + 80 * (e % 12), ly = 350 + 14 * (e / 12);
        o += "<rect x=\"" + fmt("%.0f", lx) + "\" y=\"" + fmt("%.0f", ly - 9) + "\" width=\"14\" height=\"10\" fill=\"" +
             PALETTE[e % 20] + "\"/>\n";
        svg_text(o, lx + 18, ly, "expert " + std::to_string(e));
    }
    double y0 = 360 + 14 * ((E - 1) / 12) + nrow * 190 + 10;
    svg_text(o, 10, y0 + 14, "routing on the last evaluation: share of each row's tokens whose first choice is expert e",
             "font-weight=\"bold\"");
    for (int l = 0; l < N_LAYER; l++) {
        double x = (l % hcol) * heat_w, y = y0 + 20 + (l / hcol) * heat_h;
        if (!val_names.empty()) {
            std::vector<std::vector<double>> v;
            for (const auto& f : by_file) v.push_back(shares(f, l));
            y += svg_heatmap(o, x, y, label_w, cell_w, "layer " + std::to_string(l) + ", by file", val_names, cols, v, 0, 1, "%.2f");
        }
        std::vector<std::vector<double>> v;
        for (int c = 0; c < N_CLASS; c++) {
            std::vector<double> counts(rt.by_class.begin() + ((size_t)l * N_CLASS + c) * E,
                                       rt.by_class.begin() + ((size_t)l * N_CLASS + c + 1) * E);
            if (std::accumulate(counts.begin(), counts.end(), 0.0) > 0) v.push_back(shares(counts, 0));
        }
        svg_heatmap(o, x, y, label_w, cell_w, "layer " + std::to_string(l) + ", by byte read", class_rows, cols, v, 0, 1, "%.2f");
    }
    if (settling)
        svg_plot(o, 0, H0, W, 220, "router saturation: the share of each test token's top-K that is already its top-K at step " +
                 std::to_string(settle.steps.back()), "step", saturation_series(settle), true, 0, 1);
    return o + "</svg>\n";
}

// ----------------------------------------------------------------------------
// 12. Command line and main

// Everything a run can be told on the command line, with the defaults.
// The command line selects one of four modes: train (the default), sample
// (--sample-only, --prompt), evaluate (--eval, --arith) and route (--route).
// Each flag is checked as it is parsed, and the combinations that make no
// sense are refused at the end of parse_args, so that no mode starts on a
// mistake and fails an hour later.
struct Options {
    std::string input = "names.txt", work_dir = "out", checkpoint, prompt;
    int64_t max_steps = 5000, seed = 3407;
    int batch_size = 32, eval_interval = 500, log_interval = 100;
    double learning_rate = 5e-4, weight_decay = 0.01, aux_coef = AUX_COEF;
    // nanoGPT's training recipe, all off by default (section 8 and the training loop)
    bool cosine = false, decay_2d = false;  // --lr-schedule cosine; --decay 2d
    int64_t warmup_steps = 0, lr_decay_steps = 0;  // 0: decay until --max-steps
    double min_lr = -1, grad_clip = 0, dropout = 0;  // min_lr < 0: learning_rate / 10
    bool overwrite = false;  // a fresh run may replace the trained model in its work dir
    bool have_input = false, new_data = false;  // -i was given; --resume may continue on other data
    bool resume = false, sample_only = false, text = false, have_prompt = false;
    double temperature = 1.0;
    int top_k = 0, num_samples = 20, max_new_tokens = 500;
    bool have_num_samples = false;
    int threads = (int)std::max(1u, std::thread::hardware_concurrency());
    std::vector<std::string> eval_files, val_files;
    std::string arith_file, route;
    bool have_route = false, gates = false;
    std::string ablate;                   // --ablate L:E,...: as given, for messages
    std::vector<uint8_t> ablated;         // [N_LAYER * E], or empty: see Model::ablated
    std::vector<std::string> knockout_files;
};

static std::string config_string();  // the compiled model, in one line (below)

// The usage text is the reference for every flag (--help prints it with the
// build's constants), grouped as a run is: what training reads and writes,
// its recipe, then the modes that use a trained model.
static const char* USAGE_TRAIN =
    "usage: ./moe [options]\n"
    "Training (what ./moe does by default):\n"
    "  -i, --input-file FILE   training data (default names.txt)\n"
    "  -o, --work-dir DIR      checkpoints go here (default out)\n"
    "  --max-steps N           train up to step N, counted from the start, also with --resume (default 5000)\n"
    "  --seed N                seed for init, test split, batches and sampling (default 3407)\n"
    "  --batch-size N          examples per step (default 32)\n"
    "  --learning-rate X       AdamW learning rate (default 5e-4)\n"
    "  --weight-decay X        AdamW decoupled weight decay (default 0.01)\n"
    "  --decay all|2d          which parameters decay: all (default, as makemore) or only the 2-D ones,\n"
    "                          matrices and embeddings, not biases or layernorm weights (as nanoGPT)\n"
    "  --lr-schedule S         constant (default) or cosine: from the rate down to --min-lr at\n"
    "                          --lr-decay-steps, as nanoGPT\n"
    "  --warmup-steps N        rise linearly from 0 to the rate over the first N steps (default 0)\n"
    "  --min-lr X              the floor of the cosine (default: a tenth of the rate)\n"
    "  --lr-decay-steps N      the step where the cosine reaches --min-lr (default: --max-steps)\n"
    "  --grad-clip X           scale the gradient down to global norm X when it is larger (default 0: off)\n"
    "  --dropout P             zero a fraction P of the attention weights, the embeddings and each\n"
    "                          block's two outputs while training, as nanoGPT (default 0)\n"
    "  --aux-coef X            weight of the load-balancing loss (default 0.01)\n"
    "  --eval-interval N       steps between evaluations and checkpoints (default 500)\n"
    "  --log-interval N        steps between progress lines (default 100)\n"
    "  --text                  text mode: the file is one byte stream (default: one example per line)\n"
    "  --val FILE...           also evaluate these files (e.g. one per domain) at every evaluation; their\n"
    "                          losses go in the log and DIR/report.svg, their routing in the final tables\n"
    "  --resume                continue from DIR/last.safetensors (or --checkpoint)\n"
    "  --overwrite             let a fresh run replace the trained model its work dir holds\n"
    "  --new-data              with --resume: continue on another -i than the run was trained on\n";
static const char* USAGE_USE =
    "Sampling and evaluation:\n"
    "  --sample-only           sample from DIR/model.safetensors (or --checkpoint), no training\n"
    "  --checkpoint FILE       the checkpoint to load instead of the work dir's\n"
    "  --num-samples N         samples to print (default 20)\n"
    "  --temperature X         sampling temperature; 0 picks the most likely token (default 1)\n"
    "  --top-k N               sample only from the N most likely tokens (default 0: all)\n"
    "  --prompt TEXT           continue TEXT, printing tokens as they are made\n"
    "  --max-new-tokens N      tokens to generate in text mode or after a prompt (default 500)\n"
    "  --eval FILE...          print 'eval FILE loss X tokens N' for each file, X in nats per token,\n"
    "                          its expert load, and tables of where each file's tokens were routed\n"
    "  --arith FILE            arithmetic accuracy: complete the prompts 'a+b=' of FILE greedily, and\n"
    "                          check 1000 free samples that look like sums\n"
    "  --route TEXT            show which expert each byte of TEXT goes to, layer by layer ('-': each\n"
    "                          line of standard input)\n"
    "  --gates                 with --route: also every chosen expert and its gate weight\n"
    "  --ablate L:E[,L:E...]   with the modes above: remove expert E of layer L (from 0) from the routing;\n"
    "                          each token takes its next best experts instead\n"
    "  --knockout FILE...      each file's loss with each expert removed in turn (and the arithmetic\n"
    "                          accuracy, with --arith), a heatmap beside the checkpoint, and the loss\n"
    "                          when each token's r best experts are removed (the redundancy curve)\n"
    "Other:\n"
    "  --threads N             worker threads (default: all cores); results do not depend on it\n"
    "  -h, --help              this text\n";
// The inference-only build (MOE_INFERENCE_ONLY) has no training: its usage
// is the second half, and a training flag is an error, not a flag ignored.
static const char* USAGE_INFER =
    "usage: ./moe_infer [options]   (the inference-only build: it samples and evaluates a trained model)\n"
    "  -i, --input-file FILE   the training data, to tell memorised samples from new ones (default: the\n"
    "                          checkpoint's own data file)\n"
    "  -o, --work-dir DIR      the model is DIR/model.safetensors (default out)\n"
    "  --seed N                seed for sampling (default 3407)\n"
    "  --text                  the model was trained in text mode\n";
static bool is_training_flag(const std::string& a) {
    static const char* const flags[] = {"--max-steps", "--batch-size", "--learning-rate", "--weight-decay", "--decay",
                                        "--lr-schedule", "--warmup-steps", "--min-lr", "--lr-decay-steps", "--grad-clip",
                                        "--dropout", "--aux-coef", "--eval-interval", "--log-interval", "--val",
                                        "--resume", "--overwrite", "--new-data"};
    for (const char* f : flags)
        if (a == f) return true;
    return false;
}

// A mistake on the command line: main prints the usage with it, exit code 2.
struct UsageError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Numbers from the command line: the whole argument must parse and lie in
// range, or the user hears which flag and what it accepts.
// (strtoll and strtod report an empty argument, trailing junk and overflow
// through end and errno; each is a usage error here, never a silent 0.)
static int64_t parse_int(const std::string& flag, const char* v, int64_t lo, int64_t hi) {
    char* end = nullptr;
    errno = 0;
    long long x = std::strtoll(v, &end, 10);
    if (!*v || *end || errno || x < lo || x > hi)
        throw UsageError(flag + " needs an integer from " + std::to_string(lo) + " to " + std::to_string(hi) +
                         ", got '" + v + "'");
    return x;
}
static double parse_real(const std::string& flag, const char* v, double lo, double hi) {
    char* end = nullptr;
    errno = 0;
    double x = std::strtod(v, &end);
    if (!*v || *end || errno || !std::isfinite(x) || x < lo || x > hi)
        throw UsageError(flag + " needs a number from " + fmt("%g", lo) + " to " + fmt("%g", hi) +
                         ", got '" + v + "'");
    return x;
}

static void check_options(Options& o);  // below

// --ablate "1:2,3:0": the experts to remove, as a mask over (layer, expert).
// Every layer must keep at least K experts to choose from.
static std::vector<uint8_t> parse_ablate(const std::string& spec) {
    std::vector<uint8_t> off((size_t)N_LAYER * E, 0);
    for (size_t at = 0; at <= spec.size();) {
        size_t end = std::min(spec.find(',', at), spec.size());
        const std::string item = spec.substr(at, end - at);
        const size_t colon = item.find(':');
        if (colon == std::string::npos)
            throw UsageError("--ablate takes LAYER:EXPERT pairs separated by commas (e.g. 1:2,3:0), got '" + item + "'");
        const int l = (int)parse_int("--ablate's layer", item.substr(0, colon).c_str(), 0, N_LAYER - 1);
        const int e = (int)parse_int("--ablate's expert", item.substr(colon + 1).c_str(), 0, E - 1);
        off[(size_t)l * E + e] = 1;
        at = end + 1;
    }
    for (int l = 0; l < N_LAYER; l++) {
        const int left = E - (int)std::count(off.begin() + (size_t)l * E, off.begin() + (size_t)(l + 1) * E, 1);
        if (left < K)
            throw UsageError("--ablate " + spec + " leaves layer " + std::to_string(l) + " " + std::to_string(left) +
                             " expert(s), and each token takes K = " + std::to_string(K) + ": remove fewer");
    }
    return off;
}

// One pass over argv. A flag that takes a value reads it with val(), which
// turns a missing value into a usage error; numbers go through parse_int
// and parse_real, which name the flag and its range.
[[maybe_unused]] static Options parse_args(int argc, char** argv) {
    Options o;
    // val() takes the flag's argument, so "--seed" at the end is an error, not a crash.
    for (int i = 1; i < argc; i++) {  // flags in any order; the last of a repeated flag wins
        std::string a = argv[i];
        auto val = [&]() -> const char* {
            if (i + 1 >= argc) throw UsageError(a + " needs a value");
            return argv[++i];
        };
        if (INFERENCE_ONLY && is_training_flag(a))
            throw UsageError(a + " is a training flag, and this is the inference-only build (MOE_INFERENCE_ONLY): it "
                                 "cannot train. Use ./moe, or rebuild without -DMOE_INFERENCE_ONLY");
        if (a == "-h" || a == "--help") {
            if (INFERENCE_ONLY) std::printf("%s%s", USAGE_INFER, USAGE_USE);
            else std::printf("%s%s", USAGE_TRAIN, USAGE_USE);
            std::printf("\nThis build (compile-time constants, section 1): %s\n", config_string().c_str());
            std::exit(0);
        } else if (a == "-i" || a == "--input-file") o.input = val(), o.have_input = true;
        else if (a == "--new-data") o.new_data = true;
        else if (a == "-o" || a == "--work-dir") o.work_dir = val();
        else if (a == "--checkpoint") o.checkpoint = val();
        else if (a == "--max-steps") o.max_steps = parse_int(a, val(), 1, 1000000000);
        else if (a == "--seed") o.seed = parse_int(a, val(), 0, INT64_MAX);
        else if (a == "--batch-size") o.batch_size = (int)parse_int(a, val(), 1, 4096);
        else if (a == "--learning-rate") o.learning_rate = parse_real(a, val(), 0, 10);
        else if (a == "--weight-decay") o.weight_decay = parse_real(a, val(), 0, 10);
        else if (a == "--decay") {
            std::string v = val();
            if (v != "all" && v != "2d") throw UsageError("--decay takes all or 2d, got '" + v + "'");
            o.decay_2d = v == "2d";
        } else if (a == "--lr-schedule") {
            std::string v = val();
            if (v != "constant" && v != "cosine") throw UsageError("--lr-schedule takes constant or cosine, got '" + v + "'");
            o.cosine = v == "cosine";
        } else if (a == "--warmup-steps") o.warmup_steps = parse_int(a, val(), 0, 1000000000);
        else if (a == "--min-lr") o.min_lr = parse_real(a, val(), 0, 10);
        else if (a == "--lr-decay-steps") o.lr_decay_steps = parse_int(a, val(), 1, 1000000000);
        else if (a == "--grad-clip") o.grad_clip = parse_real(a, val(), 0, 1e9);
        else if (a == "--dropout") {
            o.dropout = parse_real(a, val(), 0, 1);
            if (o.dropout >= 1) throw UsageError("--dropout needs a probability below 1 (1 would drop everything), got '" +
                                                 std::string(argv[i]) + "'");
        }
        else if (a == "--aux-coef") o.aux_coef = parse_real(a, val(), 0, 100);
        else if (a == "--eval-interval") o.eval_interval = (int)parse_int(a, val(), 1, 1000000000);
        else if (a == "--log-interval") o.log_interval = (int)parse_int(a, val(), 1, 1000000000);
        else if (a == "--resume") o.resume = true;
        else if (a == "--overwrite") o.overwrite = true;
        else if (a == "--sample-only") o.sample_only = true;
        else if (a == "--text") o.text = true;
        else if (a == "--temperature") o.temperature = parse_real(a, val(), 0, 100);
        else if (a == "--top-k") o.top_k = (int)parse_int(a, val(), 0, MAX_VOCAB);
        else if (a == "--num-samples") o.num_samples = (int)parse_int(a, val(), 0, 1000000), o.have_num_samples = true;
        else if (a == "--prompt") o.prompt = val(), o.have_prompt = true;
        else if (a == "--max-new-tokens") o.max_new_tokens = (int)parse_int(a, val(), 0, 100000000);
        else if (a == "--threads") o.threads = (int)parse_int(a, val(), 1, 256);
        else if (a == "--arith") o.arith_file = val();
        else if (a == "--route") o.route = val(), o.have_route = true;
        else if (a == "--gates") o.gates = true;
        else if (a == "--ablate") o.ablate = val(), o.ablated = parse_ablate(o.ablate);
        else if (a == "--eval" || a == "--val" || a == "--knockout") {  // every following argument up to the next flag
            auto& files = a == "--eval" ? o.eval_files : a == "--val" ? o.val_files : o.knockout_files;
            while (i + 1 < argc && argv[i + 1][0] != '-') files.push_back(argv[++i]);
            if (files.empty()) throw UsageError(a + " needs at least one file");
        } else throw UsageError("unknown option '" + a + "'");
    }
    check_options(o);
    return o;
}

// The flags together: combinations that make no sense, and a schedule that
// does not fit the run, are refused before anything is loaded. Fills in the
// defaults that depend on other flags (--min-lr, --lr-decay-steps).
static void check_options(Options& o) {
    if (o.have_route && (!o.eval_files.empty() || !o.arith_file.empty()))
        throw UsageError("--route explores one text; run --eval and --arith separately");
    if (o.gates && !o.have_route) throw UsageError("--gates goes with --route TEXT");
    // A flag that the chosen mode would ignore is a mistake, said at once.
    const char* use = o.have_route ? "--route" : !o.knockout_files.empty() ? "--knockout" : !o.eval_files.empty() ? "--eval"
                      : !o.arith_file.empty() ? "--arith" : o.have_prompt ? "--prompt" : o.sample_only ? "--sample-only" : nullptr;
    if (o.resume && use)
        throw UsageError(std::string("--resume trains, and ") + use + " uses a trained model: run them one after the other");
    if (!o.ablated.empty() && !use && !INFERENCE_ONLY)
        throw UsageError("--ablate changes a trained model's routing: it goes with --eval, --arith, --route, --prompt or "
                         "--sample-only, not with training");
    if (!o.knockout_files.empty() && (o.have_route || !o.eval_files.empty() || o.have_prompt || o.sample_only))
        throw UsageError("--knockout is a mode of its own (with --arith if you like): run the others separately");
    if (!o.knockout_files.empty() && !o.ablated.empty())
        throw UsageError("--knockout removes each expert in turn from the whole model: run it without --ablate");
    if (o.have_prompt && o.have_num_samples)
        throw UsageError("--prompt makes one continuation; --num-samples is for --sample-only without a prompt");
    // The schedule must fit the run: checked here, before anything is loaded.
    if (o.min_lr < 0) o.min_lr = o.learning_rate / 10;
    if (o.lr_decay_steps == 0) o.lr_decay_steps = o.max_steps;
    if (o.min_lr > o.learning_rate)
        throw UsageError("--min-lr " + fmt("%g", o.min_lr) + " is above the learning rate " + fmt("%g", o.learning_rate) +
                         ": the cosine falls from the rate to the floor, so give a smaller --min-lr");
    if (o.warmup_steps > o.max_steps)
        throw UsageError("--warmup-steps " + std::to_string(o.warmup_steps) + " is more than --max-steps " +
                         std::to_string(o.max_steps) + ": the run would end before the rate is reached");
    if (o.cosine && o.warmup_steps >= o.lr_decay_steps)
        throw UsageError("--warmup-steps " + std::to_string(o.warmup_steps) + " leaves no steps for the cosine, which ends at " +
                         "step " + std::to_string(o.lr_decay_steps) + " (--lr-decay-steps, or --max-steps): warm up for fewer steps");
}

[[maybe_unused]] // One line describing the compiled model, for logs and tests.
// It goes at the top of every run's output, into the report's title and
// into --help, so that a figure can always be traced to the build that made it.
static std::string config_string() {
    char buf[512];
    std::snprintf(buf, sizeof buf,
                  "layers %d, heads %d, n_embd %d, experts %d, top-k %d (%s), expert width %d, block %d, %s | "
                  "noisy gate %s, capacity factor %s, z-loss %s, shared experts %d",
                  N_LAYER, N_HEAD, C, E, K, NORM_TOPK ? "gates renormalised" : "gate = router probability", F,
                  BLOCK_SIZE, MOE_DOUBLE ? "double" : "float32", NOISY_GATE ? "on" : "off",
                  CAPACITY_FACTOR > 0 ? fmt("%g", CAPACITY_FACTOR).c_str() : "off",
                  Z_COEF > 0 ? fmt("%g", Z_COEF).c_str() : "off", NS);
    std::string s = buf;
    if (BIAS_RATE > 0) s += fmt(", bias balancing rate %g", BIAS_RATE);
    if (SIGMOID_GATE) s += ", sigmoid gates";
    if (TOP_P > 0) s += fmt(", top-p %g", TOP_P) + fmt(" (at most top-k; entropy loss %g)", ENTROPY_COEF);
    else if (ENTROPY_COEF > 0) s += fmt(", entropy loss %g", ENTROPY_COEF);
    if (AUX_SCOPE == Scope::seq) s += ", aux loss per sequence";
    return s;
}

#if !MOE_INFERENCE_ONLY
// Ctrl-C (SIGINT), SIGTERM or SIGHUP: the handler only records it; the training loop
// finishes its step, saves a checkpoint to resume from, and exits with
// 128 + the signal number. A second signal exits at once: the checkpoint on
// disk is still whole, since checkpoints are only ever renamed into place.
static volatile std::sig_atomic_t g_signal = 0;
extern "C" void on_signal(int sig) {
    if (g_signal) std::_Exit(128 + sig);
    g_signal = sig;
}

// Are all n values finite (no NaN, no infinity)?
static bool all_finite(const real* p, size_t n) {
    if constexpr (FAST) if (fast::on) return fast::all_finite(p, n);
    for (size_t i = 0; i < n; i++)
        if (!std::isfinite(p[i])) return false;
    return true;
}
// The first parameter tensor whose gradient holds a NaN or an infinity, or
// null. Checked every step, so a run that blows up stops before a bad update
// reaches the weights (and the checkpoints).
static const TensorInfo* bad_gradient(const Model& m) {
    for (const auto& t : m.tensors)
        if (!all_finite(m.grads.data() + t.offset, t.size)) return &t;
    return nullptr;
}

// The metadata every checkpoint carries: the shape (checked on load), the
// data mode and vocabulary (needed to use the model), and where training was.
// %.17g prints a double that reads back exactly.
static Meta model_meta(const std::string& vocab, bool text, int context, int64_t step, int64_t seed, double best) {
    char b[64];
    std::snprintf(b, sizeof b, "%.17g", best);
    Meta meta = {{"format", "moe.cpp"},
                 {"n_layer", std::to_string(N_LAYER)},
                 {"n_head", std::to_string(N_HEAD)},
                 {"n_embd", std::to_string(C)},
                 {"n_experts", std::to_string(E)},
                 {"top_k", std::to_string(K)},
                 {"norm_topk", NORM_TOPK ? "1" : "0"},
                 {"ff", std::to_string(F)},
                 {"noisy_gate", NOISY_GATE ? "1" : "0"},
                 {"capacity_factor", fmt("%g", CAPACITY_FACTOR)},
                 {"z_coef", fmt("%g", Z_COEF)},
                 {"n_shared", std::to_string(NS)},
                 {"block_size", std::to_string(BLOCK_SIZE)},
                 {"mode", text ? "text" : "lines"},
                 {"context", std::to_string(context)},
                 {"vocab", hex_encode(vocab)},
                 {"step", std::to_string(step)},
                 {"seed", std::to_string(seed)},
                 {"best_test_loss", b}};
    // The variants added later are written only when on: absent means off,
    // as before they existed.
    if (BIAS_RATE > 0) meta["bias_rate"] = fmt("%g", BIAS_RATE);
    if (SIGMOID_GATE) meta["sigmoid_gate"] = "1";
    if (TOP_P > 0) meta["top_p"] = fmt("%g", TOP_P);
    if (ENTROPY_COEF > 0) meta["entropy_coef"] = fmt("%g", ENTROPY_COEF);
    if (AUX_SCOPE == Scope::seq) meta["aux_scope"] = "seq";
    return meta;
}

static std::vector<SaveTensor> model_tensors(const Model& m) {
    std::vector<SaveTensor> ts;
    for (const auto& t : m.tensors)
        ts.push_back({t.name, std::vector<int64_t>(t.shape.begin(), t.shape.end()), m.params.data() + t.offset});
    for (int l = 0; l < (int)m.score_bias.size() / E; l++)  // loss-free balancing's biases, named as DeepSeek-V3's
        ts.push_back({score_bias_name(l), {E}, &m.score_bias[(size_t)l * E]});
    return ts;
}

// --- a training run: everything it holds between steps, and the pieces of
// train() below (start, resume, evaluate and save, report).
// A training run keeps more state than the model: the data, the two
// generators, the step and the best loss, the files it writes, and the
// history it draws. Holding it in one struct lets each phase of a run be a
// function of its own (start, evaluate and save, report), with train() just
// the loop that calls them.
struct Training {
    Model m;
    Dataset d;
    int64_t seed = 0, step = 0;
    double best = INFINITY;            // the best test loss so far (model.safetensors has its weights)
    Rng rng{0}, noise{0}, drop{0};     // the batches; noisy gating's draws and dropout's masks, apart from them
    Schedule sched;                    // the learning rate of each step
    AdamW opt;
    double lr = 0;                     // the rate of the latest step
    std::string last, best_path, log_path, svg_path;  // the files in the work dir
    std::string input;                                // the data file (-i, or on --resume the run's own)
    std::vector<std::string> val_names;  // the --val files' stems, which name them in the log and report
    std::vector<LineFile> val;
    std::vector<LogRow> hist;                // every evaluation, for log.tsv and report.svg
    Routing rt_test;                         // the routing of the latest evaluation in this process
    std::vector<std::vector<double>> rt_val;  // ... and of each --val file
    Settling settle;                         // the probe's routing at each evaluation in this process
    bool evaluated = false;
};

// One training run per work dir: two at once would write the same files.
// An advisory lock on DIR/.lock, held until the process ends (the system
// drops it then, even after kill -9), and the owner's pid in the file for
// the message. Where there is no flock, nothing is locked.
static void lock_work_dir(const std::string& dir) {
#if defined(__unix__) || defined(__APPLE__)
    const std::string path = (std::filesystem::path(dir) / ".lock").string();
    const int fd = open(path.c_str(), O_RDWR | O_CREAT, 0644);
    if (fd < 0) fail("cannot write '" + path + "': " + std::strerror(errno) + "; check the permissions of the work dir (-o)");
    if (flock(fd, LOCK_EX | LOCK_NB) != 0) {
        char pid[32] = {};
        const ssize_t n = pread(fd, pid, sizeof pid - 1, 0);
        close(fd);
        fail("work dir '" + dir + "' is in use by process " + (n > 0 ? std::string(pid, (size_t)n) : std::string("?")) +
             ", another training run: wait for it to end, or train into another work dir with -o");
    }
    const std::string me = std::to_string((long long)getpid());
    if (ftruncate(fd, 0) != 0 || pwrite(fd, me.data(), me.size(), 0) != (ssize_t)me.size()) {
        // the lock holds all the same; only the message of a second run would lack the pid
    }
    // fd stays open: the lock lasts as long as this process
#else
    (void)dir;
#endif
}

// What a checkpoint file in the work dir holds: its step and best test loss
// (step -1 and the reason, when it is there but does not load).
// (A checkpoint that is there but does not load still counts: a fresh run
// must not replace it either, and the message says what is wrong with it.)
struct Held {
    bool exists = false;
    int64_t step = -1;
    double loss = NAN;
    std::string problem;
};
static Held held_model(const std::string& path) {
    Held h;
    std::error_code ec;
    if (!(h.exists = std::filesystem::exists(path, ec))) return h;
    try {
        const Checkpoint ck = read_safetensors(path);
        h.step = meta_int(ck, "step"), h.loss = std::strtod(meta_get(ck, "best_test_loss").c_str(), nullptr);
    } catch (const std::runtime_error& e) {
        h.step = -1, h.problem = e.what();
    }
    return h;
}

static std::string hex64(uint64_t v) {
    char b[17];
    std::snprintf(b, sizeof b, "%016llx", (unsigned long long)v);
    return b;
}
// A run's checkpoint metadata: the model's, and the data it trains on. The
// data's size and hash let --resume tell the run's own file from another
// (load_training_data), however it is named.
static Meta run_meta(const Training& t) {
    Meta meta = model_meta(t.d.vocab, t.d.text, t.d.T, t.step, t.seed, t.best);
    meta["data"] = t.input, meta["data_bytes"] = std::to_string(t.d.bytes), meta["data_fnv1a"] = hex64(t.d.hash);
    return meta;
}

// A 64-bit generator state kept as decimal text in a checkpoint's metadata.
static bool meta_state(const Checkpoint& ck, const std::string& key, uint64_t* state) {
    const std::string v = meta_get(ck, key);
    char* end = nullptr;
    errno = 0;
    *state = std::strtoull(v.c_str(), &end, 10);
    return !v.empty() && std::isdigit((unsigned char)v[0]) && !*end && !errno;
}

// --resume from a checkpoint with training state: the AdamW moments, the
// step, the generators and the best loss, so the run continues bit for bit.
static void restore_training_state(Training& t, const Checkpoint& ck) {
    std::vector<int64_t> flat = {(int64_t)t.m.n_params};
    copy_tensor(t.m.adam_m.data(), ck, "adamw.m", flat, true);
    copy_tensor(t.m.adam_v.data(), ck, "adamw.v", flat, true);
    t.step = meta_int(ck, "step");
    bool ok = meta_state(ck, "rng", &t.rng.state);
    if (NOISY_GATE) ok = meta_state(ck, "noise_rng", &t.noise.state) && ok;
    if (ck.meta.count("dropout_rng")) ok = meta_state(ck, "dropout_rng", &t.drop.state) && ok;
    // capacity and z-loss change training, not the tensors: only resuming must match them
    for (auto [key, value, macro] : {std::tuple{"capacity_factor", CAPACITY_FACTOR, "MOE_CAPACITY_FACTOR"},
                                     std::tuple{"z_coef", Z_COEF, "MOE_Z_COEF"},
                                     std::tuple{"bias_rate", BIAS_RATE, "MOE_BIAS_RATE"},
                                     std::tuple{"entropy_coef", ENTROPY_COEF, "MOE_ENTROPY_COEF"}}) {
        std::string v = ck.meta.count(key) ? meta_get(ck, key) : "0";
        if (v != fmt("%g", value))
            fail("checkpoint '" + ck.path + "' was trained with " + key + "=" + v + " but this binary was built with " +
                 macro + "=" + fmt("%g", value) + ": to resume, rebuild with -D" + macro + "=" + v);
    }
    const std::string scope = ck.meta.count("aux_scope") ? meta_get(ck, "aux_scope") : "batch";
    if (scope != (AUX_SCOPE == Scope::seq ? "seq" : "batch"))
        fail("checkpoint '" + ck.path + "' was trained with the aux loss per " + (scope == "seq" ? "sequence" : "batch") +
             " (aux_scope=" + scope + ") but this binary was built with MOE_AUX_SCOPE=" +
             (AUX_SCOPE == Scope::seq ? "seq" : "batch") + ": to resume, rebuild with -DMOE_AUX_SCOPE=" + scope);
    const std::string b = meta_get(ck, "best_test_loss");
    char* end = nullptr;
    t.best = std::strtod(b.c_str(), &end);
    if (t.step < 0 || t.step > 1000000000 || !ok || b.empty() || *end || std::isnan(t.best))
        fail("checkpoint '" + ck.path + "': its training state (step, rng, best_test_loss) is damaged; "
             "resume from another checkpoint, or train afresh");
    std::printf("resuming from %s at step %lld (seed %lld from the checkpoint)\n", ck.path.c_str(), (long long)t.step,
                (long long)t.seed);
}

// The data of a run. --resume continues on the data the run began with: its
// name is the default -i, and another file (told by size and hash) is an
// error unless --new-data says it is meant.
static void load_training_data(Training& t, const Options& o, const Checkpoint& ck) {
    t.input = o.resume && !o.have_input && ck.meta.count("data") ? ck.meta.at("data") : o.input;
    t.d = load_dataset(t.input, o.text, (uint64_t)t.seed, o.resume ? checkpoint_vocab(ck) : "");
    if (o.resume && !o.new_data && ck.meta.count("data_fnv1a") &&
        (ck.meta.at("data_bytes") != std::to_string(t.d.bytes) || ck.meta.at("data_fnv1a") != hex64(t.d.hash)))
        fail("checkpoint '" + ck.path + "' was trained on '" + ck.meta.at("data") + "' (" + ck.meta.at("data_bytes") +
             " bytes), and '" + t.input + "' is another file (" + std::to_string(t.d.bytes) + " bytes" +
             (ck.meta.at("data_bytes") == std::to_string(t.d.bytes) ? ", other contents" : "") +
             "): its test split and losses would not compare. Resume with -i '" + ck.meta.at("data") +
             "', or add --new-data to continue on this file");
}

// A run killed mid-write (kill -9, a power cut) leaves its temporary file
// behind. Whoever holds the work dir's lock is its only writer, so the
// temporary files of other processes there are such leftovers: removed.
static void remove_stale_temps(const std::string& dir, const std::vector<std::string>& outputs) {
    namespace fs = std::filesystem;
    std::error_code ec;
    for (const auto& entry : fs::directory_iterator(dir, ec)) {
        const std::string name = entry.path().filename().string();
        for (const std::string& out : outputs) {
            const std::string stem = fs::path(out).filename().string() + ".tmp.";
            const std::string pid = name.substr(std::min(name.size(), stem.size()));
            if (name.rfind(stem, 0) == 0 && !pid.empty() && pid.find_first_not_of("0123456789") == std::string::npos &&
                pid != process_id())
                fs::remove(entry.path(), ec);
        }
    }
}

// The work dir, made and checked before a long run, so that a bad -o fails
// at once rather than at the first checkpoint: locked for this run, not
// holding a model that a fresh run would replace, and writable.
static void prepare_work_dir(const Training& t, const Options& o) {
    namespace fs = std::filesystem;
    std::error_code ec;
    fs::create_directories(o.work_dir, ec);
    if (!fs::is_directory(o.work_dir, ec))
        fail("cannot use work dir '" + o.work_dir + "': it is not a directory and could not be created (-o)");
    lock_work_dir(o.work_dir);
    // A fresh run in a work dir that holds a trained model would replace it
    // at its first evaluation: rerunning ./moe after a long run is the
    // easiest way to lose one. So it is refused, unless asked for.
    for (const std::string& path : {t.best_path, t.last}) {
        const Held h = held_model(path);
        if (o.resume || o.overwrite || !h.exists) continue;
        fail("work dir '" + o.work_dir + "' already holds a trained model (" + fs::path(path).filename().string() +
             (h.step >= 0 ? ": step " + std::to_string(h.step) + ", test loss " + fmt("%.4f", h.loss) : ": " + h.problem) +
             "). Continue it with --resume, train into another work dir with -o, or replace it with --overwrite");
    }
    // Every file the run will write must be writable now, not after an hour.
    const std::string probe = (fs::path(o.work_dir) / ".probe").string();
    for (const std::string& path : {t.best_path, t.last, t.log_path, t.svg_path})
        if (fs::exists(path, ec) && !fs::is_regular_file(path, ec))
            fail("cannot write '" + path + "': it is there and is not a file (a directory?); move it away or use another -o");
    remove_stale_temps(o.work_dir, {t.best_path, t.last, t.log_path, t.svg_path, probe});
    write_text_atomic(probe, "probe file", "moe.cpp checks that it can write here\n");
    fs::remove(probe, ec);
}

// The model, the data and the --val files of a run. A fresh run initialises
// the model from the seed. --resume rebuilds it from a checkpoint instead,
// with the checkpoint's seed (so the test split is the same) and, when the
// checkpoint holds it, the training state. Everything is checked before
// anything is written.
static void start_training(Training& t, const Options& o) {
    namespace fs = std::filesystem;
    t.last = (fs::path(o.work_dir) / "last.safetensors").string();
    t.best_path = (fs::path(o.work_dir) / "model.safetensors").string();
    t.log_path = (fs::path(o.work_dir) / "log.tsv").string();
    t.svg_path = (fs::path(o.work_dir) / "report.svg").string();
    Checkpoint ck;
    t.seed = o.seed;
    if (o.resume) {
        ck = read_safetensors(o.checkpoint.empty() ? t.last : o.checkpoint);
        load_model(t.m, ck);
        if ((meta_get(ck, "mode") == "text") != o.text)
            fail("checkpoint '" + ck.path + "' was trained in " + meta_get(ck, "mode") + " mode: " +
                 (o.text ? "drop --text" : "add --text"));
        t.seed = meta_int(ck, "seed");
    }
    load_training_data(t, o, ck);
    t.rng = make_rng((uint64_t)t.seed, STREAM_TRAIN), t.noise = make_rng((uint64_t)t.seed, STREAM_NOISE);
    t.drop = make_rng((uint64_t)t.seed, STREAM_DROPOUT);
    if (!o.resume) {
        model_init(t.m, (int)t.d.vocab.size() + 1);
        Rng init = make_rng((uint64_t)t.seed, STREAM_INIT);
        init_params(t.m.params, t.m.tensors, init);
    } else if (ck.tensors.count("adamw.m") && ck.tensors.count("adamw.v") && ck.meta.count("rng")) {
        restore_training_state(t, ck);
    } else {
        std::printf("fine-tuning %s: it holds no optimizer state, so AdamW starts fresh at step 0\n", ck.path.c_str());
        // The work dir's model is replaced only by a better one: without this,
        // the first evaluation would "improve" on nothing and overwrite it.
        if (const Held h = held_model(t.best_path); h.exists && std::isfinite(h.loss)) {
            t.best = h.loss;
            std::printf("(%s holds test loss %.4f: it is replaced only by a better model)\n", t.best_path.c_str(), h.loss);
        }
    }
    // --val files (one per domain, say): evaluated beside the test split at
    // every evaluation, with the training vocabulary.
    for (const auto& f : o.val_files) {
        if (t.d.text) fail("--val works in line mode, where a file is a set of examples; in text mode use --eval later");
        t.val.push_back(load_line_file(f, t.d.vocab, "--val", t.d.T));
        t.val_names.push_back(fs::path(f).stem().string());
        if (std::count(t.val_names.begin(), t.val_names.end(), t.val_names.back()) > 1)
            fail("--val: two files are named '" + t.val_names.back() + "'; the log and the report name files by it: "
                 "rename one");
    }
    prepare_work_dir(t, o);
    if (o.resume) {
        t.hist = read_log(t.log_path, t.val_names, t.step);
        if (t.hist.empty() && t.step > 0)
            std::printf("(no log.tsv with these --val files in %s: the report starts at step %lld)\n",
                        o.work_dir.c_str(), (long long)t.step);
    }
    t.rt_test = routing_for(t.d.vocab);
    t.m.dropout = (real)o.dropout;
    t.sched.lr = o.learning_rate, t.sched.min_lr = o.min_lr, t.sched.cosine = o.cosine;
    t.sched.warmup = o.warmup_steps, t.sched.decay_steps = o.lr_decay_steps;
    t.opt.lr = (float)o.learning_rate, t.opt.weight_decay = (float)o.weight_decay, t.opt.decay_2d = o.decay_2d;
}

// The configuration, the data and the parameter counts: total, and active
// per token (everything but the E - K experts a token does not use).
// (Printed before the first step, so that a wrong -i or a wrong build shows
// at once, not in the report after an hour.)
static void print_run_header(const Training& t, const Options& o) {
    const Model& m = t.m;
    const Dataset& d = t.d;
    int64_t expert = expert_params() * N_LAYER;  // one expert in every layer
    std::printf("moe.cpp: %s | threads %d\n", config_string().c_str(), g_threads);
#if !defined(__NO_MATH_ERRNO__) && !defined(_MSC_VER)
    if (FAST)
        std::printf("note: built without -fno-math-errno, so AdamW is not vectorised and steps are slower "
                    "(the build line at the top of moe.cpp has the flag)\n");
#endif
    if (d.text)
        std::printf("data: %s, text mode: %zu train / %zu test bytes, vocab %d, context %d\n", t.input.c_str(),
                    d.train_text.size(), d.test_text.size(), m.V, d.T);
    else
        std::printf("data: %s, line mode: %zu train / %zu test lines, vocab %d, context %d\n", t.input.c_str(),
                    d.train.size(), d.test.size(), m.V, d.T);
    std::printf("parameters: %zu total, %lld active per token (%s%d of %d experts%s)\n", m.n_params,
                (long long)(m.n_params - (size_t)(expert * (E - K))), TOP_P > 0 ? "at most: " : "", K, E,
                NS ? (", plus " + std::to_string(NS) + " shared").c_str() : "");
    if (TOP_P > 0)  // top-p: the mean is measured as the run goes
        std::printf("top-p %g: each token takes 1 to %d experts; experts per token (and so the active parameters, "
                    "%lld per expert a token takes) in the progress and evaluation lines\n",
                    TOP_P, K, (long long)expert);
    std::printf("training: batch %d, AdamW lr %g wd %g (%s), aux_coef %g, steps %lld\n", o.batch_size, o.learning_rate,
                o.weight_decay, o.decay_2d ? "2-D parameters only" : "every parameter", o.aux_coef, (long long)o.max_steps);
    if (o.cosine || o.warmup_steps || o.grad_clip > 0 || o.dropout > 0)
        std::printf("recipe: %s%s, warmup %lld steps, gradient clip %s, dropout %g\n", o.cosine ? "cosine to " : "constant",
                    o.cosine ? (fmt("%g", o.min_lr) + " at step " + std::to_string(o.lr_decay_steps)).c_str() : "",
                    (long long)o.warmup_steps, o.grad_clip > 0 ? fmt("%g", o.grad_clip).c_str() : "off", o.dropout);
}

// last.safetensors: everything --resume needs to continue exactly.
// It is written at every evaluation and when a signal stops the run, and
// like every checkpoint it replaces the old file only once it is whole.
static void save_last(const Training& t) {
    Meta meta = run_meta(t);
    meta["rng"] = std::to_string(t.rng.state);
    if (NOISY_GATE) meta["noise_rng"] = std::to_string(t.noise.state);
    if (t.m.dropout > 0) meta["dropout_rng"] = std::to_string(t.drop.state);
    std::vector<SaveTensor> ts = model_tensors(t.m);
    ts.push_back({"adamw.m", {(int64_t)t.m.n_params}, t.m.adam_m.data()});
    ts.push_back({"adamw.v", {(int64_t)t.m.n_params}, t.m.adam_v.data()});
    write_safetensors(t.last, ts, meta);
}

// An evaluation: up to 1000 training lines and the whole test split (256
// windows each in text mode), the --val files, then the log, the report and
// the checkpoints: model.safetensors when the test loss is the best so far
// (with fewer than 10 lines there is no test split, and the train loss
// decides), and last.safetensors always.
static void evaluate_and_save(Training& t) {
    Model& m = t.m;
    const Dataset& d = t.d;
    EvalResult tr = d.text ? eval_text(m, d.train_text, 256) : eval_lines(m, d.train, d.T, 1000);
    const bool no_test = d.text ? d.test_text.size() < 2 : d.test.empty();
    t.rt_test = routing_for(d.vocab), t.evaluated = true;
    EvalResult te = d.text ? eval_text(m, d.test_text, 256, &t.rt_test)
                           : eval_lines(m, no_test ? d.train : d.test, d.T, 1000, &t.rt_test);
    std::printf("step %6lld | train loss %.4f | test loss %.4f | expert load %s%s\n", (long long)t.step, tr.loss,
                no_test ? NAN : te.loss, print_load(te.load).c_str(),
                TOP_P > 0 ? (" | experts/token " + print_experts(te)).c_str() : "");
    LogRow row{t.step, tr.loss, no_test ? NAN : te.loss, {}, te.load, t.lr, te.routed > 0 ? te.slots / te.routed : NAN};
    t.rt_val.clear();
    for (size_t v = 0; v < t.val.size(); v++) {
        Routing rt = routing_for(d.vocab);
        row.val.push_back(eval_lines(m, t.val[v].lines, t.val[v].T, SIZE_MAX, &rt).loss);
        t.rt_val.push_back(rt.first);
        if (!v) std::printf("step %6lld | val", (long long)t.step);
        std::printf("%s %s %.4f", v ? " |" : "", t.val_names[v].c_str(), row.val.back());
    }
    if (!t.val.empty()) std::printf("\n");
    t.hist.push_back(row);
    write_text_atomic(t.log_path, "log", log_tsv(t.hist, t.val_names));
    const std::string title = "moe.cpp: " + config_string() + " | " + t.input + " | step " + std::to_string(t.step);
    t.settle.steps.push_back(t.step), t.settle.picks.push_back(t.rt_test.picks);
    write_text_atomic(t.svg_path, "report", training_svg(title, t.hist, t.val_names, t.rt_val, t.rt_test, t.settle));
    const double score = no_test ? tr.loss : te.loss;
    if (score < t.best) {
        t.best = score;
        write_safetensors(t.best_path, model_tensors(m), run_meta(t));
        std::printf("step %6lld | new best test loss, saved %s\n", (long long)t.step, t.best_path.c_str());
    }
    save_last(t);
    std::fflush(stdout);
}

// Sums over the steps since the last progress line.
// The progress line prints means over the steps since the last one, not the
// last step alone: a single batch's loss jumps by tenths from step to step,
// and its mean over a hundred steps is what shows the trend.
struct Progress {
    double ms = 0, loss = 0, ce = 0, aux = 0, z = 0, ent = 0, norm = 0;  // norm: before clipping (--grad-clip)
    int64_t tokens = 0, steps = 0, dropped = 0, slots = 0, routed = 0;
};
static void print_progress(int64_t step, double lr, bool clip, const Progress& p) {
    // the variants' figures, when built in: z-loss per layer, slots dropped
    // by capacity, top-p's experts per token and router entropy per layer
    std::string extra = (Z_COEF > 0 ? fmt(" | z %.4f", p.z / p.steps) : "") +
                        (CAPACITY_FACTOR > 0 ? fmt(" | dropped %.2f%%", 100.0 * p.dropped / std::max<int64_t>(p.slots, 1))
                                             : "");
    if (TOP_P > 0)
        extra += fmt(" | experts/token %.3f", (double)p.slots / std::max<int64_t>(p.routed, 1)) +
                 fmt(" | entropy %.4f", p.ent / p.steps);
    extra += fmt(" | lr %.3e", lr) + (clip ? fmt(" | norm %.3f", p.norm / p.steps) : "");
    std::printf("step %6lld | loss %.4f | ce %.4f | aux %.4f%s | %.2f ms/step | %.0f tok/s\n", (long long)step,
                p.loss / p.steps, p.ce / p.steps, p.aux / p.steps, extra.c_str(), p.ms / p.steps,
                p.tokens / (p.ms / 1000));
    std::fflush(stdout);
}

// After the last step: where the tokens went at the last evaluation, then
// samples from the final weights, from a generator of their own.
static void final_report(Training& t, const Options& o) {
    if (E > 1 && t.evaluated) {
        if (!t.val_names.empty())
            print_routing("routing by --val file: share of each file's tokens whose first choice is expert e",
                          t.val_names, t.rt_val);
        print_routing_by_class(t.rt_test);
        print_dynamics(t.settle, t.rt_test);
        std::printf("report: %s (loss curves, expert load, routing)\n", t.svg_path.c_str());
    }
    Rng srng = make_rng((uint64_t)t.seed, STREAM_SAMPLE);
    if (t.d.text) {
        std::printf("--- sample ---\n");
        std::vector<int> ctx = {t.d.train_text[0]};
        std::vector<int> out = generate(t.m, ctx, o.max_new_tokens, false, BLOCK_SIZE, o.temperature, o.top_k, srng, nullptr);
        std::printf("%s\n", decode(out, t.d.vocab).c_str());
    } else {
        print_line_samples(t.m, t.d.vocab, t.d.T, o.num_samples, o.temperature, o.top_k, srng, &t.d);
    }
}

// The training loop: a batch, the forward pass (loss), the backward pass,
// one AdamW step. Every log interval, the averages since the last line;
// every eval interval, the losses, the expert load and the checkpoints.
[[maybe_unused]] static int train(const Options& o) {
    Training t;
    start_training(t, o);
    print_run_header(t, o);
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
#ifdef SIGHUP
    std::signal(SIGHUP, on_signal);  // the terminal was closed: save as for SIGTERM
#endif
    Model& m = t.m;
    std::vector<int> in, tg;
    Progress p;
    if (t.step >= o.max_steps)
        std::printf("already at step %lld: nothing to train (raise --max-steps)\n", (long long)t.step);
    while (t.step < o.max_steps) {
        const double t0 = now_ms();
        train_batch(in, tg, t.d, o.batch_size, t.rng);
        m.train_rng = &t.noise, m.drop_rng = &t.drop;  // training: noise, capacity and dropout apply
        const double loss = model_forward(m, in.data(), tg.data(), o.batch_size, t.d.T, (real)o.aux_coef);
        m.train_rng = nullptr, m.drop_rng = nullptr;
        if (!std::isfinite(loss))
            fail("the loss became " + std::to_string(loss) + " at step " + std::to_string(t.step + 1) +
                 "; the checkpoints on disk are from before it. Try a lower --learning-rate");
        model_backward(m);  // the gradients are zero: model_init and adamw_update leave them so
        if (const TensorInfo* bad = bad_gradient(m))
            fail("the gradient of " + bad->name + " became NaN or infinite at step " + std::to_string(t.step + 1) +
                 " (loss " + std::to_string(loss) + "); the checkpoints on disk are from before it. Try a lower "
                 "--learning-rate");
        // Clipping comes after the NaN check (a NaN norm would turn every
        // gradient into NaN) and before AdamW, as in PyTorch; the rate is the
        // schedule's for the step about to be taken.
        if (o.grad_clip > 0) p.norm += clip_gradients(m, o.grad_clip);
        t.opt.lr = (float)(t.lr = lr_at(t.sched, t.step + 1));
        adamw_update(m, t.opt, ++t.step);
        if (BIAS_RATE > 0)  // loss-free balancing: each layer's biases towards the load this step gave
            for (int l = 0; l < N_LAYER; l++) bias_update(&m.score_bias[(size_t)l * E], m.L[l].f.data(), BIAS_RATE);
        p.ms += now_ms() - t0, p.tokens += m.n_targets, p.steps++;
        p.loss += loss, p.ce += m.ce, p.aux += m.aux_sum / N_LAYER, p.z += m.z_sum / N_LAYER;
        p.ent += m.ent_sum / N_LAYER, p.dropped += m.dropped, p.slots += m.slots, p.routed += m.routed;
        if (t.step % o.log_interval == 0 || t.step == o.max_steps)
            print_progress(t.step, t.lr, o.grad_clip > 0, p), p = Progress{};
        if (t.step % o.eval_interval == 0 || t.step == o.max_steps) evaluate_and_save(t);
        if (g_signal) {
            save_last(t);
            std::printf("stopped by %s after step %lld: saved %s\ncontinue with the same command and --resume\n",
                        g_signal == SIGINT ? "Ctrl-C" : g_signal == SIGTERM ? "SIGTERM" : "a signal (the terminal closed?)",
                        (long long)t.step, t.last.c_str());
            std::fflush(stdout);
            return 128 + g_signal;
        }
    }
    final_report(t, o);
    return 0;
}
#endif

// --- a model to use: sampling, evaluation and routing load --checkpoint, or
// the work dir's best one, with what its metadata says about the data.
// The three modes that use a trained model all start alike: read the
// checkpoint, build the model it describes, and take from its metadata
// the vocabulary, the data mode and the context it was trained with.
struct Loaded {
    Model m;
    Checkpoint ck;
    std::string vocab;
    bool text = false;
    int context = 0;
};
// The context is checked here, once, because every mode sizes its inputs
// by it: a damaged value would otherwise index past the position table.
static void load_for_use(const Options& o, Loaded& l) {
    namespace fs = std::filesystem;
    l.ck = read_safetensors(o.checkpoint.empty() ? (fs::path(o.work_dir) / "model.safetensors").string() : o.checkpoint);
    load_model(l.m, l.ck);
    const int64_t context = meta_int(l.ck, "context");
    if (context < 2 || context > BLOCK_SIZE) fail("checkpoint '" + l.ck.path + "': metadata 'context' is out of range");
    l.vocab = checkpoint_vocab(l.ck), l.text = meta_get(l.ck, "mode") == "text", l.context = (int)context;
    l.m.ablated = o.ablated;
    if (!o.ablated.empty()) std::printf("ablated (removed from the routing): %s\n", o.ablate.c_str());
}

// Sampling from a checkpoint: samples (makemore style, sorted against the
// data file when it is there), or the continuation of --prompt.
[[maybe_unused]] static void sample_only(const Options& o) {
    Loaded l;
    load_for_use(o, l);
    Rng rng = make_rng((uint64_t)o.seed, STREAM_SAMPLE);
    // A prompt, or text mode: one continuation, printed as it is made.
    if (o.have_prompt || l.text) {
        std::vector<int> ctx = l.text ? std::vector<int>{} : std::vector<int>{0};
        std::vector<int> p = encode(o.prompt, l.vocab, "--prompt");
        ctx.insert(ctx.end(), p.begin(), p.end());
        if (!l.text && (int)ctx.size() >= l.context)  // a line that fills the context has no room to go on
            fail("--prompt: '" + o.prompt + "' has " + std::to_string(o.prompt.size()) + " bytes; this model makes lines of at most " +
                 std::to_string(l.context - 1) + ": give a shorter prompt");
        if (ctx.empty()) ctx.push_back(1);  // text mode needs something to continue
        std::printf("%s", decode(ctx, l.vocab).c_str());
        std::fflush(stdout);
        double ms = 0;
        int n = 0;
        generate(l.m, ctx, l.text ? o.max_new_tokens : std::min(o.max_new_tokens, BLOCK_SIZE), !l.text, l.context,
                 o.temperature, o.top_k, rng, [&](int t, double dt) {
                     std::printf("%c", l.vocab[t - 1]);
                     std::fflush(stdout);
                     ms += dt, n++;
                 });
        std::printf("\n");
        std::fflush(stdout);
        std::fprintf(stderr, "(%d tokens, %.0f tokens/s)\n", n, n / std::max(ms / 1000, 1e-9));
        return;
    }
    Dataset d;
    bool have_data = false;
    try {  // the data file only sorts the samples; without it they are just printed
        // the run's own data file, unless -i names another
        const std::string input = !o.have_input && l.ck.meta.count("data") ? l.ck.meta.at("data") : o.input;
        d = load_dataset(input, false, (uint64_t)meta_int(l.ck, "seed"), l.vocab);
        have_data = true;
    } catch (const std::runtime_error& e) {
        std::printf("(not sorting samples against the training data: %s)\n", e.what());
    }
    print_line_samples(l.m, l.vocab, l.context, o.num_samples, o.temperature, o.top_k, rng, have_data ? &d : nullptr);
}

// --eval: each file is read with the checkpoint's vocabulary and context: in
// line mode every line, padded to the file's longest; in text mode
// consecutive windows. The loss is the mean over every predicted byte (and
// end marker). Then the routing tables, and --arith.
struct EvalFile {
    std::string name;
    LineFile lines;           // line mode
    std::vector<int> tokens;  // text mode
};
static EvalFile load_eval_file(const Loaded& l, const std::string& f, const std::string& flag) {
    EvalFile ef{f, {}, {}};
    if (!l.text) {
        ef.lines = load_line_file(f, l.vocab, flag, l.context);
        return ef;
    }
    std::string raw = read_file(f);
    if (raw.size() < 2) fail(flag + ": '" + f + "' has fewer than 2 bytes: nothing to predict");
    ef.tokens = encode(raw, l.vocab, f);
    return ef;
}
static EvalResult eval_file(Loaded& l, const EvalFile& ef, Routing* rt) {
    return l.text ? eval_text(l.m, ef.tokens, SIZE_MAX, rt) : eval_lines(l.m, ef.lines.lines, ef.lines.T, SIZE_MAX, rt);
}
[[maybe_unused]] static void eval_files(const Options& o) {
    Loaded l;
    load_for_use(o, l);
    if (!o.arith_file.empty() && l.text)
        fail("--arith needs a line-mode model: its prompts are lines, and this checkpoint is text mode");
    std::vector<std::vector<double>> by_file;
    Routing all = routing_for(l.vocab);
    for (const auto& f : o.eval_files) {
        Routing rt = routing_for(l.vocab);
        const EvalResult r = eval_file(l, load_eval_file(l, f, "--eval"), &rt);
        std::printf("eval %s loss %.6f tokens %lld\n", f.c_str(), r.loss, (long long)r.tokens);
        std::printf("  expert load %s\n", print_load(r.load).c_str());
        if (TOP_P > 0) std::printf("  experts per token %s\n", print_experts(r).c_str());
        by_file.push_back(rt.first);
        for (size_t i = 0; i < all.by_class.size(); i++) all.by_class[i] += rt.by_class[i];
        for (int c = 0; c <= N_CLASS; c++) all.slots_by[c] += rt.slots_by[c], all.rows_by[c] += rt.rows_by[c];
    }
    if (E > 1 && !o.eval_files.empty()) {
        print_routing("routing by file: share of each file's tokens whose first choice is expert e", o.eval_files, by_file);
        print_routing_by_class(all);
    }
    if (!o.arith_file.empty()) {
        Rng rng = make_rng((uint64_t)o.seed, STREAM_SAMPLE);
        arith_report(l.m, l.vocab, l.context, o.arith_file, o.temperature, rng);
    }
}

// --knockout: which experts matter? A routing table shows where tokens go;
// it cannot show whether the expert they go to is needed. Removing one
// expert (every token re-routes to its next best) and measuring the loss
// can: the change is what the model loses without it. Then DeepSeekMoE's
// redundancy test: take away each token's r most probable experts (r = 0 is
// the plain model) and let it choose from the rest; a steep curve means the
// experts know different things, a flat one that they are redundant.
struct Knockout {
    std::vector<std::string> panels;        // a file's name, or "arith greedy accuracy"
    std::vector<double> base;               // each panel's value with every expert
    std::vector<std::vector<double>> delta;  // [panel][l * E + e]: value without (l, e) - base
    std::vector<std::vector<double>> redundancy;  // [r][file]: loss without each token's r best
};
static Knockout knockout(Loaded& l, const std::vector<EvalFile>& files, const std::string& arith_file) {
    Knockout k;
    auto measure = [&]() {
        std::vector<double> v;
        for (const auto& f : files) v.push_back(eval_file(l, f, nullptr).loss);
        if (!arith_file.empty()) v.push_back(arith_greedy(l.m, l.vocab, l.context, arith_file, nullptr).share());
        return v;
    };
    for (const auto& f : files) k.panels.push_back(f.name);
    if (!arith_file.empty()) k.panels.push_back("arith greedy accuracy");
    k.base = measure();
    k.delta.assign(k.panels.size(), std::vector<double>((size_t)N_LAYER * E));
    for (int i = 0; i < N_LAYER * E; i++) {
        l.m.ablated.assign((size_t)N_LAYER * E, 0);
        l.m.ablated[i] = 1;
        const std::vector<double> v = measure();
        for (size_t p = 0; p < v.size(); p++) k.delta[p][i] = v[p] - k.base[p];
    }
    l.m.ablated.clear();
    for (int r = 0; r <= E - K; r++) {
        l.m.skip_top = r;
        std::vector<double> v;
        for (const auto& f : files) v.push_back(eval_file(l, f, nullptr).loss);
        k.redundancy.push_back(v);
    }
    l.m.skip_top = 0;
    return k;
}
static void print_knockout(const Knockout& k, size_t n_files) {
    for (size_t p = 0; p < k.panels.size(); p++) {
        const bool acc = p >= n_files;
        std::printf("knockout %s: %s %.4f with every expert; the change when one expert is removed%s\n", k.panels[p].c_str(),
                    acc ? "accuracy" : "loss", k.base[p], acc ? "" : " (nats per token; + : the file needs it)");
        std::printf("  layer");
        for (int e = 0; e < E; e++) std::printf("     e%-3d", e);
        std::printf("     total\n");
        for (int l = 0; l < N_LAYER; l++) {
            double total = 0;
            std::printf("  %-5d", l);
            for (int e = 0; e < E; e++) std::printf("  %+.4f", k.delta[p][(size_t)l * E + e]), total += k.delta[p][(size_t)l * E + e];
            std::printf("  %+.4f\n", total);
        }
    }
    std::printf("redundancy: the loss when each token's r most probable experts are removed and it chooses from the rest\n");
    std::printf("  r");
    for (size_t f = 0; f < n_files; f++) std::printf("  %s", k.panels[f].c_str());
    std::printf("\n");
    for (size_t r = 0; r < k.redundancy.size(); r++) {
        std::printf("  %zu", r);
        for (double v : k.redundancy[r]) std::printf("  %.6f", v);
        std::printf("\n");
    }
}
// The heatmap: a panel per file (and for arithmetic), layers x experts.
static std::string knockout_svg(const Knockout& k, const std::string& title) {
    std::vector<std::string> rows, cols;
    for (int l = 0; l < N_LAYER; l++) rows.push_back("layer " + std::to_string(l));
    for (int e = 0; e < E; e++) cols.push_back("e" + std::to_string(e));
    const double cell_w = 58, panel_h = 38 + 20.0 * N_LAYER + 12 + 8, w = std::max(70 + cell_w * E + 20, 720.0);
    std::string o = svg_begin(w, 40 + panel_h * (double)k.panels.size());
    svg_text(o, 10, 20, title, "font-weight=\"bold\"");
    for (size_t p = 0; p < k.panels.size(); p++) {
        std::vector<std::vector<double>> v(N_LAYER, std::vector<double>(E));
        double hi = 0;  // shaded from no change (white) to the panel's largest change
        for (int i = 0; i < N_LAYER * E; i++) v[i / E][i % E] = k.delta[p][i], hi = std::max(hi, std::fabs(k.delta[p][i]));
        const bool acc = k.panels[p] == "arith greedy accuracy";
        if (acc)  // accuracy falls when an expert matters: shade the fall
            for (auto& row : v)
                for (double& x : row) x = -x;
        svg_heatmap(o, 10, 30 + panel_h * (double)p, 60, cell_w,
                    acc ? "arith greedy accuracy: the fall without each expert (base " + fmt("%.3f", k.base[p]) + ")"
                        : k.panels[p] + ": the loss's rise without each expert (base " + fmt("%.4f", k.base[p]) + ")",
                    rows, cols, v, 0, hi, "%+.3f");
    }
    return o + "</svg>\n";
}
[[maybe_unused]] static void knockout_mode(const Options& o) {
    namespace fs = std::filesystem;
    Loaded l;
    load_for_use(o, l);
    if (!o.arith_file.empty() && l.text)
        fail("--arith needs a line-mode model: its prompts are lines, and this checkpoint is text mode");
    std::vector<EvalFile> files;
    for (const auto& f : o.knockout_files) files.push_back(load_eval_file(l, f, "--knockout"));
    const Knockout k = knockout(l, files, o.arith_file);
    print_knockout(k, files.size());
    const std::string svg = (fs::path(l.ck.path).parent_path() / "knockout.svg").string();
    write_text_atomic(svg, "knockout heatmap", knockout_svg(k, "knockout of " + l.ck.path));
    std::printf("knockout heatmap: %s\n", svg.c_str());
}

// --route: the routing explorer on TEXT, or on each line of standard input.
[[maybe_unused]] static void route_mode(const Options& o) {
    Loaded l;
    load_for_use(o, l);
    if (o.route != "-") return route_line(l.m, l.vocab, l.text, l.context, o.route, o.gates);
    // Standard input: a line that cannot be routed is reported and skipped,
    // and the run ends with an error if any was.
    int bad = 0;
    auto one = [&](std::string& line) {
        if (!line.empty() && line.back() == '\r') line.pop_back();
        try {
            if (!line.empty()) route_line(l.m, l.vocab, l.text, l.context, line, o.gates);
        } catch (const std::runtime_error& e) {
            std::fprintf(stderr, "error: %s\n", e.what());
            bad++;
        }
        line.clear();
    };
    std::string line;
    for (int c; (c = std::getchar()) != EOF;)
        if (c == '\n') one(line);
        else line += (char)c;
    one(line);
    if (bad) fail(std::to_string(bad) + " line(s) of standard input could not be routed (see above)");
}

#ifndef MOE_NO_MAIN  // tests include this file and bring their own main
// Exit codes: 0 done, 1 an error in the data, a checkpoint or the disk
// (the message says which), 2 a mistake on the command line, 130 or 143
// stopped by Ctrl-C or SIGTERM (with a checkpoint to resume from).
int main(int argc, char** argv) {
    try {
        // One mode per run, chosen by the flags (check_options has refused
        // mixtures): the routing explorer, evaluation, sampling, or training.
        Options o = parse_args(argc, argv);
        set_threads(o.threads);
        if (o.have_route) route_mode(o);
        else if (!o.knockout_files.empty()) knockout_mode(o);
        else if (!o.eval_files.empty() || !o.arith_file.empty()) eval_files(o);
        else if (o.sample_only || o.have_prompt || INFERENCE_ONLY) sample_only(o);
#if !MOE_INFERENCE_ONLY
        else return train(o);
#endif
        return 0;
    } catch (const UsageError& e) {
        std::fprintf(stderr, "error: %s\n(./moe --help lists every flag)\n", e.what());
        return 2;
    } catch (const std::bad_alloc&) {  // the loaders name their file; this is the model or its activations
        std::fprintf(stderr, "error: out of memory for the model (%s) and a step's activations: free some memory, "
                             "lower --batch-size, or rebuild with smaller sizes\n", config_string().c_str());
        return 1;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
#endif

// ============================================================================
// PART TWO: MAKING IT FAST
//
// Everything below exists only for speed, and computes what part one
// computes. Each section opens with the plain functions it replaces and the
// test that holds the two together: tests/test_fast.cpp runs each kernel
// here beside its plain twin (fast::on switched off) and checks that the
// matrix multiply agrees bit for bit and the rest within a stated bound;
// test_model checks that 1 and 2 threads give bit-identical gradients. The
// build line's -march=native lets g++ vectorise the loops below for this
// machine's widest vectors: most are written so that it can (no reordered
// float sums, no calls it cannot inline).
// ============================================================================
#if MOE_FAST
namespace fast {
bool on = true;
}

// ----------------------------------------------------------------------------
// 13. The thread pool
//
// Replaces: the plain parallel_for of section 2, f(0, n). Held to it by its
// contract (every index computed alike in any range): test_pool runs jobs of
// every width on 8 threads and checks that each index runs exactly once,
// also when the workers never come and the caller runs every chunk;
// test_model and cli_threads that 1, 2 and 3 threads give bit-identical
// gradients and checkpoints.

// A small pool of worker threads, started once. parallel_for(n, f) cuts
// [0, n) into one contiguous chunk per thread and calls f(begin, end) on each;
// the calling thread takes the first chunk.
//
// A chunk is claimed before it runs, by its own worker or, if that worker
// has not started it when the caller is done with chunk 0, by the caller.
// A worker may not be running when a job is posted: another program wants
// its core, or the virtual machine's host has paused it. Were the caller to
// wait for it, every one of a step's few hundred parallel calls could wait
// for the scheduler, and two threads beside a busy program would run slower
// than one. So the caller does the late worker's chunk itself. Which thread
// runs a chunk changes nothing in the result (see run_range).
struct ThreadPool {
    static constexpr int MAX_THREADS = 256;  // --threads' limit
    std::vector<std::thread> workers;
    std::mutex mu;
    std::condition_variable wake;
    const std::function<void(int)>* job = nullptr;
    std::atomic<int> n_jobs{0}, pending{0};
    std::atomic<uint64_t> generation{0};  // bumped once per parallel_for
    std::atomic<bool> quit{false};
    // taken[i]: the last generation whose chunk i was claimed. Generations
    // only grow, so a claim succeeds once per job, and a worker that read a
    // job that has since finished (its chunk taken, so taken[i] >= its
    // generation) cannot claim it.
    std::atomic<uint64_t> taken[MAX_THREADS] = {};
    bool hold = false;  // test_pool: workers claim nothing, the caller runs every chunk

    bool claim(int i, uint64_t gen) {
        uint64_t prev = taken[i].load(std::memory_order_relaxed);
        return prev < gen && taken[i].compare_exchange_strong(prev, gen, std::memory_order_acq_rel);
    }
    // Thread 0 is the caller; threads 1..n-1 are workers that live as long
    // as the program.
    void start(int n_threads) {
        for (int i = (int)workers.size() + 1; i < n_threads; i++) workers.emplace_back([this, i] { loop(i); });
    }
    // A training step makes a few hundred parallel calls, microseconds apart,
    // with stretches of serial work between them. Waking a sleeping thread
    // costs tens of microseconds (more in a virtual machine), as much as a
    // small parallel call saves, so an idle worker watches the generation
    // counter for 5 ms before it goes to sleep: through a training step it
    // never sleeps, and an idle program soon stops watching. It spins for
    // the first few thousand looks, then yields the core between looks, so
    // that with more threads than cores the ones with work get to run.
    void loop(int me) {
        uint64_t seen = 0;
        for (;;) {
            auto idle_since = std::chrono::steady_clock::now();
            for (int looks = 0; generation.load(std::memory_order_acquire) == seen && !quit; looks++) {
                if (looks < 4096) continue;
                std::this_thread::yield();
                if (std::chrono::steady_clock::now() - idle_since < std::chrono::milliseconds(5)) continue;
                std::unique_lock<std::mutex> lock(mu);
                wake.wait(lock, [&] { return quit || generation.load() != seen; });
            }
            if (quit) return;
            // Read the job and its size together with the generation they
            // belong to, under the lock run() publishes them with: a worker
            // that sat out one job (me >= n), or was too late for it, may
            // wake only after the next one is posted, and must not mix one
            // job's size with another's.
            const std::function<void(int)>* f;
            int n;
            bool held;
            {
                std::lock_guard<std::mutex> lock(mu);
                seen = generation.load(), f = job, n = n_jobs.load(), held = hold;
            }
            if (me < n && !held && claim(me, seen)) {
                (*f)(me);
                pending.fetch_sub(1, std::memory_order_acq_rel);
            }
        }
    }
    // Publish the job, bump the generation (which is what the workers wait
    // for), run chunk 0 here, claim the chunks no worker has started, then
    // wait until the workers' chunks are done.
    void run(int n, const std::function<void(int)>& f) {  // f(0) .. f(n-1), n <= threads
        uint64_t gen;
        {
            std::lock_guard<std::mutex> lock(mu);  // no worker misses the wake-up or sees half a job
            job = &f;
            n_jobs.store(n), pending.store(n - 1);
            gen = generation.fetch_add(1, std::memory_order_acq_rel) + 1;
        }
        wake.notify_all();
        f(0);
        for (int i = 1; i < n; i++)
            if (claim(i, gen)) f(i), pending.fetch_sub(1, std::memory_order_acq_rel);
        for (int spins = 0; pending.load(std::memory_order_acquire) != 0; spins++)
            if (spins > 1000) std::this_thread::yield();
    }
    ~ThreadPool() {  // at exit: wake every worker with quit set, and join them
        {
            std::lock_guard<std::mutex> lock(mu);
            quit = true;
        }
        wake.notify_all();
        for (auto& t : workers) t.join();
    }
};
static ThreadPool g_pool;
// True on a thread that is running a chunk of a parallel_for: a parallel_for
// inside it (a matmul inside one expert, say) then runs serially on that
// thread. Nothing changes in the result, only who computes it.
static thread_local bool t_in_parallel = false;

[[maybe_unused]] static void set_threads(int n) {
    g_threads = n;
    g_pool.start(n);
}

// Where parallel_for cuts [0, n) among the threads, as fractions of n: at[i]
// is where thread i's chunk starts (at[0] = 0, at[threads] = 1). Each call
// site keeps its own (see parallel_for).
struct Cuts {
    std::vector<double> at;
    std::vector<int> cut;       // this call's cuts, in indices
    std::vector<double> secs;   // this call's time per chunk
};

// f(begin, end), on a copy of f of its own. It is compiled once for each f
// and called through a pointer that the compiler cannot see through
// (parallel_for's `range`), so it is neither inlined nor specialised. A loop
// inlined into two callers is compiled twice, and the copies may differ in
// the last bit of a float (whether a*b + c becomes one fused multiply-add
// depends on what the compiler sees around it): then the serial path and a
// thread's chunk, or two threads, would compute the same index differently.
// That happened, in a build with ThreadSanitizer.
template <class Fn>
static void run_range(const void* f, int begin, int end) {
    Fn mine = *static_cast<const Fn*>(f);
    mine(begin, end);
}

// Each thread runs its own copy of f (run_range), and the call sites capture
// by value ([=]): a lambda that captures by reference makes every thread read
// the caller's stack while the caller writes to it, and the cache line shared
// by both then bounces between the cores (it halved the speed of two threads).
//
// Where to cut. Equal chunks finish together only if both cores run at the
// same speed, and on a shared machine they often do not: for minutes at a
// time one runs 10-30% slower than the other, which then waits at the
// end of every call. Handing out small pieces from a shared counter would
// even that out, but a thread would then no longer work on the rows it wrote
// in the previous call, which are in its own cache (that was 2-4% slower).
// So each call site keeps its cuts from call to call and moves them towards
// where the threads would have finished together: each chunk is timed, its
// time is taken as spread evenly over its indices, and each cut moves a fifth
// of the way to the index where the times, added up, reach its share of the
// total. A cut stays within half a chunk of the even split. When the cores
// run alike, the cuts stay near the middle, and the rows near the cut are the
// only ones that change hands. Results do not depend on where the cuts fall,
// for the reason above (every index is computed alike in any chunk). A call
// with fewer than 4 indices per thread is cut evenly: an index or two is too
// coarse to balance.
template <class Fn>
static void parallel_for(int n, const Fn& f) {
    static void (*volatile range)(const void*, int, int) = run_range<Fn>;  // volatile: read at run time
    int nt = std::min(g_threads, n);
    if (nt <= 1 || t_in_parallel) {
        if (n > 0) range(&f, 0, n);
        return;
    }
    static Cuts s;  // one per call site: each lambda is a type of its own, so each site its own parallel_for
    if ((int)s.at.size() != g_threads + 1) {
        s.at.resize(g_threads + 1), s.cut.resize(g_threads + 1), s.secs.resize(g_threads);
        for (int i = 0; i <= g_threads; i++) s.at[i] = (double)i / g_threads;
    }
    const bool adapt = n >= 4 * g_threads;  // then nt == g_threads
    for (int i = 0; i <= nt; i++) s.cut[i] = adapt ? (int)std::lround(s.at[i] * n) : (int)((int64_t)n * i / nt);
    // (s is static, so the lambda needs no copy of it: a std::function holds
    // up to 16 bytes of captures in place, and allocates for more.)
    std::function<void(int)> chunk = [&f](int i) {
        const auto t0 = std::chrono::steady_clock::now();
        t_in_parallel = true;
        range(&f, s.cut[i], s.cut[i + 1]);
        t_in_parallel = false;
        s.secs[i] = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();  // its own entry
    };
    g_pool.run(nt, chunk);
    double total = 0, before = 0;  // all chunks' time; the time of chunks 0..i-1
    for (int i = 0; i < nt; i++) total += s.secs[i];
    if (!adapt || !(total > 0)) return;
    for (int j = 1, i = 0; j < nt; j++) {  // cut j: where the time adds up to j/nt of the total
        const double share = total * j / nt;
        while (i < nt - 1 && before + s.secs[i] < share) before += s.secs[i++];
        const double into = s.secs[i] > 0 ? std::max(0.0, share - before) / s.secs[i] : 0;
        const double want = (s.cut[i] + into * (s.cut[i + 1] - s.cut[i])) / n;
        const double moved = s.at[j] + 0.2 * (want - s.at[j]);
        s.at[j] = std::clamp(moved, (j - 0.5) / nt, (j + 0.5) / nt);
    }
}

// A parallel_for over a loop that does `work` simple operations in all: a
// small one runs on the calling thread, since handing it over would cost
// more than it saves. (It calls f directly, not through run_range: which
// path a call takes depends on its size alone, never on the thread count.)
template <class Fn>
static void parallel_for_if_big(int64_t work, int n, const Fn& f) {
    if (work < (1 << 14)) {
        if (n > 0) f(0, n);
    } else {
        parallel_for(n, f);
    }
}

// ----------------------------------------------------------------------------
// 14. The tiled matmul
//
// Replaces: matmul (section 4) where B is row-major, and linear_forward,
// whose B is a weight's transpose. Held to them: test_fast's matmul case,
// bit for bit over shapes that reach every path below, 1 and 2 threads.
//
// The plain loop is slow because each output is loaded and stored Kd times,
// and the transposed weight is read across its rows. The fast version keeps
// a tile of TM x TN outputs in vector registers (sizes below, per CPU),
// streams a row of B and TM values of A per k, and writes the tile once.
// Per k that is 2 TM vector multiply-adds for 2 loads of B and TM of A: the
// loads no longer limit the speed, and the multiply-adds keep the CPU's
// vector units busy.
//
// Each TN-column panel of B is first copied ("packed") into consecutive
// memory, Kd rows of TN, and A too when it is read as a transpose (as = 1),
// each row tile as Kd groups of its TM values. The kernel then reads
// consecutive memory. Without the copies, rows that lie a multiple of 1 or
// 4 KB apart (256 or 1024 floats: an expert's width) fall into a few sets of
// the L1 cache, which evicts them before they are used again. (A plain
// row-major A is read in place: copying it costs more than it saves.)
// A weight that the forward pass reads as B is kept in panels during the
// pass (Panels, ForwardCopy below), so it need not be copied each time.
// Packing also handles the edges: a short last row tile (an expert's rows
// rarely fill whole tiles) is padded with zero rows, a narrow last panel (the
// router has E columns, lm_head V) with zero columns, and only real outputs
// are stored. Every output is the same sum in the same k order wherever it
// sits, as in the plain loop; the tiles are fixed by M and N alone; threads
// take whole row tiles or whole panels; so the result is the same for any
// thread count.

// The kernel is written for the CPU's vector registers, at their width, with
// GCC and Clang's vector extension: a `vreal` is VL floats that +, * and =
// act on lane by lane, and the compiler emits the width's instructions
// (AVX-512, AVX or SSE on x86, NEON on ARM), whatever width its tuning would
// pick for a plain loop. A tile is TM rows by TN = 2 vectors of columns, and
// TM is as many rows as the accumulators, two loads of B and a value of A
// leave room for in the registers: with AVX-512, 12 rows (24 accumulators
// of x86's 32 registers); with AVX or AVX2, 6 rows (12 of 16); elsewhere
// 16-byte vectors, SSE2 on x86 and NEON on ARM, 6 rows. (A compiler without
// the extension, such as MSVC, builds part one alone: section 1.)
#if defined(__AVX512F__)
constexpr int VBYTES = 64, TM = 12;
#elif defined(__AVX__)
constexpr int VBYTES = 32, TM = 6;
#else
constexpr int VBYTES = 16, TM = 6;
#endif
constexpr int VL = VBYTES / (int)sizeof(real), TN = 2 * VL;
typedef real vreal __attribute__((vector_size(VBYTES)));
// Loads and stores at any address (memcpy compiles to one unaligned move).
static inline vreal vload(const real* p) {
    vreal v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
static inline void vstore(real* p, vreal v) { std::memcpy(p, &v, sizeof v); }

// One tile: out[0..rows, 0..cols] (+)= A . B (+ bias), rows <= TM, cols <= TN.
// A holds the tile's rows, addressed A[r*as + k*ak]; row k of the panel of B
// is at B + k*ldb (ldb = TN when packed); out and bias point at the tile's
// first row and column, and ldo is out's row stride. Per k it loads two
// vectors of B and TM values of A, and does 2 TM vector multiply-adds,
// `c += b * a`: where the target has a fused multiply-add, the compiler
// makes each one instruction with one rounding, as it does the plain loop's
// `acc[n] += a * b[n]`, so the two still round alike.
// A sum over k may also be cut into blocks (see matmul_tiled): `from` holds
// the tile's partial sums [TM][TN] of the blocks before this one, to go on
// from (null: start at zero), and `to` takes them at the end instead of out
// (null: this is the last block). A float stored and loaded back is the same
// float, so each sum is still the plain loop's, term by term.
// (noinline: inlined into matmul, g++ runs out of registers for the row
// offsets and reloads them on every k.)
[[gnu::noinline]] static void matmul_tile(real* out, int ldo, const real* A, int64_t as, int64_t ak, const real* B,
                                          int ldb, int Kd, const real* bias, bool add, int rows, int cols,
                                          const real* from = nullptr, real* to = nullptr) {
    vreal c[TM][2] = {};  // fully unrolled below, so every c[r][h] is a register
    if (from)
#pragma GCC unroll 16
        for (int r = 0; r < TM; r++) c[r][0] = vload(from + r * TN), c[r][1] = vload(from + r * TN + VL);
    for (int k = 0; k < Kd; k++) {
        const vreal b0 = vload(B + (int64_t)k * ldb), b1 = vload(B + (int64_t)k * ldb + VL);
        const real* ac = A + k * ak;  // column k of this tile's rows of A
#pragma GCC unroll 16
        for (int r = 0; r < TM; r++) {
            const real a = ac[r * as];
            c[r][0] += b0 * a, c[r][1] += b1 * a;
        }
    }
    if (to) {
#pragma GCC unroll 16
        for (int r = 0; r < TM; r++) vstore(to + r * TN, c[r][0]), vstore(to + r * TN + VL, c[r][1]);
        return;
    }
    const vreal zero = {};
#pragma GCC unroll 16
    for (int r = 0; r < TM; r++) {
        if (r >= rows) break;
        real* o = out + (int64_t)r * ldo;
        if (cols == TN) {  // the common case, as whole vectors; the same sum as the plain loop's
            for (int h = 0; h < 2; h++)
                vstore(o + h * VL, (add ? vload(o + h * VL) : zero) + (bias ? vload(bias + h * VL) : zero) + c[r][h]);
        } else {
            real s[TN] = {};
            vstore(s, c[r][0]), vstore(s + VL, c[r][1]);
            for (int j = 0; j < cols; j++) o[j] = (add ? o[j] : 0) + (bias ? bias[j] : 0) + s[j];
        }
    }
}

// A weight gradient's sum runs over the step's tokens, Kd = B*T of them
// (768 at the nanoGPT shape), and its panel of B, Kd x TN, is then too big
// for the L1 cache (96 KB with AVX-512), so every row tile reads it from
// L2. Its k are cut into blocks of KC, whose panel takes 16 KB, half the L1
// of most x86 cores: the panel's block stays in L1 while every row tile
// uses it, and A's blocks, packed just before they are used, stay in L2.
// The tiles carry their partial sums from block to block (matmul_tile's
// from and to). On an Ice Lake that made the weight gradients' products
// at the nanoGPT shape 11-14% faster on one thread, and that step 4-6% (1-6%
// on two threads). (The forward products, whose Kd is C or F, were slower
// in blocks: they are left whole.)
constexpr int KC = 4096 / TN;
static std::atomic<int64_t> g_flops{0};  // multiply-adds x 2, counted from the shapes, for the benchmark

// The kernel over a row-major B (b_panels false) or a B in panels (true);
// the typed entry points below say which.
static void matmul_tiled(real* out, const real* A, int64_t as, int64_t ak, const real* B, int M, int N, int Kd,
                         const real* bias, bool add, bool b_panels) {
    if (M <= 0 || N <= 0) return;
    g_flops += 2 * (int64_t)M * N * Kd;
    const int tiles = (M + TM - 1) / TM, panels = (N + TN - 1) / TN;  // the last of each maybe short
    const bool pack_a = as == 1;
    // Row tiles [t0, t1) times panels [p0, p1) of out.
    auto work = [=](int t0, int t1, int p0, int p1) {
        // The packed copies live as long as the thread, so that after the
        // first step no matmul allocates. They only grow: resize zeroes
        // what it adds, which would be a memset on every call that follows
        // a smaller one.
        thread_local std::vector<real> apack, bpack;
        const int kc = pack_a && Kd > 2 * KC ? KC : Kd;  // k per block: all of them, or blocks of KC
        const size_t na = (size_t)(pack_a ? t1 - t0 : 1) * kc * TM, nb = (size_t)kc * TN;
        if (apack.size() < na) apack.resize(na);
        if (bpack.size() < nb) bpack.resize(nb);
        auto pack_tile = [&](real* p, int i, int rows, int k0, int kn) {  // row tile i of A, k0 <= k < k0 + kn -> p[kn][TM]
            const real* a = A + (int64_t)i * TM * as + (int64_t)k0 * ak;
            // The TM values of each k are consecutive: one copy each. (Written as
            // a loop over r, g++ vectorises across k instead, gathering the
            // values one at a time.)
            if (as == 1 && rows == TM)
                for (int k = 0; k < kn; k++) std::memcpy(p + (size_t)k * TM, a + (int64_t)k * ak, TM * sizeof(real));
            else
                for (int k = 0; k < kn; k++)
                    for (int r = 0; r < TM; r++) p[(size_t)k * TM + r] = r < rows ? a[r * as + (int64_t)k * ak] : 0;
        };
        const int last_rows = M - (tiles - 1) * TM;  // rows of the last tile
        if (!pack_a && t1 == tiles && last_rows < TM) pack_tile(apack.data(), tiles - 1, last_rows, 0, Kd);
        // The partial sums of every tile this call computes, between blocks.
        const bool split = kc < Kd;
        thread_local std::vector<real> part;
        const size_t np = split ? (size_t)(t1 - t0) * (p1 - p0) * TM * TN : 0;
        if (part.size() < np) part.resize(np);
        for (int k0 = 0; k0 < Kd; k0 += kc) {
            const int kn = std::min(kc, Kd - k0);
            const bool first = k0 == 0, last = k0 + kn == Kd;
            if (pack_a)
                for (int i = t0; i < t1; i++) pack_tile(&apack[(size_t)(i - t0) * kn * TM], i, std::min(TM, M - i * TM), k0, kn);
            // Column panels outside, row tiles inside: a panel of B then stays
            // in the cache while every row tile uses it.
            for (int pi = p0; pi < p1; pi++) {
                const int n0 = pi * TN, w = std::min(TN, N - n0);
                const real* panel = b_panels ? B + (int64_t)n0 * Kd + (int64_t)k0 * w : B + n0 + (int64_t)k0 * N;
                int ldb = b_panels ? w : N;
                // A narrow panel is always copied (it is padded); a full one is
                // not when it is stored as a panel already, nor when only one row
                // tile reads it (sampling's one row).
                if (w < TN || (!b_panels && t1 - t0 > 1)) {
                    real* pb = bpack.data();
                    if (w == TN)  // its own loop, so that it is vectorised
                        for (int k = 0; k < kn; k++)
                            for (int j = 0; j < TN; j++) pb[(size_t)k * TN + j] = panel[(int64_t)k * ldb + j];
                    else
                        for (int k = 0; k < kn; k++)
                            for (int j = 0; j < TN; j++) pb[(size_t)k * TN + j] = j < w ? panel[(int64_t)k * ldb + j] : 0;
                    panel = pb, ldb = TN;
                }
                for (int i = t0; i < t1; i++) {
                    const int rows = std::min(TM, M - i * TM);
                    const bool packed = pack_a || rows < TM;
                    const real* a = pack_a ? &apack[(size_t)(i - t0) * kn * TM]
                                    : rows < TM ? apack.data() + (size_t)k0 * TM
                                                : A + (int64_t)i * TM * as + (int64_t)k0 * ak;
                    real* pp = split ? &part[((size_t)(pi - p0) * (t1 - t0) + (i - t0)) * TM * TN] : nullptr;
                    matmul_tile(out + (int64_t)i * TM * N + n0, N, a, packed ? 1 : as, packed ? TM : ak, panel, ldb, kn,
                                bias ? bias + n0 : nullptr, add, rows, w, first ? nullptr : pp, last ? nullptr : pp);
                }
            }
        }
    };
    // Threads share out the row tiles: each then copies every panel of B,
    // but its rows of out stay in its own cache for the next layer, which
    // shares out the rows the same way. A weight gradient (A read as a
    // transpose) is not read again until AdamW: its panels are shared out
    // instead when that makes the threads copy less (each copies all of A).
    const int nt = std::min(g_threads, std::max(tiles, panels));
    if (pack_a && panels >= nt && (int64_t)Kd * N / nt + (int64_t)Kd * M < (int64_t)Kd * N + (int64_t)Kd * M / nt)
        parallel_for_if_big((int64_t)M * N * Kd, panels, [=](int p0, int p1) { work(0, tiles, p0, p1); });
    else
        parallel_for_if_big((int64_t)M * N * Kd, tiles, [=](int t0, int t1) { work(t0, t1, 0, panels); });
}

// A weight in matmul's panels: w^T [cols, rows] for a weight w [rows, cols]
// (rows: the Linear's outputs) cut into panels of 32 of its columns, each
// stored whole as [cols][32] (the last maybe narrower), so the kernel reads
// it as it is. It is a type of its own, so that a row-major weight cannot be
// passed where panels are meant, nor the other way round.
struct Panels {
    const real* p;
};
void fast::matmul(real* out, const real* A, int64_t as, int64_t ak, const real* B, int M, int N, int Kd,
                  const real* bias, bool add) {
    matmul_tiled(out, A, as, ak, B, M, N, Kd, bias, add, false);
}
static void matmul_panels(real* out, const real* A, int64_t as, int64_t ak, Panels B, int M, int N, int Kd,
                          const real* bias, bool add) {
    matmul_tiled(out, A, as, ak, B.p, M, N, Kd, bias, add, true);
}

// Write the panels of rows r0..r1 of a weight src [rows, cols] (r0 a
// multiple of 32: whole panels, each written front to back) into dst, which
// holds the panels of the whole weight. It is a transpose, and one value at
// a time (a load and a store each) it took a third of AdamW's time at
// names' shapes. So a whole panel goes in blocks of 4 x 4: four rows' 4
// columns are loaded as 16-byte vectors (SSE, NEON) and shuffled into the
// four columns' 4 rows. Within the cache that is 1.7 times as fast; in
// AdamW, whose stores go to panels the step has pushed out of the cache, it
// takes AdamW's share of a names step from about 11.5% to 10.5%. The edges
// (a narrow last panel, columns past a multiple of 4), and compilers without
// __builtin_shufflevector (g++ before 12), copy value by value. A copy
// changes no value: test_fast holds the panels to the weights.
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector) && !MOE_DOUBLE
#define MOE_SHUFFLE 1
#endif
#endif
#ifdef MOE_SHUFFLE
typedef float v4 __attribute__((vector_size(16)));
// d[c * ld + j] = s[j * ls + c] for c, j < 4: lanes 0,1 of rows 0 and 1
// interleaved (and of rows 2 and 3, then lanes 2,3), then the pairs joined.
static inline void transpose4(real* d, int64_t ld, const real* s, int64_t ls) {
    v4 r0, r1, r2, r3;
    std::memcpy(&r0, s, 16), std::memcpy(&r1, s + ls, 16), std::memcpy(&r2, s + 2 * ls, 16), std::memcpy(&r3, s + 3 * ls, 16);
    const v4 a = __builtin_shufflevector(r0, r1, 0, 4, 1, 5), b = __builtin_shufflevector(r0, r1, 2, 6, 3, 7);
    const v4 c = __builtin_shufflevector(r2, r3, 0, 4, 1, 5), e = __builtin_shufflevector(r2, r3, 2, 6, 3, 7);
    const v4 o0 = __builtin_shufflevector(a, c, 0, 1, 4, 5), o1 = __builtin_shufflevector(a, c, 2, 3, 6, 7);
    const v4 o2 = __builtin_shufflevector(b, e, 0, 1, 4, 5), o3 = __builtin_shufflevector(b, e, 2, 3, 6, 7);
    std::memcpy(d, &o0, 16), std::memcpy(d + ld, &o1, 16), std::memcpy(d + 2 * ld, &o2, 16), std::memcpy(d + 3 * ld, &o3, 16);
}
#endif
static void write_forward_panels(real* dst, const real* src, int rows, int cols, int r0, int r1) {
    for (int p0 = r0; p0 < r1; p0 += TN) {
        const int w = std::min(TN, rows - p0);
        real* d = dst + (size_t)p0 * cols;
        const real* s = src + (size_t)p0 * cols;
        int c0 = 0;
#ifdef MOE_SHUFFLE
        if (w == TN)
            for (; c0 + 4 <= cols; c0 += 4)
                for (int j = 0; j < TN; j += 4) transpose4(d + (size_t)c0 * TN + j, TN, s + (size_t)j * cols + c0, cols);
#endif
        for (int c = c0; c < cols; c++)
            for (int j = 0; j < w; j++) d[(size_t)c * w + j] = s[(size_t)j * cols + c];
    }
}

// A Linear weight is a 2-D tensor that is not an embedding table.
static bool is_linear_weight(const TensorInfo& t) {
    return t.shape.size() == 2 && t.name.find(".wte.") == std::string::npos && t.name.find(".wpe.") == std::string::npos;
}

// The forward pass's copy of the model's Linear weights in panels, at the
// same offsets as in params: the copy of the weight at params + i is at
// panels + i. It is made when a forward pass starts (ForwardPass, section
// 7), unless AdamW has just written it along with the weights (section 17),
// and is valid until the pass ends: anything may change the weights between
// passes. One copy is enough: one model runs at a time.
struct ForwardCopy {
    std::vector<real> panels;
    const real* src = nullptr;  // the params it was made from
    size_t n = 0;               // ... and their number
    bool fresh = false;         // holds the current values of src
    int depth = 0;              // forward passes running (a sample's tokens run inside the sample's pass)
};
static ForwardCopy g_copy;

static void refresh_forward_copy(const Model& m) {
    g_copy.panels.resize(m.n_params), g_copy.src = m.params.data(), g_copy.n = m.n_params;
    const TensorInfo* t = m.tensors.data();
    const real* src = m.params.data();
    real* dst = g_copy.panels.data();
    parallel_for((int)m.tensors.size(), [=](int i0, int i1) {  // the tensors are shared out
        for (int i = i0; i < i1; i++)
            if (is_linear_weight(t[i]))
                write_forward_panels(dst + t[i].offset, src + t[i].offset, t[i].shape[0], t[i].shape[1], 0, t[i].shape[0]);
    });
    g_copy.fresh = true;
}
void fast::forward_begin(const Model& m) {
    if (g_copy.depth++ > 0) return;
    if (!(g_copy.fresh && g_copy.src == m.params.data() && g_copy.n == m.n_params)) refresh_forward_copy(m);
}
void fast::forward_end() {
    if (--g_copy.depth == 0) g_copy.fresh = false;
}

void fast::linear_forward(real* out, const real* inp, const real* w, const real* b, int M, int IN, int OUT) {
    const uintptr_t at = (uintptr_t)w, base = (uintptr_t)g_copy.src;
    if (g_copy.depth > 0 && at >= base && at < base + g_copy.n * sizeof(real))
        return matmul_panels(out, inp, IN, 1, Panels{g_copy.panels.data() + (w - g_copy.src)}, M, OUT, IN, b, false);
    // A weight that is not the running model's (a test calling a layer on
    // its own): panels made for this call.
    thread_local std::vector<real> tmp;
    tmp.resize((size_t)OUT * IN);
    write_forward_panels(tmp.data(), w, OUT, IN, 0, OUT);
    matmul_panels(out, inp, IN, 1, Panels{tmp.data()}, M, OUT, IN, b, false);
}

#if !MOE_INFERENCE_ONLY
// Sums over rows: bias_backward, and layernorm's dw and db. The plain code
// shares out the columns, each thread adding up its columns of every row in
// order. But then each thread reads the rows the other one wrote in the
// pass before, and where each core has its own cache every such row is a
// transfer between them (and the next pass that writes the row pays for
// one more). At the nanoGPT shape these sums took twice as long on two
// threads as on one. So the rows are cut into fixed blocks, each thread
// sums the blocks of its own rows, and the blocks' sums are then added in
// block order. That adds in another order than the plain code (held to it
// within a rounding bound: test_fast), but an order fixed by M alone, so
// the result does not depend on the thread count. A block is 32 rows, or
// fewer for a small M (down to 4), so that there are 16 blocks: enough for
// parallel_for to move its cuts (it wants 4 indices a thread) to where the
// passes around it cut the rows.
static int rows_per_block(int M) { return std::clamp(M / 16, 4, 32); }
// dst[c] += part[0][c] + part[1][c] + ... + part[nblk-1][c] (rows of ld),
// c < n: the sums of the blocks, in block order.
static void add_block_sums(real* dst, const real* part, int64_t ld, int nblk, int n) {
    for (int c = 0; c < n; c++) {
        real s = 0;
        for (int b = 0; b < nblk; b++) s += part[b * ld + c];
        dst[c] += s;
    }
}
// The blocks' sums, between the two steps of one call: the calling thread's
// own (the experts' passes run on several threads at once, each on its own
// rows), which the threads of its parallel_for write into.
static real* block_sums(size_t n) {
    thread_local std::vector<real> sums;
    if (sums.size() < n) sums.resize(n);
    return sums.data();
}

void fast::bias_backward(real* db, const real* dout, int M, int OUT) {
    const int RB = rows_per_block(M), nblk = (M + RB - 1) / RB;
    real* part = block_sums((size_t)nblk * OUT);
    parallel_for_if_big((int64_t)M * OUT, nblk, [=](int b0, int b1) {
        for (int b = b0; b < b1; b++) {
            const int m1 = std::min(M, (b + 1) * RB);
            for (int o0 = 0; o0 < OUT; o0 += 64) {  // 64 columns' sums at a time, in registers
                const int w = std::min(64, OUT - o0);
                real acc[64] = {};
                for (int m = b * RB; m < m1; m++) {
                    const real* d = dout + (int64_t)m * OUT + o0;
                    for (int j = 0; j < w; j++) acc[j] += d[j];
                }
                std::memcpy(part + (int64_t)b * OUT + o0, acc, w * sizeof(real));
            }
        }
    });
    add_block_sums(db, part, OUT, nblk, OUT);
}
#endif

// ----------------------------------------------------------------------------
// 15. Vectorised math
//
// Replaces: std::exp and std::tanh inside attention's softmax and GELU, and
// the in-order sums of dot (section 4), layernorm_forward and
// layernorm_backward (section 6). Held to them: test_fast, within 2e-6 relative for exp and
// tanh, and within a few float roundings of the row's scale for the sums;
// gradcheck runs these kernels (in double) against finite differences.

// --- exp on a vector of VL values at once (section 14's vreal); the C
// library's expf is one function call per element, and attention and the
// GELU make many. Write x = n ln2 + r with n an integer and |r| <= ln2/2;
// then exp(x) = 2^n exp(r), exp(r) is its Taylor polynomial of degree 6
// (error r^7/7! < 2e-7, a float's precision), and 2^n is written straight
// into the float's exponent bits. It is written on vectors rather than left
// to the compiler to vectorise as a loop of scalars: the clamps that keep x
// in range are comparisons, a float comparison may raise a floating-point
// exception, and g++ then keeps the loop scalar (unless -fno-trapping-math).
// (The double build, used by the gradient check, keeps std::exp.)
static inline vreal exp_v(vreal x) {  // for -87 < x < 88
#if MOE_DOUBLE
    for (int i = 0; i < VL; i++) x[i] = std::exp(x[i]);
    return x;
#else
    typedef int32_t vint __attribute__((vector_size(VBYTES)));
    // round(x / ln2): adding then subtracting 1.5 * 2^23 leaves no fraction
    // bits, so the float rounds to the nearest integer.
    const vreal n = (x * 1.44269504f + 12582912.f) - 12582912.f;
    const vreal r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln2, ln2 split in two for precision
    const vreal p = 1 + r * (1 + r * (0.5f + r * (1 / 6.f + r * (1 / 24.f + r * (1 / 120.f + r * (1 / 720.f))))));
    const vint bits = (__builtin_convertvector(n, vint) + 127) << 23;  // the floats 2^n
    return p * (vreal)bits;  // (a cast between vectors of one size keeps the bits)
#endif
}
static inline vreal vclamp(vreal x, real lo, real hi) {
    const vreal vlo = vreal{} + lo, vhi = vreal{} + hi;
    x = x < vlo ? vlo : x;
    return x > vhi ? vhi : x;
}

// A sum of n terms f(0) + ... + f(n-1), as 16 interleaved partial sums
// (term i goes to sum i % 16) that are added up at the end. One running
// total makes each addition wait for the one before (the compiler may not
// reorder float additions, as that changes the result); 16 independent sums
// fill one vector register, and the CPU overlaps them.
template <class Fn>
static inline real lane_sum(int n, const Fn& f) {
    constexpr int L = 16;
    real acc[L] = {};
    int i = 0;
    for (; i + L <= n; i += L)
        for (int j = 0; j < L; j++) acc[j] += f(i + j);
    for (int j = 0; i + j < n; j++) acc[j] += f(i + j);
    for (int w = L / 2; w > 0; w /= 2)  // then pairwise: 8 sums, 4, 2, 1
        for (int j = 0; j < w; j++) acc[j] += acc[j + w];
    return acc[0];
}

real fast::dot(const real* a, const real* b, int n) {
    return lane_sum(n, [a, b](int i) { return a[i] * b[i]; });
}

// layernorm_forward and _backward with their sums in lane_sum's 16 lanes.
// (Row-wise passes like these, however small, share out their rows as the
// layers around them do: a row then stays in the cache of the core that
// reads it next, and a row that one core wrote and another reads costs a
// transfer between their caches.)
void fast::layernorm_forward(real* out, real* mean, real* rstd, const real* inp, const real* w, const real* b,
                              int M) {
    parallel_for(M, [=](int m0, int m1) {  // rows are independent
        for (int m = m0; m < m1; m++) {
            const real* x = inp + (int64_t)m * C;
            const real mu = lane_sum(C, [x](int i) { return x[i]; }) / C;
            const real var = lane_sum(C, [x, mu](int i) { return (x[i] - mu) * (x[i] - mu); }) / C;
            real rs = 1 / std::sqrt(var + (real)1e-5);
            real* o = out + (int64_t)m * C;
            for (int i = 0; i < C; i++) o[i] = (x[i] - mu) * rs * w[i] + b[i];
            mean[m] = mu, rstd[m] = rs;
        }
    });
}
#if !MOE_INFERENCE_ONLY
void fast::layernorm_backward(real* dinp, real* dw, real* db, const real* dout, const real* inp, const real* w,
                               const real* mean, const real* rstd, int M) {
    // blocks of rows, each with its rows' dx and its sums of dw and db (see
    // bias_backward above)
    const int RB = rows_per_block(M), nblk = (M + RB - 1) / RB;
    real* part = block_sums((size_t)nblk * 2 * C);  // block b: dw's sums, then db's
    parallel_for(nblk, [=](int b0, int b1) {
        for (int b = b0; b < b1; b++) {
            real pw[C] = {}, pb[C] = {};
            for (int m = b * RB; m < std::min(M, (b + 1) * RB); m++) {
                const real* x = inp + (int64_t)m * C;
                const real* d = dout + (int64_t)m * C;
                const real mu = mean[m], rs = rstd[m];
                const real dn_mean = lane_sum(C, [d, w](int i) { return d[i] * w[i]; }) / C;
                const real dn_n_mean = lane_sum(C, [=](int i) { return d[i] * w[i] * ((x[i] - mu) * rs); }) / C;
                real* dx = dinp + (int64_t)m * C;
                for (int i = 0; i < C; i++) {
                    real n = (x[i] - mu) * rs, dn = d[i] * w[i];
                    dx[i] += rs * (dn - dn_mean - n * dn_n_mean);
                    pw[i] += d[i] * n, pb[i] += d[i];
                }
            }
            std::memcpy(part + (int64_t)b * 2 * C, pw, sizeof pw), std::memcpy(part + (int64_t)b * 2 * C + C, pb, sizeof pb);
        }
    });
    add_block_sums(dw, part, 2 * C, nblk, C);
    add_block_sums(db, part + C, 2 * C, nblk, C);
}
#endif

// GELU: the experts evaluate it S*F times per layer, so it has to be fast,
// and the C library's tanhf is one function call per element. In float,
// tanh(u) = 1 - 2 / (exp(2u) + 1) with exp_v; u is clamped to +-9, where
// tanh is 1 in float. (The double build keeps std::tanh.)
static inline vreal tanh_v(vreal u) {
#if MOE_DOUBLE
    for (int i = 0; i < VL; i++) u[i] = std::tanh(u[i]);
    return u;
#else
    return 1 - 2 / (exp_v(2 * vclamp(u, -9, 9)) + 1);
#endif
}
// out = gelu(inp), th = tanh(u) saved for backward; n elements, in parallel
// chunks, VL at a time (a last, partial vector goes through a padded copy).
void fast::gelu_forward(real* out, real* th, const real* inp, int64_t n) {
    const int64_t chunk = 4096;
    parallel_for((int)((n + chunk - 1) / chunk), [=](int c0, int c1) {
        auto gelu = [](const real* x_in, real* t_out, real* out_) {
            const vreal x = vload(x_in), t = tanh_v(GELU_S * (x + (real)0.044715 * x * x * x));
            vstore(t_out, t), vstore(out_, (real)0.5 * x * (1 + t));
        };
        const int64_t i0 = c0 * chunk, i1 = std::min(n, c1 * chunk);
        int64_t i = i0;
        for (; i + VL <= i1; i += VL) gelu(inp + i, th + i, out + i);
        if (i < i1) {
            const size_t bytes = (i1 - i) * sizeof(real);
            real x[VL] = {}, t[VL], o[VL];
            std::memcpy(x, inp + i, bytes);
            gelu(x, t, o);
            std::memcpy(th + i, t, bytes), std::memcpy(out + i, o, bytes);
        }
    });
}

// ----------------------------------------------------------------------------
// 16. Fast attention
//
// Replaces: attention_forward, attention_backward and attention_step
// (sections 6 and 11). Held to them: test_fast, within 1e-5 of the plain
// outputs and gradients (the polynomial exp, and sums in another order);
// test_model, the KV-cache steps against the full forward pass.

// Softmax of one row of attention scores times `scale`, in place, on whole
// vectors: the last, partial one goes through a padded copy whose extra
// lanes repeat a[0] (so that they leave the max alone) and are then dropped.
// The max is subtracted first so exp cannot overflow.
static void softmax_row(real* a, int n, real scale) {
    const int nw = n / VL * VL, nt = n - nw;  // whole vectors; values left
    vreal tail;
    for (int j = 0; j < VL; j++) tail[j] = j < nt ? a[nw + j] : a[0];
    vreal mx = tail * scale;
    for (int i = 0; i < nw; i += VL) {
        const vreal x = vload(a + i) * scale;
        mx = x > mx ? x : mx;
    }
    real maxv = mx[0];
    for (int j = 1; j < VL; j++) maxv = mx[j] > maxv ? mx[j] : maxv;
    // (-87: the least exp_v takes; e^-87 = 1.6e-38)
    auto ex = [maxv, scale](vreal x) { return exp_v(vclamp(x * scale - maxv, -87, 0)); };
    vreal sums = {};
    for (int i = 0; i < nw; i += VL) {
        const vreal e = ex(vload(a + i));
        vstore(a + i, e), sums += e;
    }
    vreal et = ex(tail);
    for (int j = nt; j < VL; j++) et[j] = 0;
    sums += et;
    real sum = 0;
    for (int j = 0; j < VL; j++) sum += sums[j];
    for (int i = 0; i < nw; i += VL) vstore(a + i, vload(a + i) / sum);
    et /= sum;
    std::memcpy(a + nw, &et, nt * sizeof(real));
}

// The training passes work on one head of one sequence at a time, as
// matrices: with Q, K, V that head's [T, hs] rows of queries, keys and
// values, and W the weights (the masked weights, with dropout),
//   forward:   Z = Q K^T (the scores), then Y = W V;
//   backward:  dA = dY V^T, then dQ = dZ K, dK = dZ^T Q and dV = W^T dY.
// Each product runs through section 14's tile kernel, which keeps a TM x TN
// tile of the result in registers while k runs: a row at a time, each sum
// over positions is a short chain of dependent multiply-adds, and its
// result goes to memory before the next row starts. A tile that causality
// makes all zero is skipped: row tile i (rows i..i+TM-1) needs the scores
// of positions below i + TM only, and as W and dZ are zero above the
// diagonal, the sums over positions s in W V and dZ K stop at i + TM, and
// those over t in dZ^T Q and W^T dY start at i.
// The kernel reads whole tiles and panels, so each matrix is copied into a
// buffer with TM-row tiles and TN-wide panels, zero where it lies past the
// head's T positions or hs channels. A sequence shorter than a row tile (a
// name of a few letters) would leave most of each tile as padding: it takes
// part one's loop instead, with its dot products done a vector of
// positions at a time (below).
constexpr int HSP = (HS + TN - 1) / TN * TN;  // hs rounded up to a panel
static int round_up(int n, int m) { return (n + m - 1) / m * m; }
struct HeadDims {
    int T, TP, LS;  // positions; T rounded up to a row tile; the row length of the [TP, LS] matrices
    explicit HeadDims(int t) : T(t), TP(round_up(t, TM)), LS(std::max(round_up(t, TM), round_up(t, TN))) {}
};
// A head's channels of rows 0..T (row t at src + t*ld), as rows of HSP.
static void head_rows(real* dst, const real* src, int64_t ld, const HeadDims& d) {
    for (int t = 0; t < d.TP; t++) {
        real* r = dst + (int64_t)t * HSP;
        if (t < d.T) std::memcpy(r, src + t * ld, HS * sizeof(real));
        std::fill(r + (t < d.T ? HS : 0), r + HSP, (real)0);
    }
}
// The same transposed, dst[j][s] = src[s][j], as rows of LS. (The rows are
// read 8 at a time, whole, before they are scattered: they come from
// memory, and loads of whole rows keep more of them in flight.)
static void head_cols(real* dst, const real* src, int64_t ld, const HeadDims& d) {
    std::memset(dst, 0, (size_t)HS * d.LS * sizeof(real));
    for (int s0 = 0; s0 < d.T; s0 += 8) {
        const int n = std::min(8, d.T - s0);
        real rows[8][HS];
        for (int r = 0; r < n; r++) std::memcpy(rows[r], src + (s0 + r) * ld, sizeof rows[r]);
        for (int j = 0; j < HS; j++)
            for (int r = 0; r < n; r++) dst[(int64_t)j * d.LS + s0 + r] = rows[r][j];
    }
}
// out [M, N] (+)= A [M, Kd] B [Kd, N] (A[r*as + k*ak], B's rows ldb apart),
// tile by tile; `shape` names the zeros it skips (above).
enum class Causal { scores, lower, upper };  // out = Z or dA; A = W or dZ; A = W^T or dZ^T
static void head_product(real* out, int ldo, const real* A, int64_t as, int64_t ak, const real* B, int ldb, int M,
                         int N, int Kd, bool add, Causal shape) {
    for (int i = 0; i < M; i += TM) {
        const int n1 = shape == Causal::scores ? std::min(N, i + TM) : N;
        const int k0 = shape == Causal::upper ? i : 0, k1 = shape == Causal::lower ? std::min(Kd, i + TM) : Kd;
        for (int n0 = 0; n0 < n1; n0 += TN)
            matmul_tile(out + (int64_t)i * ldo + n0, ldo, A + i * as + k0 * ak, as, ak, B + (int64_t)k0 * ldb + n0,
                        ldb, k1 - k0, nullptr, add, std::min(TM, M - i), std::min(TN, n1 - n0));
    }
}
// A [TP, LS] matrix starts as zeros: a product writes its first T rows and
// columns (or fewer: the tiles it skips), and the rest is read as padding.
static void zero_matrix(real* m, const HeadDims& d) { std::memset(m, 0, (size_t)d.TP * d.LS * sizeof(real)); }
constexpr int TP_MAX = (BLOCK_SIZE + TM - 1) / TM * TM;
constexpr int LS_MAX = std::max(TP_MAX, (BLOCK_SIZE + TN - 1) / TN * TN);

// --- A short sequence, T < TM positions. Part one's loop makes each score
// with a dot product of hs terms, which sums them in lane_sum's 16 lanes
// (section 15) and then adds the lanes in pairs: a few multiplies, then a
// chain of shuffles and adds in one vector, for one number. Here every
// position s of the row is a lane instead: out[s] = x . r_s for the rows
// r_s kept transposed (rt[j][s], SP positions a row), and each step of
// lane_sum is one vector operation over all the positions at once, the
// same step, so each out[s] is the same float that dot gives.
constexpr int SP = (TM - 1 + VL - 1) / VL * VL;  // the most positions of a short sequence, in whole vectors
// out has room for whole vectors: SP values.
static void dots_lanes(real* out, const real* x, const real* rt, int n) {
    constexpr int HF = HS / 16 * 16;  // the terms lane_sum takes 16 at a time; the rest follow one to a lane
    for (int s0 = 0; s0 < n; s0 += VL) {
        vreal acc[16];  // lane_sum's 16 sums, each now a vector over positions
#pragma GCC unroll 16
        for (int j = 0; j < 16; j++) acc[j] = vreal{};
        for (int i = 0; i < HF; i += 16)
#pragma GCC unroll 16
            for (int j = 0; j < 16; j++) acc[j] += x[i + j] * vload(rt + (i + j) * SP + s0);
#pragma GCC unroll 16
        for (int j = 0; j < HS - HF; j++) acc[j] += x[HF + j] * vload(rt + (HF + j) * SP + s0);
#pragma GCC unroll 16
        for (int w = 8; w > 0; w /= 2)
#pragma GCC unroll 16
            for (int j = 0; j < w; j++) acc[j] += acc[j + w];
        vstore(out + s0, acc[0]);
    }
}
// A head's channels of rows 0..T (row s at src + s*ld), transposed into
// rt[HS][SP], zero past T.
static void short_cols(real* rt, const real* src, int64_t ld, int T) {
    std::fill(rt, rt + HS * SP, (real)0);
    for (int s = 0; s < T; s++)
        for (int j = 0; j < HS; j++) rt[j * SP + s] = src[s * ld + j];
}
// attention_forward_head (section 6) for T < TM, its scores by dots_lanes.
static void attention_forward_short(real* y, real* att, const real* qkv, int T, int h, const real* drop) {
    const real scale = 1 / std::sqrt((real)HS);
    real kt[HS * SP];
    short_cols(kt, qkv + C + h * HS, 3 * C, T);
    for (int t = 0; t < T; t++) {
        real* a = att + (int64_t)t * T;
        real z[SP];
        dots_lanes(z, qkv + (int64_t)t * 3 * C + h * HS, kt, t + 1);
        for (int s = 0; s <= t; s++) a[s] = z[s] * scale;
        softmax_forward(a, a, 1, t + 1);
        for (int s = t + 1; s < T; s++) a[s] = 0;
        const real* d = drop ? drop + (int64_t)t * T : nullptr;
        real* yt = y + (int64_t)t * C + h * HS;
        for (int j = 0; j < HS; j++) yt[j] = 0;
        for (int s = 0; s <= t; s++) {
            const real* v = qkv + (int64_t)s * 3 * C + 2 * C + h * HS;
            const real w = d ? a[s] * d[s] : a[s];
            for (int j = 0; j < HS; j++) yt[j] += w * v[j];
        }
    }
}
#if !MOE_INFERENCE_ONLY
// attention_backward_head for T < TM, its dy_t . v_s by dots_lanes (they
// come first here; nothing else in the row reads or changes them).
static void attention_backward_short(real* dqkv, const real* dy, const real* att, const real* qkv, int T, int h,
                                     const real* drop) {
    const real scale = 1 / std::sqrt((real)HS);
    real vt[HS * SP];
    short_cols(vt, qkv + 2 * C + h * HS, 3 * C, T);
    for (int t = 0; t < T; t++) {
        const real* a = att + (int64_t)t * T;
        const real* dyt = dy + (int64_t)t * C + h * HS;
        const real* q = qkv + (int64_t)t * 3 * C + h * HS;
        real* dq = dqkv + (int64_t)t * 3 * C + h * HS;
        const real* d = drop ? drop + (int64_t)t * T : nullptr;
        real da[SP], sum = 0;
        dots_lanes(da, dyt, vt, t + 1);
        for (int s = 0; s <= t; s++) {
            real* dv = dqkv + (int64_t)s * 3 * C + 2 * C + h * HS;
            const real w = d ? a[s] * d[s] : a[s];
            if (d) da[s] *= d[s];
            for (int j = 0; j < HS; j++) dv[j] += w * dyt[j];
            sum += a[s] * da[s];
        }
        for (int s = 0; s <= t; s++) {
            const real dz = a[s] * (da[s] - sum) * scale;
            const real* k = qkv + (int64_t)s * 3 * C + C + h * HS;
            real* dk = dqkv + (int64_t)s * 3 * C + C + h * HS;
            for (int j = 0; j < HS; j++) dq[j] += dz * k[j], dk[j] += dz * q[j];
        }
    }
}
#endif

void fast::attention_forward(real* y, real* att, const real* qkv, const int* start, const int* len,
                             const int64_t* att_off, int B, const real* drop) {
    const real scale = 1 / std::sqrt((real)HS);
    for (int b = 0; b < B; b++) g_flops += 2 * (int64_t)N_HEAD * len[b] * (len[b] + 1) * HS;  // q.k and att.v
    parallel_for(B * N_HEAD, [=](int i0, int i1) {
        thread_local std::vector<real> buf;  // too big for the stack when BLOCK_SIZE is
        buf.resize(2 * (size_t)TP_MAX * HSP + (size_t)HS * LS_MAX + (size_t)TP_MAX * LS_MAX);
        real *q = buf.data(), *v = q + TP_MAX * HSP, *kt = v + TP_MAX * HSP, *z = kt + HS * LS_MAX;
        for (int i = i0; i < i1; i++) {
            const int b = i / N_HEAD, h = i % N_HEAD;
            if (len[b] < TM) {  // a short sequence (above)
                const int64_t blk = att_off[b] + (int64_t)h * len[b] * len[b];
                attention_forward_short(y + (int64_t)start[b] * C, att + blk, qkv + (int64_t)start[b] * 3 * C, len[b], h,
                                        drop ? drop + blk : nullptr);
                continue;
            }
            const HeadDims d(len[b]);
            const int T = d.T, LS = d.LS;
            const real* base = qkv + (int64_t)start[b] * 3 * C + h * HS;
            head_rows(q, base, 3 * C, d), head_rows(v, base + 2 * C, 3 * C, d), head_cols(kt, base + C, 3 * C, d);
            zero_matrix(z, d);
            head_product(z, LS, q, HSP, 1, kt, LS, T, T, HS, false, Causal::scores);
            for (int t = 0; t < T; t++) {
                real* zt = z + (int64_t)t * LS;  // the scores of row t, then its weights
                real* a = att + att_off[b] + ((int64_t)h * T + t) * T;
                softmax_row(zt, t + 1, scale);
                for (int s = t + 1; s < T; s++) zt[s] = 0;  // (the tile's scores of later positions)
                std::memcpy(a, zt, T * sizeof(real));
                if (drop)
                    for (int s = 0; s <= t; s++) zt[s] *= drop[(a - att) + s];
            }
            head_product(y + (int64_t)start[b] * C + h * HS, C, z, LS, 1, v, HSP, T, HS, T, false, Causal::lower);
        }
    });
}
#if !MOE_INFERENCE_ONLY
// The backward pass, as section 6 derives it, with dA as one product and
// the softmax's backward a row at a time between the products.
void fast::attention_backward(real* dqkv, const real* dy, const real* att, const real* qkv, const int* start,
                              const int* len, const int64_t* att_off, int B, const real* drop) {
    const real scale = 1 / std::sqrt((real)HS);
    for (int b = 0; b < B; b++) g_flops += 4 * (int64_t)N_HEAD * len[b] * (len[b] + 1) * HS;  // twice the forward
    parallel_for(B * N_HEAD, [=](int i0, int i1) {
        thread_local std::vector<real> buf;
        buf.resize(3 * (size_t)TP_MAX * HSP + (size_t)HS * LS_MAX + 2 * (size_t)TP_MAX * LS_MAX);
        real *q = buf.data(), *k = q + TP_MAX * HSP, *g = k + TP_MAX * HSP, *vt = g + TP_MAX * HSP;  // g: dy's rows
        real *z = vt + HS * LS_MAX, *w = z + TP_MAX * LS_MAX;  // dA, then dZ; the weights
        for (int i = i0; i < i1; i++) {
            const int b = i / N_HEAD, h = i % N_HEAD;
            if (len[b] < TM) {
                const int64_t blk = att_off[b] + (int64_t)h * len[b] * len[b];
                attention_backward_short(dqkv + (int64_t)start[b] * 3 * C, dy + (int64_t)start[b] * C, att + blk,
                                         qkv + (int64_t)start[b] * 3 * C, len[b], h, drop ? drop + blk : nullptr);
                continue;
            }
            const HeadDims d(len[b]);
            const int T = d.T, LS = d.LS;
            const real* base = qkv + (int64_t)start[b] * 3 * C + h * HS;
            real* dbase = dqkv + (int64_t)start[b] * 3 * C + h * HS;
            head_rows(q, base, 3 * C, d), head_rows(k, base + C, 3 * C, d);
            head_rows(g, dy + (int64_t)start[b] * C + h * HS, C, d), head_cols(vt, base + 2 * C, 3 * C, d);
            zero_matrix(z, d), zero_matrix(w, d);
            head_product(z, LS, g, HSP, 1, vt, LS, T, T, HS, false, Causal::scores);  // dA
            // Row t's weights are 0 past t (the forward pass stored them so),
            // and so then are its dz and w, whatever the tile left in dA there:
            // the loops run over the whole row.
            for (int t = 0; t < T; t++) {
                const real* a = att + att_off[b] + ((int64_t)h * T + t) * T;
                const real* dr = drop ? drop + (a - att) : nullptr;
                real *zt = z + (int64_t)t * LS, *wt = w + (int64_t)t * LS;
                if (dr)
                    for (int s = 0; s < T; s++) zt[s] *= dr[s], wt[s] = a[s] * dr[s];
                else
                    std::memcpy(wt, a, T * sizeof(real));
                const real sum = lane_sum(T, [a, zt](int s) { return a[s] * zt[s]; });
                for (int s = 0; s < T; s++) zt[s] = a[s] * (zt[s] - sum) * scale;
            }
            head_product(dbase, 3 * C, z, LS, 1, k, HSP, T, HS, T, true, Causal::lower);          // dQ += dZ K
            head_product(dbase + C, 3 * C, z, 1, LS, q, HSP, T, HS, T, true, Causal::upper);      // dK += dZ^T Q
            head_product(dbase + 2 * C, 3 * C, w, 1, LS, g, HSP, T, HS, T, true, Causal::upper);  // dV += W^T dY
        }
    });
}
#endif

// attention_step's scores q . k_s over the cached keys, kept transposed
// (kt[j][s], a row of ld >= n positions, a multiple of 16, padded with
// zeros), 16 positions s at a time: the inner loop runs over 16 consecutive
// s and vectorises, and the 16 sums stay in a register while j runs. Each
// is still the sum over j in order (a dot product's own loop over j would
// not vectorise: that reorders the sum, which the compiler may not do to
// floats). The products of positions s < n go to out.
constexpr int S16 = 16;
constexpr int BLOCK_PAD = (BLOCK_SIZE + S16 - 1) / S16 * S16;  // BLOCK_SIZE rounded up to 16
static inline void dots16(real* out, const real* q, const real* kt, int ld, int n) {
    for (int s0 = 0; s0 < n; s0 += S16) {
        real c[S16] = {};
        for (int j = 0; j < HS; j++) {
            const real* k = kt + (int64_t)j * ld + s0;
            for (int i = 0; i < S16; i++) c[i] += q[j] * k[i];
        }
        for (int i = 0; i < S16 && s0 + i < n; i++) out[s0 + i] = c[i];
    }
}
// attention_step: one query, so a row at a time, over the cached keys kept
// transposed (kt, [C, BLOCK_PAD]: a new key is a column; whatever lies past
// pos is finite, and is computed but not used).
void fast::attention_step(real* y, real* att, const real* qkv, KVLayer& c, int pos) {
    c.kt.resize((size_t)C * BLOCK_PAD);
    for (int i = 0; i < C; i++) c.kt[(size_t)i * BLOCK_PAD + pos] = qkv[C + i];
    const real scale = 1 / std::sqrt((real)HS);
    for (int h = 0; h < N_HEAD; h++) {
        real* a = att + h * BLOCK_SIZE;
        dots16(a, qkv + h * HS, &c.kt[(size_t)h * HS * BLOCK_PAD], BLOCK_PAD, pos + 1);
        softmax_row(a, pos + 1, scale);
    }
    // Then y = sum_s att[s] v_s for every head at once, in a local array
    // (the compiler must assume y might overlap the cache, and would add one
    // float at a time): each s then adds to C/16 independent vectors, not to
    // one vector that must wait for its previous sum.
    real acc[C] = {};
    for (int s = 0; s <= pos; s++) {
        const real* vs = &c.v[(size_t)s * C];
        for (int h = 0; h < N_HEAD; h++) {
            const real as = att[h * BLOCK_SIZE + s];
            for (int j = 0; j < HS; j++) acc[h * HS + j] += as * vs[h * HS + j];
        }
    }
    std::memcpy(y, acc, sizeof acc);
}

// ----------------------------------------------------------------------------
// 17. AdamW, fused; zeroing and the NaN check
//
// Replaces: adamw_update (section 8), zero (section 2) and all_finite
// (section 12). Held to them: test_fast, bit for bit (each parameter goes
// through the same adam_update_one; zeros are zeros; the same verdicts).
//
// The step also writes the forward pass's copy of the weights in panels
// (section 14), so that the next forward pass need not make it: with many
// experts, the parameters are many and the tokens few, and every sweep over
// all of them shows in the time of a step. The work is cut into blocks: 64
// rows of a Linear weight, which are then written as two whole panels while
// they are still in the cache, or 4096 values of any other tensor. The
// blocks are fixed by the shapes, and each value is updated by the same
// expression in any block, so the result does not depend on the number of
// threads.
//
// Why the build line has -fno-math-errno: C's sqrt must set errno when its
// argument is negative, so without the flag g++ and clang++ emit a test and
// a possible library call for every square root, and that branch stops them
// from vectorising this loop. It then runs one value at a time, two to four
// times as slow. v is never negative, the flag changes no result, and a
// build without it prints a note when it trains.
// zero in blocks shared out among the threads: the backward pass zeroes
// megabytes of scratch per layer in the big configurations, and one thread
// alone would keep the other waiting. Inside a parallel_for it runs on the
// calling thread, like any other.
void fast::zero(real* p, size_t n) {
    constexpr size_t blk = 1 << 15;
    parallel_for((int)((n + blk - 1) / blk), [=](int b0, int b1) {
        const size_t i0 = b0 * blk, i1 = std::min(n, b1 * blk);
        std::memset(p + i0, 0, (i1 - i0) * sizeof(real));
    });
}

// all_finite with integer operations: in float, a value is NaN or infinite
// when its exponent bits are all 1, and testing the bits lets the loop
// vectorise (std::isfinite is a branch per value).
bool fast::all_finite(const real* g, size_t n) {
#if MOE_DOUBLE
    for (size_t i = 0; i < n; i++)
        if (!std::isfinite(g[i])) return false;
    return true;
#else
    uint32_t any = 0;
    for (size_t i = 0; i < n; i++) {
        uint32_t bits;
        std::memcpy(&bits, &g[i], 4);
        any |= (bits & 0x7f800000u) == 0x7f800000u;
    }
    return !any;
#endif
}
#if !MOE_INFERENCE_ONLY
struct AdamBlock {
    size_t begin, end;  // the values params[begin, end) of one tensor
    int rows, cols;     // a Linear weight [rows, cols] starting at `base`...
    size_t base;        // ...whose rows (begin-base)/cols .. (end-base)/cols these are; rows = 0 otherwise
    bool two_d;         // a 2-D tensor (which --decay 2d decays)
};
static std::vector<AdamBlock> adam_blocks(const std::vector<TensorInfo>& tensors) {
    std::vector<AdamBlock> b;
    for (const auto& t : tensors) {
        if (is_linear_weight(t)) {
            const int rows = t.shape[0], cols = t.shape[1];
            for (int r = 0; r < rows; r += 2 * TN) {  // two panels (write_forward_panels wants whole ones)
                const int r1 = std::min(rows, r + 2 * TN);
                b.push_back({t.offset + (size_t)r * cols, t.offset + (size_t)r1 * cols, rows, cols, t.offset, true});
            }
        } else {
            for (size_t i = 0; i < t.size; i += 4096)
                b.push_back({t.offset + i, t.offset + std::min(t.size, i + 4096), 0, 0, t.offset, t.shape.size() >= 2});
        }
    }
    return b;
}
void fast::adamw_update(Model& m, const AdamW& o, int64_t t) {
    AdamStep s = adam_step(o, t), keep = s;
    keep.decay = 1;  // as the plain adamw_update, for the tensors that do not decay
    const bool decay_2d = o.decay_2d;
    static std::vector<AdamBlock> blocks;  // the same for every step of this model
    if (blocks.empty() || blocks.back().end != m.n_params) blocks = adam_blocks(m.tensors);
    g_copy.panels.resize(m.n_params), g_copy.src = m.params.data(), g_copy.n = m.n_params;
    const AdamBlock* blk = blocks.data();
    real *p = m.params.data(), *mm = m.adam_m.data(), *vv = m.adam_v.data(), *gr = m.grads.data();
    real* pt = g_copy.panels.data();
    parallel_for((int)blocks.size(), [=](int k0, int k1) {
        for (int k = k0; k < k1; k++) {
            const AdamBlock& a = blk[k];
            const AdamStep& st = !decay_2d || a.two_d ? s : keep;
            for (size_t i = a.begin; i < a.end; i++) adam_update_one(p[i], mm[i], vv[i], gr[i], st);
            if (a.rows == 0) continue;
            const int r0 = (int)((a.begin - a.base) / a.cols), r1 = (int)((a.end - a.base) / a.cols);
            write_forward_panels(pt + a.base, p + a.base, a.rows, a.cols, r0, r1);
        }
    });
    g_copy.fresh = true;
}

#endif

// ----------------------------------------------------------------------------
// 18. The experts, scheduled; the dense baseline's shortcuts
//
// Replaces: for_each_expert's loop over the experts, and, for the dense
// baseline (E = 1), the router and the gather and scatter of
// experts_forward and experts_backward (section 5). Held to them: test_fast
// (the same outputs and gradients, bit for bit: only who computes what, or
// a copy, is saved), test_model_dense (the layer is exactly a plain MLP).

// for_each_expert, on the threads. Small experts: the threads share out
// whole experts, with no hand-over between the layers of one expert. They
// take them from a shared counter, largest first, so a thread that is done
// takes the next: that evens out experts of unequal size, and a core that
// runs slower (on a shared machine) does fewer (1-2% of a step with 4
// experts, 4% with 16). Big experts (above 16M multiply-adds per layer): one
// after the other, each product sharing out its rows, since whole experts of
// unequal size would leave a thread idle.
namespace fast {
template <class Fn>
void for_each_expert(int S, const int* offset, const Fn& fn) {
    if ((int64_t)S * F * C >= (1 << 24)) {
        for (int e = 0; e < E; e++) fn(e);
        return;
    }
    auto rows = [offset](int e) { return offset[e + 1] - offset[e]; };
    int order[E];
    std::iota(order, order + E, 0);
    std::stable_sort(order, order + E, [&rows](int x, int y) { return rows(x) > rows(y); });
    std::atomic<int> next{0};  // shared by the threads on purpose: it hands out the experts
    parallel_for(g_threads, [&fn, &order, &next](int, int) {  // one chunk per thread
        for (int i; (i = next.fetch_add(1)) < E;) fn(order[i]);
    });
}
}  // namespace fast

// With one expert the router has nothing to decide: a softmax over one
// logit is 1 whatever the logit, so every gate is 1, and the gradient that
// reaches the logit is exactly 0. Its two products (the logit, and in
// backward the logit's gradient through the router) are skipped then,
// unless the z-loss, which reads the logit itself, is on.
constexpr bool ROUTER_IDLE = E == 1 && Z_COEF == 0;
void fast::router_forward(real* logits, const real* x, const LayerParams& w, int M) {
    if (ROUTER_IDLE) std::fill(logits, logits + (size_t)M * E, (real)0);
    else linear_forward(logits, x, w.router_w, nullptr, M, C, E);
}

// ... and every row goes to that expert with gate 1, so row m is slot m and
// out = 1 * y exactly: the expert reads its input and writes its output in
// place, with no gather and no scatter. The test is cheap, and exact:
// anything else takes the general path (false).
static bool one_expert_for_all(int S, int M, const real* gate) {
    return E == 1 && S == M && std::all_of(gate, gate + M, [](real g) { return g == 1; });
}
bool fast::experts_forward_dense(real* out, MoeActs& a, const real* inp, const real* gate, const LayerParams& p,
                                 int M) {
    if (!one_expert_for_all(a.offset[E], M, gate)) return false;
    mlp_forward(out, a.h.data(), a.th.data(), a.hg.data(), inp, p, 0, M);
    return true;
}
#if !MOE_INFERENCE_ONLY
void fast::router_backward(real* dx, LayerParams& g, const real* drouter, const real* x, const LayerParams& p, int M) {
    if (!ROUTER_IDLE) linear_backward(dx, g.router_w, nullptr, drouter, x, p.router_w, M, C, E);
}
// dy = dout, and dx goes straight to dinp; dgate is left alone (one
// expert's gate gets no gradient that could change anything).
bool fast::experts_backward_dense(real* dinp, LayerParams& g, MoeGrad& ws, const real* dout, const real* inp,
                                  const MoeActs& a, const real* gate, const LayerParams& p, int M) {
    const int S = a.offset[E];
    if (!one_expert_for_all(S, M, gate)) return false;
    ws.dhg.resize((size_t)S * F), ws.dh.resize((size_t)S * F);
    mlp_backward(dinp, g, ws.dhg.data(), ws.dh.data(), dout, inp, a.h.data(), a.th.data(), a.hg.data(), p, 0, M);
    return true;
}
#endif
#endif  // MOE_FAST
