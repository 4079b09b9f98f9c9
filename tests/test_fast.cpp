// Part two against part one: every fast kernel of moe.cpp beside the plain
// function it replaces, called on the same inputs in one binary (fast::on
// off runs part one's plain code). The promises, as the sections of part
// two state them:
//   bit for bit   matmul, linear_forward (panels made for the call, or the
//                 forward pass's copy), AdamW, zero, all_finite, the dense
//                 baseline's shortcuts; attention of short sequences against
//                 part one's loop over the fast dot
//   within bound  the vectorised exp/tanh, the sums in 16 lanes and the
//                 sums by blocks of rows: layernorm, bias_backward, dot,
//                 GELU, attention (forward, backward, one cached step); then
//                 the whole model, forward and backward, and 30 training
//                 steps
// A bound is a maximum difference relative to the largest magnitude of the
// plain result (so 1e-5 is about 80 float roundings of the output's scale).
#include "common.h"

#if !MOE_FAST
#error "test_fast compares part two with part one: build it with MOE_FAST=1"
#endif

static Rng g_r = make_rng(5, STREAM_INIT);
static std::vector<real> randv(size_t n, double scale = 1) {
    std::vector<real> v(n);
    for (auto& x : v) x = (real)(scale * g_r.normal());
    return v;
}
// max |a - b| / max |a|
static double rel(const std::vector<real>& a, const std::vector<real>& b) {
    double d = 0, s = 1e-30;
    for (size_t i = 0; i < a.size(); i++) d = std::max(d, (double)std::fabs(a[i] - b[i])), s = std::max(s, (double)std::fabs(a[i]));
    return d / s;
}
// Run f with fast::on = on, then leave it on.
template <class Fn>
static void with(bool on, const Fn& f) {
    fast::on = on;
    f();
    fast::on = true;
}

static void test_matmul() {
    const int shapes[][3] = {{1, 64, 256}, {5, 4, 64}, {8, 32, 64}, {13, 27, 7}, {37, 100, 33},
                             {113, 256, 64}, {64, 1024, 40}, {226, 64, 192}, {9, 33, 1},
                             // a weight gradient's long sum, cut into blocks of k
                             // (more than 2 KC, for every vector width), with a
                             // short last block, tile and panel
                             {37, 45, 1100}, {100, 20, 700}};
    int64_t bad = 0, cases = 0;
    for (const auto& sh : shapes) {
        const int M = sh[0], N = sh[1], Kd = sh[2];
        const std::vector<real> A = randv((size_t)M * Kd), B = randv((size_t)Kd * N), bias = randv(N), init = randv((size_t)M * N);
        for (int tr = 0; tr < 2; tr++)  // A row-major [M,Kd], or read as the transpose of a [Kd,M] matrix
            for (int mode = 0; mode < 3; mode++) {  // set, set + bias, add
                const int64_t as = tr ? 1 : Kd, ak = tr ? M : 1;
                const real* bp = mode == 1 ? bias.data() : nullptr;
                std::vector<real> want = init;
                with(false, [&] { matmul(want.data(), A.data(), as, ak, B.data(), M, N, Kd, bp, mode == 2); });
                for (int nt = 1; nt <= 2; nt++) {
                    g_threads = nt;
                    std::vector<real> got = init;
                    matmul(got.data(), A.data(), as, ak, B.data(), M, N, Kd, bp, mode == 2);
                    bad += got != want, cases++;
                }
                g_threads = 1;
            }
        // Linear's forward: the weight w [N, Kd] (so B = w^T), plain against panels
        std::vector<real> want((size_t)M * N), got((size_t)M * N);
        with(false, [&] { linear_forward(want.data(), A.data(), B.data(), bias.data(), M, Kd, N); });
        linear_forward(got.data(), A.data(), B.data(), bias.data(), M, Kd, N);
        bad += got != want, cases++;
    }
    check(bad == 0, "matmul and linear_forward equal the plain ones bit for bit in %lld of %lld cases (11 shapes, "
                    "2 layouts of A, set/bias/add, 1 and 2 threads)", (long long)(cases - bad), (long long)cases);
    const int M = 70, OUT = 200;
    const std::vector<real> d = randv((size_t)M * OUT);
    std::vector<real> a(OUT, 1), b(OUT, 1), b2(OUT, 1);
    with(false, [&] { bias_backward(a.data(), d.data(), M, OUT); });
    bias_backward(b.data(), d.data(), M, OUT);
    g_threads = 2;
    bias_backward(b2.data(), d.data(), M, OUT);
    g_threads = 1;
    check(rel(a, b) < 1e-5 && b == b2, "bias_backward: within %.1e of the plain one (bound 1e-5), and the same bits on "
          "1 and 2 threads", rel(a, b));
}

