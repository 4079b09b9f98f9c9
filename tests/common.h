// Shared by the tests: moe.cpp itself (included, as llm.c's tests do, with
// its main() left out), a pass/fail counter, and a naive reference forward.
#define MOE_NO_MAIN
#include "../moe.cpp"

#include <cstdarg>

static int g_checks = 0, g_failures = 0;

// Record one check; print the failures, and the passes when `verbose`.
[[maybe_unused]] static bool check(bool ok, const char* fmt, ...) {
    g_checks++;
    if (!ok) g_failures++;
    std::va_list ap;
    va_start(ap, fmt);
    std::printf("%s ", ok ? "ok  " : "FAIL");
    std::vprintf(fmt, ap);
    std::printf("\n");
    va_end(ap);
    return ok;
}

[[maybe_unused]] static int report(const char* name) {
    std::printf("%s: %d checks, %d failed\n", name, g_checks, g_failures);
    return g_failures ? 1 : 0;
}

// Non-trivial parameters: PyTorch init, plus noise on the LayerNorms (whose
// init of 1 and 0 would hide mistakes) and a larger router so the routing
// is decisive (finite differences then rarely flip an expert choice).
[[maybe_unused]] static void random_model(Model& m, int V, uint64_t seed) {
    model_init(m, V);
    Rng r = make_rng(seed, STREAM_INIT);
    init_params(m.params, m.tensors, r);
    for (const auto& t : m.tensors) {
        real* w = m.params.data() + t.offset;
        bool ln = t.name.find("ln_") != std::string::npos, router = t.name.find("router") != std::string::npos;
        for (size_t i = 0; i < t.size; i++) {
            if (ln) w[i] += (real)(0.2 * r.normal());
            if (router) w[i] = (real)(1.5 * r.normal());
        }
    }
    for (auto& b : m.score_bias) b = (real)(0.3 * r.normal());  // loss-free balancing's biases, when built with them
}

// A batch shaped like line mode: each row has a random length, targets -1
// after it, so padding and the aux loss's "positions with a target" are used.
[[maybe_unused]] static void random_batch(std::vector<int>& in, std::vector<int>& tg, int B, int T, int V, uint64_t seed) {
    Rng r = make_rng(seed, STREAM_TRAIN);
    in.assign((size_t)B * T, 0), tg.assign((size_t)B * T, -1);
    for (int b = 0; b < B; b++) {
        int n = b == 0 ? T : 1 + (int)r.below(T);  // row 0 fills the context
        for (int t = 0; t < T; t++) in[b * T + t] = (int)r.below(V);
        for (int t = 0; t < n; t++) tg[b * T + t] = (int)r.below(V);
    }
}

