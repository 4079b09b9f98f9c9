// Finite-difference gradient check of the whole model and of each layer's
// input gradient, in double precision. Built several times by CMake with
// small sizes: top-1 (gate = raw probability), top-2 (renormalised gates),
// the dense baseline (one expert), and one build per MoE variant (noisy
// gating, capacity, z-loss, shared experts, fine-grained experts, bias
// balancing, sigmoid gates, top-p with its entropy loss, per-sequence aux).
//
// The model is run as in training (train_rng set), so noise and capacity
// apply; every forward pass draws the same noise from a fresh copy of one
// generator, which makes the loss a deterministic function of the weights.
//
// For every parameter tensor, a sample of coordinates is nudged by +-h and
// the central difference (L(w+h) - L(w-h)) / 2h is compared with backward.
// Top-k routing is a step function: if a nudge changes which experts a
// token chose, the loss jumps and the difference means nothing, so such
// coordinates are skipped and counted. The error measure is
//   |analytic - numeric| / max(|analytic| + |numeric|, 1e-5):
// relative for normal gradients; for gradients below 1e-5 it is an absolute
// error, since the difference quotient's rounding noise (about 1e-11 here:
// double epsilon times the loss, over 2h) would swamp a relative one.
#include "common.h"

static_assert(MOE_DOUBLE, "the gradient check is built with -DMOE_DOUBLE=1");

constexpr double H = 1e-5, TOL = 1e-5;

static double rel_err(double a, double n) { return std::fabs(a - n) / std::max(std::fabs(a) + std::fabs(n), 1e-5); }

static std::vector<int> all_choices(const Model& m) {
    std::vector<int> c;
    for (const auto& a : m.L) {
        c.insert(c.end(), a.chosen.begin(), a.chosen.end());
        if (CAPACITY_FACTOR > 0) c.insert(c.end(), a.routed.begin(), a.routed.end());  // drops can flip too
    }
    return c;
}

// GRADCHECK_DROPOUT (a probability): the dropout build, whose masks are
// drawn afresh but identically for every forward pass (a fixed mask).
#ifndef GRADCHECK_DROPOUT
#define GRADCHECK_DROPOUT 0
#endif

// The forward pass as training runs it, with the same noise (and dropout
// masks) every time.
static double train_forward(Model& m, const std::vector<int>& in, const std::vector<int>& tg, int B, int T, real aux) {
    Rng noise = make_rng(77, STREAM_TRAIN), drop = make_rng(78, STREAM_DROPOUT);
    m.train_rng = &noise, m.drop_rng = &drop, m.dropout = (real)GRADCHECK_DROPOUT;
    double loss = model_forward(m, in.data(), tg.data(), B, T, aux);
    m.train_rng = nullptr, m.drop_rng = nullptr;
    return loss;
}

// The tensor group a parameter belongs to, for the per-group report.
static std::string group_of(const std::string& name) {
    for (const char* g : {"wte", "wpe", "ln_1", "c_attn", "attn.c_proj", "ln_2", "router", "noise", "shared", "c_fc",
                          "experts", "ln_f", "lm_head"})
        if (name.find(g) != std::string::npos)
            return std::string(g) == "experts" ? "experts.c_proj" : g;
    return name;
}