static void test_layers() {
    const int M = 37;
    const std::vector<real> x = randv((size_t)M * C, 2), w = randv(C), b = randv(C), dout = randv((size_t)M * C);
    std::vector<real> y[2], mean[2], rstd[2], dx[2], dw[2], db[2];
    for (int f = 0; f < 2; f++)
        with(f, [&] {
            y[f].resize((size_t)M * C), mean[f].resize(M), rstd[f].resize(M), dx[f].assign((size_t)M * C, 0);
            dw[f].assign(C, 0), db[f].assign(C, 0);
            layernorm_forward(y[f].data(), mean[f].data(), rstd[f].data(), x.data(), w.data(), b.data(), M);
            layernorm_backward(dx[f].data(), dw[f].data(), db[f].data(), dout.data(), x.data(), w.data(), mean[0].data(),
                               rstd[0].data(), M);
        });
    const double fw = std::max({rel(y[0], y[1]), rel(mean[0], mean[1]), rel(rstd[0], rstd[1])});
    const double bw = std::max({rel(dx[0], dx[1]), rel(dw[0], dw[1]), rel(db[0], db[1])});
    check(fw < 1e-5 && bw < 1e-5, "layernorm: forward within %.1e, backward within %.1e of the plain one (bound 1e-5)", fw, bw);

    const std::vector<real> u = randv(1000), v = randv(1000);
    real d[2];
    for (int f = 0; f < 2; f++) with(f, [&] { d[f] = dot(u.data(), v.data(), 1000); });
    double dd = std::fabs(d[0] - d[1]) / std::sqrt(1000.0);
    check(dd < 1e-5, "dot of 1000 terms: %.1e from the plain sum, relative to its spread (bound 1e-5)", dd);

    const int n = 5000;
    const std::vector<real> gx = randv(n, 3);
    std::vector<real> go[2], gth[2];
    for (int f = 0; f < 2; f++)
        with(f, [&] { go[f].resize(n), gth[f].resize(n), gelu_forward(go[f].data(), gth[f].data(), gx.data(), n); });
    const double gd = std::max(rel(go[0], go[1]), rel(gth[0], gth[1]));
    check(gd < 2e-6, "GELU and its saved tanh: within %.1e of std::tanh's (bound 2e-6)", gd);
}

