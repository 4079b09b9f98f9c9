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
//   bias          loss-free balancing's bias changes the choice, never the
//                 gates; its update follows the sign rule and keeps a zero
//                 mean; a router frozen with a skewed bias is pulled back to
//                 an even load by the updates alone
//   sigmoid       the scores are sigmoid(logits), the gates the chosen
//                 scores normalised, the aux loss's P the normalised scores
//   top-p         a token takes experts until their probability reaches p;
//                 p near 1 gives every token the cap (K), p near 0 exactly
//                 one, the most probable, with its probability as gate
//   seq           the aux loss per sequence: for a batch of one line the
//                 same, bit for bit, as over the batch (forward and
//                 backward), and each sequence's own for a batch of several
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
    if (BIAS_RATE > 0) {
        // The gates: with a bias that favours expert E-1 by far, every routed
        // row takes it, and each gate is still p / (sum of the chosen p).
        const int M = 64;
        std::vector<real> probs((size_t)M * E), bias(E, 0), gate((size_t)M * K);
        std::vector<int> chosen((size_t)M * K);
        std::vector<uint8_t> valid(M, 1);
        Rng r = make_rng(4, STREAM_INIT);
        for (int i = 0; i < M; i++) {
            double sum = 0;
            for (int e = 0; e < E; e++) sum += probs[(size_t)i * E + e] = (real)(0.05 + r.uniform());
            for (int e = 0; e < E; e++) probs[(size_t)i * E + e] /= (real)sum;
        }
        bias[E - 1] = 2;
        topk_forward(chosen.data(), gate.data(), probs.data(), valid.data(), M, {}, bias.data());
        int with_last = 0;
        double gate_diff = 0;
        for (int i = 0; i < M; i++) {
            real s = 0;
            for (int j = 0; j < K; j++) s += probs[(size_t)i * E + chosen[(size_t)i * K + j]], with_last += chosen[(size_t)i * K + j] == E - 1;
            for (int j = 0; j < K; j++) {
                const real p = probs[(size_t)i * E + chosen[(size_t)i * K + j]];
                gate_diff = std::max(gate_diff, (double)std::fabs(gate[(size_t)i * K + j] - (NORM_TOPK ? p / s : p)));
            }
        }
        check(with_last == M && gate_diff == 0, "a bias of +2 on expert %d: all %d rows take it (%d), and every gate is its "
              "probability over the chosen ones' sum (max diff %.1e)", E - 1, M, with_last, gate_diff);
        // The update: +rate for an expert under its share, -rate over it, 0 at it; then the mean is taken out.
        std::vector<real> b(E, 0), f(E, (real)(1.0 / E));
        f[0] = (real)(1.0 / E + 0.1), f[1] = (real)(1.0 / E - 0.1);
        bias_update(b.data(), f.data(), 0.5);
        double mean = 0;
        for (real v : b) mean += v / E;
        check(b[1] > b[0] && std::fabs(b[1] - b[0] - 1.0) < 1e-6 && std::fabs(mean) < 1e-7,
              "bias_update moves an underloaded expert up by the rate and an overloaded one down (b1 - b0 = %.3f), "
              "mean %.1e", (double)(b[1] - b[0]), mean);
        // A frozen router with a skewed bias: each step routes 256 new tokens
        // whose probabilities come from a fixed router (softmax of logits
        // 2 N(0,1) for each expert, the same distribution for all experts),
        // with expert 0's bias at +0.5 (the rest -0.5/(E-1)). The bias
        // updates alone bring the load back to even. (The rule moves each
        // bias by the sign of the step's error, so it evens out the load of
        // the median step; over steps that vary, that is the mean load.)
        const int R = 256;
        std::vector<real> pr((size_t)R * E), sb(E), fl(E), gt((size_t)R * K);
        std::vector<int> ch((size_t)R * K);
        std::vector<uint8_t> ok(R, 1);
        Rng pr_rng = make_rng(8, STREAM_INIT);
        for (int e = 0; e < E; e++) sb[e] = e == 0 ? 0.5f : -0.5f / (E - 1);
        auto step = [&](bool update) {  // one step's load (fl), then the update
            for (int i = 0; i < R; i++) {
                std::vector<real> z(E);
                for (int e = 0; e < E; e++) z[e] = (real)(2 * pr_rng.normal());
                softmax_forward(&pr[(size_t)i * E], z.data(), 1, E);
            }
            topk_forward(ch.data(), gt.data(), pr.data(), ok.data(), R, {}, sb.data());
            aux_forward(fl.data(), pr.data(), ch.data(), ok.data(), R);
            if (update) bias_update(sb.data(), fl.data(), 1e-3);
        };
        auto mean_dev = [&](bool update) {  // the worst expert's distance from the even share over 100 steps
            std::vector<double> load(E, 0);
            for (int i = 0; i < 100; i++) {
                step(update);
                for (int e = 0; e < E; e++) load[e] += fl[e] / 100;
            }
            double w = 0;
            for (double v : load) w = std::max(w, std::fabs(v - 1.0 / E));
            return w;
        };
        const double before = mean_dev(false);
        for (int i = 0; i < 3000; i++) step(true);
        const double after = mean_dev(true);
        check(before > 0.2 && after < 0.01,
              "a frozen router with a skewed bias: the worst expert's load is %.3f off the even %.3f before, %.3f "
              "after 3000 bias updates (over the next 100 steps)", before, 1.0 / E, after);
    }
    if (SIGMOID_GATE) {
        model_forward(m, in.data(), tg.data(), B, T, 0.01f);
        double ws = 0, wg = 0, wa = 0;
        for (int l = 0; l < N_LAYER; l++) {
            const LayerActs& a = m.L[l];
            std::vector<double> P(E, 0), cnt(E, 0);
            double n = 0, slots = 0;
            for (int r = 0; r < m.M; r++) {
                double sum = 0, top = 0;
                for (int e = 0; e < E; e++) {
                    const double sg = 1 / (1 + std::exp(-(double)a.logits[(size_t)r * E + e]));
                    ws = std::max(ws, std::fabs(sg - a.probs[(size_t)r * E + e]));
                    sum += a.probs[(size_t)r * E + e];
                }
                for (int j = 0; j < K; j++) top += a.probs[(size_t)r * E + a.chosen[(size_t)r * K + j]];
                for (int j = 0; j < K; j++) {
                    const double g = a.probs[(size_t)r * E + a.chosen[(size_t)r * K + j]];
                    wg = std::max(wg, std::fabs(a.gate[(size_t)r * K + j] - (NORM_TOPK ? g / top : g)));
                }
                if (!m.valid[r]) continue;
                n++;
                for (int e = 0; e < E; e++) P[e] += a.probs[(size_t)r * E + e] / sum;
                for (int j = 0; j < K; j++) cnt[a.chosen[(size_t)r * K + j]]++, slots++;
            }
            double aux = 0;
            for (int e = 0; e < E; e++) aux += E * (cnt[e] / slots) * (P[e] / n);
            wa = std::max(wa, std::fabs(aux - a.aux));
        }
        check(ws < 1e-6 && wg < 1e-6 && wa < 1e-5,
              "sigmoid gates: scores = sigmoid(logits) (max diff %.1e), gates = chosen scores over their sum (%.1e), "
              "aux from the normalised scores (%.1e)", ws, wg, wa);
    }
    if (TOP_P > 0) {
        // The rule, at the threshold the build has: experts in order of
        // probability until they reach TOP_P, each gate its probability.
        model_forward(m, in.data(), tg.data(), B, T, 0);
        int64_t bad = 0, rows = 0, more = 0;
        for (const auto& a : m.L)
            for (int r = 0; r < m.M; r++) {
                if (!m.valid[r]) continue;
                rows++;
                std::vector<int> order(E);
                std::iota(order.begin(), order.end(), 0);
                std::stable_sort(order.begin(), order.end(),
                                 [&](int x, int y) { return a.probs[(size_t)r * E + x] > a.probs[(size_t)r * E + y]; });
                real mass = 0;
                int n = 0;
                while (n < K && (n == 0 || mass < (real)TOP_P)) mass += a.probs[(size_t)r * E + order[n++]];
                more += n > 1;
                for (int j = 0; j < K; j++) {
                    const int c = a.chosen[(size_t)r * K + j];
                    bad += j < n ? c != order[j] || a.gate[(size_t)r * K + j] != a.probs[(size_t)r * E + c] : c != -1;
                }
            }
        check(bad == 0 && more > 0 && more < rows,
              "top-p %g: every routed token takes experts in order until they reach it (%lld of %lld take more than "
              "one), gates = probabilities (%lld wrong)", TOP_P, (long long)more, (long long)rows, (long long)bad);
        auto taken = [&](double p, int64_t* with_cap, int64_t* with_one, double* gate_diff) {
            m.top_p = p;
            model_forward(m, in.data(), tg.data(), B, T, 0);
            m.top_p = TOP_P;
            *with_cap = *with_one = 0, *gate_diff = 0;
            for (const auto& a : m.L)
                for (int r = 0; r < m.M; r++) {
                    if (!m.valid[r]) continue;
                    int n = 0;
                    for (int j = 0; j < K; j++) n += a.chosen[(size_t)r * K + j] >= 0;
                    *with_cap += n == K, *with_one += n == 1;
                    const real* pr = &a.probs[(size_t)r * E];
                    if (n == 1)  // the single expert is the most probable, with its probability as gate
                        *gate_diff = std::max(*gate_diff, (double)std::fabs(*std::max_element(pr, pr + E) - a.gate[(size_t)r * K]) +
                                                              (pr[a.chosen[(size_t)r * K]] != *std::max_element(pr, pr + E)));
                }
            return rows;
        };
        int64_t cap, one;
        double gd;
        // p near 1, on a router made unsure (its weights / 10), so that no
        // single probability reaches p on its own
        const std::vector<real> keep = m.params;
        for (int l = 0; l < N_LAYER; l++)
            for (int i = 0; i < E * C; i++) m.p.h[l].router_w[i] /= 10;
        taken(0.999, &cap, &one, &gd);
        m.params = keep;
        check(cap == rows, "p = 0.999: all %lld routed tokens of every layer take the cap, %d experts (%lld)",
              (long long)rows, K, (long long)cap);
        taken(1e-6, &cap, &one, &gd);
        check(one == rows && gd == 0, "p = 1e-6: all %lld take exactly one expert (%lld), the most probable, gate = its "
              "probability (max diff %.1e)", (long long)rows, (long long)one, gd);
        m.top_p = TOP_P;
    }
    if (AUX_SCOPE == Scope::seq) {
        // Where the aux loss is measured, one MoE layer run directly: over
        // the batch (no sequences given) or per sequence.
        const int Bq = 3, Tq = 5, Mq = Bq * Tq;
        std::vector<real> x((size_t)Mq * C), out((size_t)Mq * C), dout((size_t)Mq * C);
        Rng xr = make_rng(12, STREAM_SAMPLE);
        for (auto& v : x) v = (real)xr.normal();
        for (auto& v : dout) v = (real)xr.normal();
        std::vector<uint8_t> ok(Mq, 1);
        ok[Mq - 1] = 0;  // a padding row
        std::vector<int> st = {0, Tq, 2 * Tq}, ln = {Tq, Tq, Tq};
        auto layer = [&](Seqs sq, int M) {  // (aux, dx, router gradient) of layer 0 over the first M rows
            LayerActs a;
            moe_forward(out.data(), a, x.data(), m.p.h[0], ok.data(), M, nullptr, 0, {}, score_bias_of(m, 0), sq);
            std::fill(m.grads.begin(), m.grads.end(), 0);
            std::vector<real> dx((size_t)M * C, 0);
            moe_backward(dx.data(), m.g.h[0], dout.data(), a, x.data(), m.p.h[0], ok.data(), M, 0.5f, 0, 0, sq);
            std::vector<real> gr(m.g.h[0].router_w, m.g.h[0].router_w + E * C);
            return std::tuple{a.aux, dx, gr};
        };
        const auto [aux_b, dx_b, gr_b] = layer({}, Tq);
        const auto [aux_s, dx_s, gr_s] = layer({st.data(), ln.data(), 1}, Tq);
        check(aux_b == aux_s && dx_b == dx_s && gr_b == gr_s,
              "aux per sequence, for a batch of one line: the same as per batch, bit for bit (aux %.6f, its input and "
              "router gradients)", (double)aux_b);
        const auto [aux_b3, dx_b3, gr_b3] = layer({}, Mq);
        const auto [aux_s3, dx_s3, gr_s3] = layer({st.data(), ln.data(), Bq}, Mq);
        double each = 0;
        for (int b = 0; b < Bq; b++) {
            LayerActs a;
            std::vector<real> o1((size_t)Tq * C);
            moe_forward(o1.data(), a, &x[(size_t)b * Tq * C], m.p.h[0], &ok[b * Tq], Tq, nullptr, 0, {}, score_bias_of(m, 0));
            each += a.aux / Bq;
        }
        check(aux_s3 != aux_b3 && std::fabs(aux_s3 - each) < 1e-6 && dx_s3 != dx_b3,
              "for %d lines: the mean of each line's aux (%.6f = %.6f), not the batch's (%.6f)", Bq, (double)aux_s3,
              each, (double)aux_b3);
        // the model uses the scope the build names
        model_forward(m, in.data(), tg.data(), B, T, 0.01f);
        check(m.L[0].seq_scope, "the model measures the aux loss per sequence, as built");
    }
    return report("variants");
}