static void check_model() {
    const int V = 7, B = 3, T = BLOCK_SIZE;
    const real aux_coef = 0.5;  // large, so the aux gradient is visible beside the cross-entropy
    Model m;
    random_model(m, V, 42);
    std::vector<int> in, tg;
    random_batch(in, tg, B, T, V, 7);

    // the forward pass against the naive reference (all positions routed)
    model_forward(m, in.data(), nullptr, B, T, 0);
    std::vector<double> ref = naive_logits(m, in, B, T);
    double worst = 0;
    for (size_t i = 0; i < ref.size(); i++) worst = std::max(worst, std::fabs(ref[i] - m.logits[i]));
    check(worst < 1e-10, "forward matches the naive per-token reference: max |logit diff| %.2e", worst);

    train_forward(m, in, tg, B, T, aux_coef);
    std::vector<int> base = all_choices(m);
    if (CAPACITY_FACTOR > 0)  // else the capacity build would check nothing new
        check(m.dropped > 0, "capacity %.2f drops %lld of %lld routing slots in this batch", CAPACITY_FACTOR,
              (long long)m.dropped, (long long)m.slots);
    if (ENTROPY_COEF > 0)
        check(m.ent_sum * ENTROPY_COEF > 0.05 * m.ce, "entropy term %.3f is a visible part of the loss (ce %.3f)",
              m.ent_sum * ENTROPY_COEF, m.ce);
    if (TOP_P > 0) {  // the choice really varies: some tokens take one expert, some more
        int64_t one = 0, more = 0;
        for (const auto& a : m.L)
            for (int i = 0; i < m.M; i++)
                if (m.valid[i]) (K > 1 && a.chosen[(size_t)i * K + 1] >= 0 ? more : one)++;
        check(one > 0 && more > 0, "top-p %.2f: %lld routed tokens took one expert, %lld took more", TOP_P, (long long)one,
              (long long)more);
    }
    if (Z_COEF > 0)
        check(m.z_sum * Z_COEF > 0.05 * m.ce, "z-loss term %.3f is a visible part of the loss (ce %.3f)", m.z_sum * Z_COEF, m.ce);
    if (GRADCHECK_DROPOUT > 0) {  // the masks really drop, and a fixed mask makes the loss a function of the weights
        size_t zeros = 0;
        for (real v : m.emb_mask) zeros += v == 0;
        check(m.dropped_out && zeros > 0 && zeros < m.emb_mask.size(), "dropout %.2f zeroes %zu of %zu embedding values",
              (double)GRADCHECK_DROPOUT, zeros, m.emb_mask.size());
        const double l1 = train_forward(m, in, tg, B, T, aux_coef), l2 = train_forward(m, in, tg, B, T, aux_coef);
        m.dropout = 0;
        const double l0 = model_forward(m, in.data(), tg.data(), B, T, aux_coef);
        check(l1 == l2 && l1 != l0, "with the same masks the loss repeats (%.10f), and differs without dropout (%.10f)", l1, l0);
        train_forward(m, in, tg, B, T, aux_coef);
    }
    std::fill(m.grads.begin(), m.grads.end(), 0.0);
    model_backward(m);

    std::map<std::string, double> group_err;
    int tested = 0, skipped = 0;
    Rng r = make_rng(5, STREAM_SAMPLE);
    for (const auto& t : m.tensors) {
        int samples = (int)std::min<size_t>(t.size, 24);
        for (int s = 0; s < samples; s++) {
            size_t i = t.offset + (t.size <= 24 ? (size_t)s : r.below(t.size));
            double keep = m.params[i], lp, lm;
            m.params[i] = keep + H;
            lp = train_forward(m, in, tg, B, T, aux_coef);
            bool flip = all_choices(m) != base;
            m.params[i] = keep - H;
            lm = train_forward(m, in, tg, B, T, aux_coef);
            flip |= all_choices(m) != base;
            m.params[i] = keep;
            if (flip) {
                skipped++;
                continue;
            }
            double e = rel_err(m.grads[i], (lp - lm) / (2 * H));
            tested++;
            double& g = group_err[group_of(t.name)];
            g = std::max(g, e);
            if (e > TOL) std::printf("  %s[%zu]: analytic %.10e numeric %.10e\n", t.name.c_str(), i - t.offset, m.grads[i], (lp - lm) / (2 * H));
        }
    }
    for (const auto& kv : group_err)
        check(kv.second < TOL, "gradient of %-15s max relative error %.2e", kv.first.c_str(), kv.second);
    check(tested > 0 && skipped * 5 < tested, "%d coordinates checked, %d skipped because routing flipped", tested,
          skipped);

    // The router must learn from the language-model loss alone when K = 1
    // (gate = probability). When E = 1 the softmax over one expert is the
    // constant 1, so its router gets nothing: a plain FFN.
    train_forward(m, in, tg, B, T, 0);
    std::fill(m.grads.begin(), m.grads.end(), 0.0);
    model_backward(m);
    double rnorm = 0;
    for (int l = 0; l < N_LAYER; l++)
        for (int i = 0; i < E * C; i++) rnorm += std::fabs(m.g.h[l].router_w[i]);
    if (E == 1) check(rnorm == 0, "dense build: the router gets no gradient (|grad| sum %.3e)", rnorm);
    else if (K == 1 || NORM_TOPK) check(rnorm > 1e-6, "router gradient from cross-entropy alone: |grad| sum %.3e", rnorm);
}