// The model written the slow, obvious way, one position at a time, in
// double, sharing no code with moe.cpp's layers: logits[M*V] for a batch.
[[maybe_unused]] static std::vector<double> naive_logits(const Model& m, const std::vector<int>& in, int B, int T) {
    const int V = m.V;
    auto lin = [](const real* w, const real* b, const std::vector<double>& x, int out) {
        std::vector<double> y(out);
        for (int o = 0; o < out; o++) {
            double s = b ? b[o] : 0;
            for (size_t i = 0; i < x.size(); i++) s += (double)w[o * x.size() + i] * x[i];
            y[o] = s;
        }
        return y;
    };
    auto ln = [](const std::vector<double>& x, const real* w, const real* b) {
        double mu = 0, var = 0;
        for (double v : x) mu += v;
        mu /= x.size();
        for (double v : x) var += (v - mu) * (v - mu);
        var /= x.size();
        std::vector<double> y(x.size());
        for (size_t i = 0; i < x.size(); i++) y[i] = (x[i] - mu) / std::sqrt(var + 1e-5) * w[i] + b[i];
        return y;
    };
    std::vector<double> out;
    for (int b = 0; b < B; b++) {
        std::vector<std::vector<double>> x(T, std::vector<double>(C));
        for (int t = 0; t < T; t++)
            for (int i = 0; i < C; i++) x[t][i] = (double)m.p.wte[in[b * T + t] * C + i] + m.p.wpe[t * C + i];
        for (int l = 0; l < N_LAYER; l++) {
            const LayerParams& w = m.p.h[l];
            std::vector<std::vector<double>> qkv(T);
            for (int t = 0; t < T; t++) qkv[t] = lin(w.attn_w, w.attn_b, ln(x[t], w.ln1_w, w.ln1_b), 3 * C);
            for (int t = 0; t < T; t++) {
                std::vector<double> y(C, 0.0);
                for (int h = 0; h < N_HEAD; h++) {
                    std::vector<double> s(t + 1);
                    double mx = -1e300, sum = 0;
                    for (int u = 0; u <= t; u++) {
                        double d = 0;
                        for (int j = 0; j < HS; j++) d += qkv[t][h * HS + j] * qkv[u][C + h * HS + j];
                        s[u] = d / std::sqrt((double)HS), mx = std::max(mx, s[u]);
                    }
                    for (auto& v : s) sum += (v = std::exp(v - mx));
                    for (int u = 0; u <= t; u++)
                        for (int j = 0; j < HS; j++) y[h * HS + j] += s[u] / sum * qkv[u][2 * C + h * HS + j];
                }
                std::vector<double> o = lin(w.attn_proj_w, w.attn_proj_b, y, C);
                for (int i = 0; i < C; i++) x[t][i] += o[i];
            }
            for (int t = 0; t < T; t++) {
                std::vector<double> u = ln(x[t], w.ln2_w, w.ln2_b);
                std::vector<double> z = lin(w.router_w, nullptr, u, E), p(E);
                double mx = *std::max_element(z.begin(), z.end()), sum = 0;
                for (int e = 0; e < E; e++) sum += (p[e] = std::exp(z[e] - mx));
                for (auto& v : p) v /= sum;
                if (SIGMOID_GATE)  // sigmoid gates: each expert's score on its own
                    for (int e = 0; e < E; e++) p[e] = 1 / (1 + std::exp(-z[e]));
                std::vector<int> order(E);
                std::iota(order.begin(), order.end(), 0);
                // the choice by p plus loss-free balancing's bias, if any; the gates from p alone
                std::vector<double> score = p;
                for (int e = 0; e < (int)m.score_bias.size() / N_LAYER; e++) score[e] += m.score_bias[(size_t)l * E + e];
                std::stable_sort(order.begin(), order.end(), [&](int a, int c) { return score[a] > score[c]; });
                int n = K;  // top-k takes K; top-p stops once the probabilities taken reach TOP_P
                double gs = 0;
                for (int j = 0; j < K; j++)
                    if (TOP_P > 0 && gs >= TOP_P) n = std::min(n, j);
                    else if (j < n) gs += p[order[j]];
                for (int j = 0; j < n + NS; j++) {  // n routed experts, then the NS shared ones with weight 1
                    int e = j < n ? order[j] : E + j - n;
                    double g = j >= n ? 1 : NORM_TOPK ? p[e] / gs : p[e];
                    std::vector<double> hdn = lin(w.fc_w[e], w.fc_b[e], u, F);
                    for (auto& v : hdn) v = 0.5 * v * (1 + std::tanh(std::sqrt(2 / M_PI) * (v + 0.044715 * v * v * v)));
                    std::vector<double> y = lin(w.proj_w[e], w.proj_b[e], hdn, C);
                    for (int i = 0; i < C; i++) x[t][i] += g * y[i];
                }
            }
        }
        for (int t = 0; t < T; t++) {
            std::vector<double> lg = lin(m.p.lm_head, nullptr, ln(x[t], m.p.lnf_w, m.p.lnf_b), V);
            out.insert(out.end(), lg.begin(), lg.end());
        }
    }
    return out;
}