static void test_attention() {
    // lengths below a row tile of the kernel (part one's loop), about one, and several, up to the longest context
    const std::vector<int> len = {9, 3, std::min(BLOCK_SIZE, 12), std::min(BLOCK_SIZE, 20), BLOCK_SIZE};
    const int B = (int)len.size();
    std::vector<int> start(B);
    for (int b = 1; b < B; b++) start[b] = start[b - 1] + len[b - 1];
    const int M = start[B - 1] + len[B - 1];
    std::vector<int64_t> att_off(B);
    int64_t n_att = 0;
    for (int b = 0; b < B; b++) att_off[b] = n_att, n_att += (int64_t)N_HEAD * len[b] * len[b];
    const std::vector<real> qkv = randv((size_t)M * 3 * C), dy = randv((size_t)M * C);
    std::vector<real> mask;
    Rng dr = make_rng(3, STREAM_DROPOUT);
    dropout_mask(mask, (size_t)n_att, (real)0.25, dr);
    for (int with_drop = 0; with_drop < 2; with_drop++) {
    const real* drop = with_drop ? mask.data() : nullptr;
    std::vector<real> y[2], att[2], dq[2];
    for (int f = 0; f < 2; f++)
        with(f, [&] {
            y[f].resize((size_t)M * C), att[f].resize(n_att), dq[f].assign((size_t)M * 3 * C, 0);
            attention_forward(y[f].data(), att[f].data(), qkv.data(), start.data(), len.data(), att_off.data(), B, drop);
            attention_backward(dq[f].data(), dy.data(), att[0].data(), qkv.data(), start.data(), len.data(), att_off.data(), B, drop);
        });
    const double fw = std::max(rel(y[0], y[1]), rel(att[0], att[1])), bw = rel(dq[0], dq[1]);
    check(fw < 1e-5 && bw < 1e-5, "attention%s: forward within %.1e, backward within %.1e of the plain one (bound 1e-5)",
          with_drop ? " with a dropout mask" : "", fw, bw);
    }
    // Sequences shorter than a row tile: their dot products a vector of
    // positions at a time, against part one's head loop with the fast dot
    // (the same floats in the same order: the same bits)
    {
        const std::vector<int> sl = {1, 2, std::min(BLOCK_SIZE, 5), std::min(BLOCK_SIZE, TM - 1)};
        const int SB = (int)sl.size();
        std::vector<int> st(SB);
        std::vector<int64_t> off(SB);
        int64_t na = 0;
        for (int b = 1; b < SB; b++) st[b] = st[b - 1] + sl[b - 1];
        for (int b = 0; b < SB; b++) off[b] = na, na += (int64_t)N_HEAD * sl[b] * sl[b];
        const int SM = st[SB - 1] + sl[SB - 1];
        bool same = true;
        for (int with_drop = 0; with_drop < 2; with_drop++) {
            const real* drop = with_drop ? mask.data() : nullptr;  // (mask has room: n_att > na)
            std::vector<real> y2[2], a2[2], d2[2];
            for (int k = 0; k < 2; k++) y2[k].resize((size_t)SM * C), a2[k].resize(na), d2[k].assign((size_t)SM * 3 * C, 0);
            attention_forward(y2[0].data(), a2[0].data(), qkv.data(), st.data(), sl.data(), off.data(), SB, drop);
            attention_backward(d2[0].data(), dy.data(), a2[0].data(), qkv.data(), st.data(), sl.data(), off.data(), SB, drop);
            for (int b = 0; b < SB; b++)
                for (int h = 0; h < N_HEAD; h++) {
                    const int64_t blk = off[b] + (int64_t)h * sl[b] * sl[b];
                    attention_forward_head(y2[1].data() + (int64_t)st[b] * C, a2[1].data() + blk,
                                           qkv.data() + (int64_t)st[b] * 3 * C, sl[b], h, drop ? drop + blk : nullptr);
                    attention_backward_head(d2[1].data() + (int64_t)st[b] * 3 * C, dy.data() + (int64_t)st[b] * C,
                                            a2[1].data() + blk, qkv.data() + (int64_t)st[b] * 3 * C, sl[b], h,
                                            drop ? drop + blk : nullptr);
                }
            same = same && y2[0] == y2[1] && a2[0] == a2[1] && d2[0] == d2[1];
        }
        check(same, "attention of sequences of 1 to %d positions (below a row tile): the same bits as part one's loop "
              "with the fast dot, forward and backward, with and without dropout", TM - 1);
    }
    // one cached step at a time, against the plain step
    KVLayer c[2];
    std::vector<real> ys[2], as[2];
    double worst = 0;
    for (int pos = 0; pos < BLOCK_SIZE; pos++) {
        const std::vector<real> row = randv(3 * C);
        for (int f = 0; f < 2; f++)
            with(f, [&] {
                ys[f].resize(C), as[f].assign(N_HEAD * BLOCK_SIZE, 0);
                attention_step(ys[f].data(), as[f].data(), row.data(), c[f], pos);
            });
        worst = std::max(worst, rel(ys[0], ys[1]));
    }
    check(worst < 1e-5, "attention_step over %d cached positions: within %.1e of the plain one (bound 1e-5)", BLOCK_SIZE, worst);
}