// Input-side gradient of one layer: L = sum(w * f(x)) with fixed random w;
// backward given dout = w must equal dL/dx by central differences.
using Fn = std::function<std::vector<real>(const std::vector<real>&)>;
using BwdFn = std::function<std::vector<real>(const std::vector<real>& x, const std::vector<real>& dout)>;

static void check_input(const char* name, const std::vector<real>& x, const Fn& fwd, const BwdFn& bwd, uint64_t seed) {
    Rng r = make_rng(seed, STREAM_SAMPLE);
    std::vector<real> y = fwd(x), w(y.size());
    for (auto& v : w) v = r.normal();
    std::vector<real> dx = bwd(x, w);  // right after fwd(x): backward sees the state it saved
    auto L = [&](const std::vector<real>& xx) {
        std::vector<real> yy = fwd(xx);
        double s = 0;
        for (size_t i = 0; i < yy.size(); i++) s += w[i] * yy[i];
        return s;
    };
    double worst = 0;
    for (size_t i = 0; i < x.size(); i++) {
        std::vector<real> xp = x, xm = x;
        xp[i] += H, xm[i] -= H;
        worst = std::max(worst, rel_err(dx[i], (L(xp) - L(xm)) / (2 * H)));
    }
    check(worst < TOL, "input gradient of %-14s max relative error %.2e", name, worst);
}

