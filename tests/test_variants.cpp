// What each MoE variant (moe.cpp section 5) promises, checked in float on a
// small model. Built once per variant (see CMakeLists.txt); each build runs
// the checks that apply to it:
//   every build   evaluation matches the naive reference (no noise, no
//                 capacity at evaluation; shared experts included)
//   noisy gate    training-mode passes are noisy; evaluation and KV-cache
//                 sampling are not (two evaluations are identical)
//   capacity      an expert over capacity keeps its highest-gate slots; a
//                 huge factor gives exactly the output of no limit
//   z-loss        equals a direct computation, and is part of the loss
//   shared        every token goes through every shared expert
#include "common.h"

static double max_diff(const std::vector<real>& a, const std::vector<real>& b) {
    double w = 0;
    for (size_t i = 0; i < a.size(); i++) w = std::max(w, (double)std::fabs(a[i] - b[i]));
    return w;
}

int main() {
    set_threads(2);
    std::printf("variant checks: %s\n", config_string().c_str());
    const int V = 9, B = 6, T = BLOCK_SIZE;
    Model m;
    random_model(m, V, 21);
    std::vector<int> in, tg;
    random_batch(in, tg, B, T, V, 5);

    // Evaluation (no train_rng) against the double reference, all positions routed.
    model_forward(m, in.data(), nullptr, B, T, 0);
    std::vector<real> eval_logits = m.logits;
    std::vector<double> ref = naive_logits(m, in, B, T);
    double worst = 0;
    for (size_t i = 0; i < ref.size(); i++) worst = std::max(worst, std::fabs(ref[i] - m.logits[i]));
    check(worst < 2e-4, "evaluation matches the naive reference: max |logit diff| %.2e", worst);

    // A training-mode pass: train_rng set, as train() does.
    auto train_pass = [&](uint64_t seed) {
        Rng r = make_rng(seed, STREAM_TRAIN);
        m.train_rng = &r;
        model_forward(m, in.data(), nullptr, B, T, 0);
        m.train_rng = nullptr;
        return m.logits;
    };

    if (NOISY_GATE) {
        std::vector<real> a = train_pass(1), b = train_pass(2);
        check(max_diff(a, eval_logits) > 1e-3 && max_diff(a, b) > 1e-3,
              "training passes are noisy: %.3f from evaluation, %.3f between two draws", max_diff(a, eval_logits),
              max_diff(a, b));
        model_forward(m, in.data(), nullptr, B, T, 0);
        check(m.logits == eval_logits, "evaluation after training passes is identical to before: no noise");
        // KV-cache sampling: the logits of each step equal evaluation's, bit for bit up to float order
        KVCache c;
        double w = 0;
        for (int t = 0; t < T; t++) {
            model_step(m, c, in[t]);
            for (int v = 0; v < V; v++) w = std::max(w, (double)std::fabs(c.logits[v] - eval_logits[(size_t)t * V + v]));
        }
        check(w < 1e-4, "KV-cache sampling is noise-free: max diff from evaluation %.2e", w);
    }

    if (CAPACITY_FACTOR > 0) {
        train_pass(1);
        int64_t n_valid = (int64_t)m.M, bad = 0;
        const int64_t cap = (int64_t)std::ceil(CAPACITY_FACTOR * (double)n_valid * K / E);
        for (const auto& a : m.L)
            for (int e = 0; e < E; e++) {
                real min_kept = INFINITY, max_dropped = -INFINITY;
                int64_t kept = 0;
                for (int i = 0; i < m.M * K; i++) {
                    if (a.chosen[i] != e) continue;
                    if (a.routed[i] == e) kept++, min_kept = std::min(min_kept, a.gate[i]);
                    else max_dropped = std::max(max_dropped, a.gate[i]);
                }
                bad += kept > cap || (max_dropped > -INFINITY && (kept != cap || max_dropped > min_kept));
            }
        check(m.dropped > 0 && bad == 0,
              "capacity %lld per expert: %lld of %lld slots dropped, each full expert kept its highest gates (%lld bad)",
              (long long)cap, (long long)m.dropped, (long long)m.slots, (long long)bad);
        m.capacity_factor = 1e9;
        std::vector<real> huge = train_pass(1);
        int64_t dropped_huge = m.dropped;
        m.capacity_factor = 0;
        std::vector<real> none = train_pass(1);
        m.capacity_factor = CAPACITY_FACTOR;
        check(huge == none && dropped_huge == 0, "capacity factor 1e9 gives exactly the output of no limit");
        check(max_diff(train_pass(1), none) > 0, "and the built-in factor changes it (slots were dropped)");
        model_forward(m, in.data(), tg.data(), B, T, 0);
        check(m.dropped == 0, "evaluation drops nothing");
    }

    if (Z_COEF > 0) {
        const real aux_coef = 0.01f;
        double loss = model_forward(m, in.data(), tg.data(), B, T, aux_coef);
        // direct: the router logits from ln_2's output, logsumexp, squared, averaged over the routed rows
        double zsum = 0;
        for (int l = 0; l < N_LAYER; l++) {
            double s = 0;
            int n = 0;
            for (int r = 0; r < m.M; r++) {
                if (!m.valid[r]) continue;
                std::vector<double> z(E);
                for (int e = 0; e < E; e++)
                    for (int c = 0; c < C; c++) z[e] += (double)m.p.h[l].router_w[e * C + c] * m.L[l].ln2[(size_t)r * C + c];
                double mx = *std::max_element(z.begin(), z.end()), se = 0;
                for (double v : z) se += std::exp(v - mx);
                double lse = mx + std::log(se);
                s += lse * lse, n++;
            }
            zsum += s / n;
        }
        check(std::fabs(zsum - m.z_sum) < 1e-4 * zsum, "z-loss %.6f equals the direct computation %.6f", (double)m.z_sum,
              zsum);
        double rest = loss - m.ce - (double)aux_coef * m.aux_sum;
        check(std::fabs(rest - Z_COEF * zsum) < 1e-5, "loss = ce + aux + Z_COEF * z: the z term is %.6f", rest);
    }

    if (NS > 0) {
        model_forward(m, in.data(), nullptr, B, T, 0);
        // each shared expert's hidden pre-activation, for every row, against a direct c_fc
        double w = 0;
        for (int l = 0; l < N_LAYER; l++)
            for (int s = 0; s < NS; s++)
                for (int r = 0; r < m.M; r++)
                    for (int f = 0; f < F; f++) {
                        double h = m.p.h[l].fc_b[E + s][f];
                        for (int c = 0; c < C; c++) h += (double)m.p.h[l].fc_w[E + s][f * C + c] * m.L[l].ln2[(size_t)r * C + c];
                        w = std::max(w, std::fabs(h - m.L[l].sh_h[((size_t)s * m.M + r) * F + f]));
                    }
        check(w < 1e-4, "all %d rows of every layer went through all %d shared experts (max diff %.2e)", m.M, NS, w);
        // and the routed experts still saw only their K slots per row
        int64_t slots = 0;
        for (const auto& a : m.L) slots += a.moe.offset[E];
        check(slots == (int64_t)N_LAYER * m.M * K, "routed experts: %lld slots = layers x rows x K", (long long)slots);
    }
    return report("variants");
}