static void test_state_kernels() {
    Model m[2];
    for (int f = 0; f < 2; f++) {
        random_model(m[f], 20, 7);
        Rng r = make_rng(8, STREAM_TRAIN);
        for (auto* v : {&m[f].grads, &m[f].adam_m, &m[f].adam_v})
            for (auto& x : *v) x = (real)r.normal();
        for (auto& x : m[f].adam_v) x = x * x;
    }
    AdamW o;
    for (int f = 0; f < 2; f++) with(f, [&] { adamw_update(m[f], o, 3); });
    check(m[0].params == m[1].params && m[0].adam_m == m[1].adam_m && m[0].adam_v == m[1].adam_v &&
              m[0].grads == m[1].grads,
          "AdamW: weights, moments and zeroed gradients equal the plain update's bit for bit");
    // The fast update also wrote the forward pass's panels (section 17): each
    // Linear weight w [rows, cols], 32 rows at a time, as w^T [cols][32].
    int64_t wrong = 0, values = 0;
    for (const auto& t : m[1].tensors) {
        if (!is_linear_weight(t)) continue;
        const int rows = t.shape[0], cols = t.shape[1];
        const real *w = m[1].params.data() + t.offset, *p = g_copy.panels.data() + t.offset;
        for (int p0 = 0; p0 < rows; p0 += TN) {
            const int width = std::min(TN, rows - p0);
            for (int c = 0; c < cols; c++)
                for (int j = 0; j < width; j++, values++)
                    wrong += p[(size_t)p0 * cols + (size_t)c * width + j] != w[(size_t)(p0 + j) * cols + c];
        }
    }
    check(values > 0 && wrong == 0, "AdamW's panels: %lld of %lld values are the updated weights, transposed",
          (long long)(values - wrong), (long long)values);
    std::vector<real> z[2] = {randv(100000), randv(100000)};
    for (int f = 0; f < 2; f++) with(f, [&] { zero(z[f].data(), z[f].size()); });
    check(z[0] == z[1] && z[0] == std::vector<real>(100000, 0), "zero: both give zeros");
    std::vector<real> g = randv(5000);
    bool ok[2], bad[2];
    for (int f = 0; f < 2; f++) with(f, [&] { ok[f] = all_finite(g.data(), g.size()); });
    g[4321] = NAN;
    for (int f = 0; f < 2; f++) with(f, [&] { bad[f] = all_finite(g.data(), g.size()); });
    g[4321] = INFINITY;
    bool inf = all_finite(g.data(), g.size());
    check(ok[0] && ok[1] && !bad[0] && !bad[1] && !inf, "all_finite: the same verdicts (finite, NaN, infinity)");
}

// The whole model: one forward and backward pass, then 30 training steps,
// plain against fast. With one expert, the dense shortcuts (section 18)
// are taken and the experts' results must still match.
static void test_model_paths() {
    const int V = 27, B = 8, T = std::min(BLOCK_SIZE, 16);
    std::vector<int> in, tg;
    random_batch(in, tg, B, T, V, 6);
    Model m[2];
    double loss[2];
    for (int f = 0; f < 2; f++)
        with(f, [&] {
            random_model(m[f], V, 5);
            loss[f] = model_forward(m[f], in.data(), tg.data(), B, T, 0.01f);
            model_backward(m[f]);
        });
    double gw = 0;  // per tensor, relative to its largest gradient
    for (const auto& t : m[0].tensors) {
        std::vector<real> a(m[0].grads.begin() + t.offset, m[0].grads.begin() + t.offset + t.size);
        std::vector<real> b(m[1].grads.begin() + t.offset, m[1].grads.begin() + t.offset + t.size);
        gw = std::max(gw, rel(a, b));
    }
    check(std::fabs(loss[0] - loss[1]) < 1e-5 && gw < 1e-3,
          "model: loss %.7f against %.7f, every tensor's gradient within %.1e of the plain one (bounds 1e-5, 1e-3)",
          loss[1], loss[0], gw);
    // training: the two paths' losses stay together
    std::vector<double> l[2];
    for (int f = 0; f < 2; f++)
        with(f, [&] {
            Model mm;
            random_model(mm, V, 9);
            Rng rng = make_rng(10, STREAM_TRAIN);
            AdamW o;
            o.lr = 1e-3f;
            for (int step = 1; step <= 30; step++) {
                std::vector<int> bi, bt;
                random_batch(bi, bt, B, T, V, rng.next());
                l[f].push_back(model_forward(mm, bi.data(), bt.data(), B, T, 0.01f));
                model_backward(mm);
                adamw_update(mm, o, step);
            }
        });
    double worst = 0;
    for (size_t i = 0; i < l[0].size(); i++) worst = std::max(worst, std::fabs(l[0][i] - l[1][i]));
    check(worst < 1e-3, "30 training steps: the losses of the two paths stay within %.1e (bound 1e-3); last %.5f / %.5f",
          worst, l[1].back(), l[0].back());
}

int main() {
    set_threads(2);
    g_threads = 1;
    std::printf("part two against part one: %s\n", config_string().c_str());
    test_matmul();
    test_layers();
    test_attention();
    test_state_kernels();
    test_model_paths();
    return report("test_fast");
}