static void check_layers() {
    Rng r = make_rng(9, STREAM_SAMPLE);
    auto randv = [&](size_t n, double scale) {
        std::vector<real> v(n);
        for (auto& x : v) x = scale * r.normal();
        return v;
    };
    const int M = 6, IN = C, OUT = 5, V = 6;
    std::vector<real> w = randv(C, 1), b = randv(C, 1), mean(M), rstd(M), dw(C), db(C);
    check_input("layernorm", randv(M * C, 1),
        [&](const std::vector<real>& x) { std::vector<real> y(M * C); layernorm_forward(y.data(), mean.data(), rstd.data(), x.data(), w.data(), b.data(), M); return y; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(M * C); layernorm_backward(dx.data(), dw.data(), db.data(), d.data(), x.data(), w.data(), mean.data(), rstd.data(), M); return dx; }, 1);

    std::vector<real> W = randv(OUT * IN, 0.5), bias = randv(OUT, 0.5), dW(OUT * IN), dbias(OUT);
    check_input("linear", randv(M * IN, 1),
        [&](const std::vector<real>& x) { std::vector<real> y(M * OUT); linear_forward(y.data(), x.data(), W.data(), bias.data(), M, IN, OUT); return y; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(M * IN); linear_backward(dx.data(), dW.data(), dbias.data(), d.data(), x.data(), W.data(), M, IN, OUT); return dx; }, 2);

    // packed sequences of different lengths, 4 + 2 = M rows; and with a
    // longer context, one of BLOCK_SIZE positions, where the fast build's
    // attention runs its tiles (section 16), not part one's loop
    std::vector<int> start = {0, 4}, len = {4, 2};
    if (BLOCK_SIZE > M) start.push_back(M), len.push_back(BLOCK_SIZE);
    const int NB = (int)len.size(), MA = start[NB - 1] + len[NB - 1];
    std::vector<int64_t> att_off(NB);
    for (int i = 1; i < NB; i++) att_off[i] = att_off[i - 1] + (int64_t)N_HEAD * len[i - 1] * len[i - 1];
    std::vector<real> att(att_off[NB - 1] + (size_t)N_HEAD * len[NB - 1] * len[NB - 1]);
    check_input("attention", randv(MA * 3 * C, 1),
        [&](const std::vector<real>& x) { std::vector<real> y(MA * C); attention_forward(y.data(), att.data(), x.data(), start.data(), len.data(), att_off.data(), NB, nullptr); return y; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(MA * 3 * C); attention_backward(dx.data(), d.data(), att.data(), x.data(), start.data(), len.data(), att_off.data(), NB, nullptr); return dx; }, 3);
    if (GRADCHECK_DROPOUT > 0) {  // attention with a fixed dropout mask on its weights
        std::vector<real> mask;
        Rng dr = make_rng(5, STREAM_DROPOUT);
        dropout_mask(mask, att.size(), (real)GRADCHECK_DROPOUT, dr);
        check_input("attention, dropout", randv(MA * 3 * C, 1),
            [&](const std::vector<real>& x) { std::vector<real> y(MA * C); attention_forward(y.data(), att.data(), x.data(), start.data(), len.data(), att_off.data(), NB, mask.data()); return y; },
            [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(MA * 3 * C); attention_backward(dx.data(), d.data(), att.data(), x.data(), start.data(), len.data(), att_off.data(), NB, mask.data()); return dx; }, 14);
    }

    std::vector<real> th(M * 4);
    check_input("gelu", randv(M * 4, 2),
        [&](const std::vector<real>& x) { std::vector<real> y(x.size()); gelu_forward(y.data(), th.data(), x.data(), (int64_t)x.size()); return y; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(x.size()); gelu_backward(dx.data(), x.data(), th.data(), d.data(), (int64_t)x.size()); return dx; }, 4);

    std::vector<real> probs(M * E);
    check_input("router softmax", randv(M * E, 1),
        [&](const std::vector<real>& x) { softmax_forward(probs.data(), x.data(), M, E); return probs; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(x.size()); (void)x; softmax_backward(dx.data(), d.data(), probs.data(), M, E); return dx; }, 5);

    // top-k: inputs well separated (gaps >> H), so no nudge changes the choice
    std::vector<uint8_t> valid(M, 1);
    valid[M - 1] = 0;  // one unrouted (padding) row
    std::vector<int> chosen(M * K);
    std::vector<real> gate(M * K), sep(M * E);
    for (int m = 0; m < M; m++) {
        std::vector<int> perm(E);
        std::iota(perm.begin(), perm.end(), 0);
        for (int i = E; i > 1; i--) std::swap(perm[i - 1], perm[r.below(i)]);
        for (int e = 0; e < E; e++) sep[m * E + e] = 0.05 + 0.1 * perm[e] + 0.01 * r.uniform();
    }
    check_input("top-k gate", sep,
        [&](const std::vector<real>& x) { topk_forward(chosen.data(), gate.data(), x.data(), valid.data(), M); return gate; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(x.size()); topk_backward(dx.data(), d.data(), chosen.data(), gate.data(), x.data(), M); return dx; }, 6);

    std::vector<real> f(E);
    check_input("aux loss", sep,  // chosen from the top-k run above; f is a constant
        [&](const std::vector<real>& x) { return std::vector<real>{aux_forward(f.data(), x.data(), chosen.data(), valid.data(), M)}; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(x.size()); aux_backward(dx.data(), f.data(), valid.data(), M, d[0]); return dx; }, 7);

    Model m;
    random_model(m, 5, 11);
    MoeActs acts;
    MoeGrad ws;
    std::vector<real> x0 = randv(M * C, 1), g0 = gate;
    check_input("experts (x)", x0,
        [&](const std::vector<real>& x) { std::vector<real> y(M * C); experts_forward(y.data(), acts, x.data(), chosen.data(), g0.data(), m.p.h[0], M); return y; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(M * C), dg(M * K); experts_backward(dx.data(), dg.data(), m.g.h[0], ws, d.data(), x.data(), acts, g0.data(), m.p.h[0], M); return dx; }, 8);
    check_input("experts (gate)", g0,
        [&](const std::vector<real>& g) { std::vector<real> y(M * C); experts_forward(y.data(), acts, x0.data(), chosen.data(), g.data(), m.p.h[0], M); return y; },
        [&](const std::vector<real>& g, const std::vector<real>& d) { std::vector<real> dx(M * C), dg(M * K); experts_backward(dx.data(), dg.data(), m.g.h[0], ws, d.data(), x0.data(), acts, g.data(), m.p.h[0], M); return dg; }, 9);

    // The whole MoE block, as the model runs it (with this build's variants:
    // noise drawn afresh but identically each time, capacity, shared experts).
    // aux and z-loss are left out here (coefficients 0): they are not part of
    // the block's output, and have checks of their own.
    std::vector<real> xb = randv(M * C, 1), mo(M * C);
    LayerActs la;
    check_input("MoE block (x)", xb,
        [&](const std::vector<real>& x) { Rng n = make_rng(3, STREAM_TRAIN); moe_forward(mo.data(), la, x.data(), m.p.h[0], valid.data(), M, &n, CAPACITY_FACTOR); return mo; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(M * C); moe_backward(dx.data(), m.g.h[0], d.data(), la, x.data(), m.p.h[0], valid.data(), M, 0, 0); return dx; }, 11);
    if (NOISY_GATE) {  // the noise, given the draws: w.r.t. the logits and w.r.t. u = x . Wn^T
        std::vector<real> eps(M * E), nz(M * E), u = randv(M * E, 1), lg = randv(M * E, 1);
        Rng n0 = make_rng(4, STREAM_TRAIN);
        noise_forward(nz.data(), eps.data(), lg.data(), u.data(), valid.data(), M, n0);
        check_input("noise (u)", u,
            [&](const std::vector<real>& uu) { Rng n = make_rng(4, STREAM_TRAIN); noise_forward(nz.data(), eps.data(), lg.data(), uu.data(), valid.data(), M, n); return nz; },
            [&](const std::vector<real>& uu, const std::vector<real>& d) { std::vector<real> du(M * E); noise_backward(du.data(), d.data(), eps.data(), uu.data(), M); return du; }, 12);
    }
    if (Z_COEF > 0) {
        std::vector<real> lse(M);
        check_input("z-loss", randv(M * E, 2),
            [&](const std::vector<real>& z) { return std::vector<real>{zloss_forward(lse.data(), z.data(), valid.data(), M)}; },
            [&](const std::vector<real>& z, const std::vector<real>& d) { std::vector<real> dz(z.size()); zloss_backward(dz.data(), lse.data(), z.data(), valid.data(), M, d[0]); return dz; }, 13);
    }

    // The aux loss per sequence (MOE_AUX_SCOPE=seq; checked in every build),
    // over two sequences of 4 and 2 rows, the last row padding.
    std::vector<real> fs(2 * E);
    const Seqs two{start.data(), len.data(), 2};
    check_input("aux, per seq", sep,
        [&](const std::vector<real>& x) { return std::vector<real>{aux_seq_forward(fs.data(), x.data(), chosen.data(), valid.data(), two)}; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(x.size()); aux_seq_backward(dx.data(), fs.data(), valid.data(), two, d[0]); return dx; }, 15);
    if (SIGMOID_GATE) {  // sigmoid scores, and their normalisation for the aux loss's P
        std::vector<real> sg(M * E), nm(M * E);
        check_input("sigmoid", randv(M * E, 2),
            [&](const std::vector<real>& z) { sigmoid_forward(sg.data(), z.data(), M * E); return sg; },
            [&](const std::vector<real>& z, const std::vector<real>& d) { std::vector<real> dz(z.size()); (void)z; sigmoid_backward(dz.data(), d.data(), sg.data(), M * E); return dz; }, 16);
        check_input("normalisation", sep,
            [&](const std::vector<real>& x) { normalize_forward(nm.data(), x.data(), M); return nm; },
            [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(x.size()); normalize_backward(dx.data(), d.data(), nm.data(), x.data(), M); return dx; }, 17);
    }
    if (TOP_P > 0 || ENTROPY_COEF > 0)
        check_input("entropy loss", sep,
            [&](const std::vector<real>& x) { return std::vector<real>{entropy_forward(x.data(), valid.data(), M)}; },
            [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(x.size()); entropy_backward(dx.data(), x.data(), valid.data(), M, d[0]); return dx; }, 18);

    std::vector<int> targets = {1, 0, -1, 5, 2, 3};
    std::vector<real> lprobs(M * V);
    check_input("cross-entropy", randv(M * V, 2),
        [&](const std::vector<real>& x) { int64_t n; return std::vector<real>{(real)crossentropy_forward(lprobs.data(), x.data(), targets.data(), M, V, &n)}; },
        [&](const std::vector<real>& x, const std::vector<real>& d) { std::vector<real> dx(x.size()); crossentropy_backward(dx.data(), lprobs.data(), targets.data(), M, V, d[0]); return dx; }, 10);
}

int main() {
    set_threads(1);
    std::printf("gradient check: L%d H%d C%d E%d K%d F%d norm_topk=%d block %d, double; %s\n", N_LAYER, N_HEAD, C, E,
                K, F, (int)NORM_TOPK, BLOCK_SIZE, config_string().c_str());
    check_model();
    check_layers();
    return report("gradcheck");
}
