// Unit tests in the precision and configuration that ./moe is built with:
// the aux loss at its two extremes, the forward pass against the naive
// reference, the data layout, overfitting one batch, a bit-identical
// checkpoint round trip, and thread-count independence. (The fast kernels
// against the plain ones: test_fast.cpp.)
#include "common.h"

static void test_aux() {
    const int M = 4 * E;
    std::vector<real> probs(M * E), f(E);
    std::vector<int> chosen(M * K);
    std::vector<uint8_t> valid(M, 1);
    for (int m = 0; m < M; m++) {  // uniform: every expert equally likely and equally chosen
        for (int e = 0; e < E; e++) probs[m * E + e] = (real)1 / E;
        for (int j = 0; j < K; j++) chosen[m * K + j] = (m + j) % E;
    }
    real aux = aux_forward(f.data(), probs.data(), chosen.data(), valid.data(), M);
    check(std::fabs(aux - 1) < 1e-6, "aux = %.6f for uniform routing (expected 1)", (double)aux);
    for (int m = 0; m < M; m++) {  // collapse: expert 0 takes every token with probability 1
        for (int e = 0; e < E; e++) probs[m * E + e] = e == 0;
        for (int j = 0; j < K; j++) chosen[m * K + j] = j;  // the K slots of a token are distinct experts
    }
    aux = aux_forward(f.data(), probs.data(), chosen.data(), valid.data(), M);
    // f_0 = 1/K (each token still fills K slots), P_0 = 1: aux = E / K, which is E for top-1
    check(std::fabs(aux - (real)E / K) < 1e-5, "aux = %.6f for total collapse (expected E/K = %.6f)", (double)aux,
          (double)E / K);
}

static void test_forward_reference() {
    const int V = 11, B = 3, T = BLOCK_SIZE < 12 ? BLOCK_SIZE : 12;
    Model m;
    random_model(m, V, 3);
    std::vector<int> in, tg;
    random_batch(in, tg, B, T, V, 4);
    model_forward(m, in.data(), nullptr, B, T, 0);
    std::vector<double> ref = naive_logits(m, in, B, T);
    double worst = 0;
    for (size_t i = 0; i < ref.size(); i++) worst = std::max(worst, std::fabs(ref[i] - m.logits[i]));
    check(worst < 2e-4, "float forward matches the double naive reference: max |logit diff| %.2e", worst);
}

// With one expert the gate is softmax over one logit, exactly 1: the MoE
// layer must then give exactly what a plain MLP gives, bit for bit.
static void test_dense() {
    if (E != 1) return;
    const int M = 7;
    Model m;
    random_model(m, 5, 12);
    Rng r = make_rng(3, STREAM_SAMPLE);
    std::vector<real> x(M * C), logits(M * E), probs(M * E), gate(M * K), out(M * C);
    for (auto& v : x) v = (real)r.normal();
    std::vector<int> chosen(M * K);
    std::vector<uint8_t> valid(M, 1);
    const LayerParams& p = m.p.h[0];
    linear_forward(logits.data(), x.data(), p.router_w, nullptr, M, C, E);
    softmax_forward(probs.data(), logits.data(), M, E);
    topk_forward(chosen.data(), gate.data(), probs.data(), valid.data(), M);
    MoeActs acts;
    experts_forward(out.data(), acts, x.data(), chosen.data(), gate.data(), p, M);
    std::vector<real> h(M * F), th(M * F), hg(M * F), y(M * C);  // the plain MLP
    linear_forward(h.data(), x.data(), p.fc_w[0], p.fc_b[0], M, C, F);
    gelu_forward(hg.data(), th.data(), h.data(), M * F);
    linear_forward(y.data(), hg.data(), p.proj_w[0], p.proj_b[0], M, F, C);
    check(out == y && gate == std::vector<real>(M * K, 1), "dense build: the MoE layer is exactly a plain MLP");
}

// The largest difference between the logits of the full forward pass over
// in[0..T) and those of T KV-cache steps (m keeps the full pass's activations).
static double kv_cache_diff(Model& m, const std::vector<int>& in, int T) {
    model_forward(m, in.data(), nullptr, 1, T, 0);
    KVCache cache;
    double worst = 0;
    for (int t = 0; t < T; t++) {
        model_step(m, cache, in[t]);
        for (int v = 0; v < m.V; v++) worst = std::max(worst, (double)std::fabs(cache.logits[v] - m.logits[(size_t)t * m.V + v]));
    }
    return worst;
}

// Sampling with the KV cache must give the logits of the full forward pass.
static void test_kv_cache() {
    const int V = 13, T = BLOCK_SIZE;
    Model m;
    random_model(m, V, 21);
    std::vector<int> in, tg;
    random_batch(in, tg, 1, T, V, 22);
    const double worst = kv_cache_diff(m, in, T);
    check(worst < 1e-4, "KV-cache steps give the full forward pass's logits at all %d positions: max diff %.2e", T, worst);
}

// A file of this process's own in the temp dir: CI runs test binaries side by side.
static std::string temp_file(const std::string& name) {
    return (std::filesystem::temp_directory_path() / (std::to_string(getpid()) + "_" + name)).string();
}

static void test_data() {
    std::string path = temp_file("moe_test_lines.txt");
    {
        std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "wb"), std::fclose);
        std::string s = "emma\r\n\nbob\nan\n";
        for (int i = 0; i < 30; i++) s += "x" + std::string(i % 5 + 1, 'a') + "\n";
        std::fwrite(s.data(), 1, s.size(), f.get());
    }
    Dataset d = load_dataset(path, false, 1, "");
    check(d.vocab == "abemnox", "vocabulary is the sorted distinct bytes, no CR or LF: '%s'", d.vocab.c_str());
    check(d.T == 7, "context = longest line + 1 = %d", d.T);
    check(d.train.size() + d.test.size() == 33 && d.test.size() == 3, "33 lines split %zu train / %zu test",
          d.train.size(), d.test.size());
    LineSet lines;
    std::vector<int> emma = encode("emma", d.vocab, "x");
    std::vector<uint16_t> emma16(emma.begin(), emma.end());
    lines.add(emma16.data(), emma16.size());
    std::vector<int> in(d.T), tg(d.T);
    lines_batch(in.data(), tg.data(), lines, {0}, d.T);
    std::vector<int> want_in = {0, 3, 4, 4, 1, 0, 0}, want_tg = {3, 4, 4, 1, 0, -1, -1};
    check(in == want_in && tg == want_tg, "'emma' -> input [0 e m m a pad pad], target [e m m a 0 -1 -1]");
    // every line is found in its own split, and a line that is in neither is in neither
    bool found = true;
    for (const LineSet* s : {&d.train, &d.test})
        for (size_t i = 0; i < s->size(); i++) {
            std::vector<int> l(s->line(i), s->line(i) + s->length(i));
            found = found && contains(*s, s == &d.train ? d.train_order : d.test_order, l);
        }
    std::vector<int> fresh = encode("xaaaaaa", d.vocab, "x"), prefix = encode("xa", d.vocab, "x");
    bool xa_in_train = false;  // "xa" is a line (i % 5 == 0): it is in one of the splits
    for (size_t i = 0; i < d.train.size(); i++) xa_in_train |= d.train.length(i) == 2 && d.train.line(i)[1] == prefix[1];
    check(found && !contains(d.train, d.train_order, fresh) && !contains(d.test, d.test_order, fresh) &&
              contains(d.train, d.train_order, prefix) == xa_in_train && !contains(d.train, d.train_order, {}),
          "every line is found in its split; a line in neither split and the empty line are not");
    std::filesystem::remove(path);
}

static void test_overfit() {
#if !MOE_DOUBLE
    const int V = 27, B = 4, T = 8;
    Model m;
    model_init(m, V);
    Rng r = make_rng(1, STREAM_INIT);
    init_params(m.params, m.tensors, r);
    // Four text windows with distinct first tokens, so every target is
    // determined by its prefix and the best possible loss is zero. (Line-mode
    // rows all start from token 0, whose next letter no model can know.)
    const char* rows[B] = {"thequickb", "jumpsover", "lazydogsz", "moeexpert"};
    std::vector<int> in(B * T), tg(B * T);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) in[b * T + t] = rows[b][t] - 'a' + 1, tg[b * T + t] = rows[b][t + 1] - 'a' + 1;
    AdamW opt;
    opt.lr = 3e-3f, opt.weight_decay = 0;
    double first = 0, loss = 0;
    for (int step = 1; step <= 300; step++) {
        loss = model_forward(m, in.data(), tg.data(), B, T, 0.01f);
        if (step == 1) first = loss;
        std::fill(m.grads.begin(), m.grads.end(), 0.0f);
        model_backward(m);
        adamw_update(m, opt, step);
    }
    model_forward(m, in.data(), tg.data(), B, T, 0);
    check(m.ce < 0.05, "overfitting one batch: cross-entropy %.4f -> %.4f after 300 steps", first, m.ce);
#endif
}

static void test_roundtrip() {
    std::string a = temp_file("moe_test_a.safetensors"), b = temp_file("moe_test_b.safetensors");
    Model m;
    random_model(m, 30, 8);
    std::string vocab;
    for (int i = 0; i < 29; i++) vocab += (char)(33 + 3 * i);
    Meta meta = model_meta(vocab, false, 9, 123, 77, 1.5);
    write_safetensors(a, model_tensors(m), meta);
    Checkpoint ck = read_safetensors(a);
    Model back;
    load_model(back, ck);
    bool same = back.V == m.V && back.params.size() == m.params.size();
    for (size_t i = 0; same && i < m.params.size(); i++) same = (float)back.params[i] == (float)m.params[i];
    check(same, "round trip: every weight comes back bit for bit (%zu of them)", m.params.size());
    check(checkpoint_vocab(ck) == vocab && ck.meta == meta, "round trip: vocabulary and metadata survive");
    write_safetensors(b, model_tensors(back), meta);
    check(read_file(a) == read_file(b), "round trip: saving the loaded model gives the same bytes");
    std::filesystem::remove(a), std::filesystem::remove(b);
}

// \u escapes in a header's metadata, as Python's json.dumps writes them for
// anything not ASCII: decoded to UTF-8, surrogate pairs included; a lone
// surrogate is an error.
static void test_json_escapes() {
    auto header = [](const std::string& json) {
        std::string raw(8, '\0');
        for (int i = 0; i < 8; i++) raw[i] = (char)((uint64_t)json.size() >> (8 * i));
        return raw + json;
    };
    Checkpoint ck = parse_safetensors(
        header("{\"__metadata__\":{\"a\":\"caf\\u00e9\",\"b\":\"\\ud83d\\ude00\",\"c\":\"\\u0041\\u20ac\"}}"), "t");
    check(ck.meta["a"] == "caf\xc3\xa9" && ck.meta["b"] == "\xf0\x9f\x98\x80" && ck.meta["c"] == "A\xe2\x82\xac",
          "JSON \\u escapes decode to UTF-8: e-acute in 2 bytes, the euro sign in 3, a surrogate pair in 4");
    int refused = 0;
    for (const char* bad : {"\\ude00", "\\ud83d", "\\ud83dx", "\\ud83d\\u0041", "\\u12"}) {
        try {
            parse_safetensors(header(std::string("{\"__metadata__\":{\"a\":\"") + bad + "\"}}"), "t");
        } catch (const std::runtime_error& e) {
            refused += std::string(e.what()).find("escape") != std::string::npos;
        }
    }
    check(refused == 5, "lone or broken surrogates and short escapes are refused, naming the escape (%d of 5)", refused);
}

static void test_threads() {
    const int V = 27, B = 32, T = BLOCK_SIZE < 16 ? BLOCK_SIZE : 16;  // big enough for the parallel paths
    Model m;
    random_model(m, V, 5);
    std::vector<int> in, tg;
    random_batch(in, tg, B, T, V, 6);
    std::vector<real> grads[2];
    double loss[2];
    for (int nt = 1; nt <= 2; nt++) {
        g_threads = nt;
        loss[nt - 1] = model_forward(m, in.data(), tg.data(), B, T, 0.01f);
#if !MOE_INFERENCE_ONLY
        std::fill(m.grads.begin(), m.grads.end(), (real)0);
        model_backward(m);
        grads[nt - 1] = m.grads;
#endif
    }
    g_threads = 1;
    check(loss[0] == loss[1] && grads[0] == grads[1], "1 and 2 threads give bit-identical loss and gradients");
}

// nanoGPT's recipe: the schedule at its turning points, gradient clipping to
// the given norm, and weight decay on the 2-D parameters only.
static void test_recipe() {
#if !MOE_INFERENCE_ONLY
    Schedule s;
    s.lr = 1e-3, s.min_lr = 1e-4, s.warmup = 100, s.decay_steps = 2000, s.cosine = true;
    auto near = [](double a, double b) { return std::fabs(a - b) <= 1e-12 * std::fabs(b); };
    check(near(lr_at(s, 1), 1e-3 / 101) && near(lr_at(s, 100), 1e-3 * 100 / 101) && near(lr_at(s, 101), 1e-3) &&
              near(lr_at(s, 1051), 5.5e-4) && near(lr_at(s, 2001), 1e-4) && lr_at(s, 5000) == 1e-4,
          "cosine schedule: warmup lr*t/101, the rate at step 101, halfway 5.5e-4 at step 1051, the floor from step 2001");
    Schedule c;
    c.lr = 5e-4;
    check(lr_at(c, 1) == 5e-4 && lr_at(c, 4000) == 5e-4, "constant schedule without warmup: the rate at every step");
    Model m;
    random_model(m, 9, 31);
    Rng r = make_rng(32, STREAM_TRAIN);
    for (auto& g : m.grads) g = (real)r.normal();
    double direct = 0;
    for (real g : m.grads) direct += (double)g * g;
    direct = std::sqrt(direct);
    const std::vector<real> before = m.grads;
    double pre = clip_gradients(m, 2 * direct);
    check(std::fabs(pre - direct) < 1e-9 * direct && m.grads == before, "clip above the norm (%.4f): nothing changes", pre);
    clip_gradients(m, direct / 4);
    double after = grad_norm(m);
    check(std::fabs(after - direct / 4) < 1e-5 * direct, "clip to a quarter: the norm becomes %.6f (want %.6f)", after,
          direct / 4);
    // decay: zero gradients and moments leave only the decay, p *= 1 - lr * wd
    std::fill(m.grads.begin(), m.grads.end(), (real)0);
    std::fill(m.adam_m.begin(), m.adam_m.end(), (real)0), std::fill(m.adam_v.begin(), m.adam_v.end(), (real)0);
    const std::vector<real> p0 = m.params;
    AdamW o;
    o.lr = 0.1f, o.weight_decay = 0.5f, o.decay_2d = true;
    adamw_update(m, o, 1);
    bool ok = true;
    for (const auto& t : m.tensors)
        for (size_t i = t.offset; i < t.offset + t.size; i++)
            ok &= t.shape.size() >= 2 ? m.params[i] == p0[i] * (real)(1 - (double)o.lr * o.weight_decay)
                                      : m.params[i] == p0[i];
    check(ok, "--decay 2d: matrices and embeddings shrink by 1 - lr*wd, biases and layernorm weights do not move");
#endif
}

// --ablate and the redundancy test (topk_forward's Ablation): a removed
// expert is never chosen, the gates come from what remains, and removing
// experts that no token chose changes nothing, bit for bit.
static void test_ablation() {
    if (E <= K) return;  // nothing to remove
    const int M = 64, V = 13, T = 8;
    Rng r = make_rng(5, STREAM_SAMPLE);
    std::vector<real> probs(M * E), logits(M * E);
    for (auto& v : logits) v = (real)r.normal();
    softmax_forward(probs.data(), logits.data(), M, E);
    std::vector<uint8_t> valid(M, 1), off(E, 0);
    off[0] = 1;
    std::vector<int> chosen(M * K);
    std::vector<real> gate(M * K);
    topk_forward(chosen.data(), gate.data(), probs.data(), valid.data(), M, {off.data(), 0});
    bool never = true, sums = true;
    for (int m = 0; m < M; m++) {
        real s = 0;
        for (int j = 0; j < K; j++) never = never && chosen[m * K + j] != 0, s += gate[m * K + j];
        sums = sums && (!NORM_TOPK || K == 1 || std::fabs(s - 1) < 1e-6);
    }
    check(never && sums, "an ablated expert is never chosen; the gates of what remains sum to 1");
    // skip = r: the chosen experts are the ranks r .. r+K-1 of each row
    bool ranks = true;
    for (int skip = 0; skip <= E - K; skip++) {
        topk_forward(chosen.data(), gate.data(), probs.data(), valid.data(), M, {nullptr, skip});
        for (int m = 0; m < M; m++) {
            std::vector<int> order(E);
            std::iota(order.begin(), order.end(), 0);
            std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return probs[m * E + a] > probs[m * E + b]; });
            for (int j = 0; j < K; j++) ranks = ranks && chosen[m * K + j] == order[skip + j];
        }
    }
    check(ranks, "redundancy test: with r taken away, each token takes its experts ranked r+1 .. r+K");
    // One token routes to K experts a layer: removing all the others changes nothing.
    Model m;
    random_model(m, V, 31);
    std::vector<int> in, tg;
    random_batch(in, tg, 1, T, V, 32);
    model_forward(m, in.data(), nullptr, 1, 1, 0);
    const std::vector<real> plain(m.logits.begin(), m.logits.begin() + V);
    m.ablated.assign((size_t)N_LAYER * E, 1);
    for (int l = 0; l < N_LAYER; l++)
        for (int j = 0; j < K; j++) m.ablated[(size_t)l * E + m.L[l].chosen[j]] = 0;
    model_forward(m, in.data(), nullptr, 1, 1, 0);
    check(std::equal(plain.begin(), plain.end(), m.logits.begin()),
          "ablating every expert that no token chose gives the same logits, bit for bit");
    // With an ablation the KV-cache steps still give the full forward pass's logits.
    m.ablated.assign((size_t)N_LAYER * E, 0);
    m.ablated[1] = 1, m.ablated[(size_t)(N_LAYER - 1) * E] = 1;
    const double worst = kv_cache_diff(m, in, T);
    bool avoided = true;
    for (int t = 0; t < T; t++)
        for (int j = 0; j < K; j++) avoided = avoided && m.L[0].chosen[t * K + j] != 1 && m.L[N_LAYER - 1].chosen[t * K + j] != 0;
    check(worst < 1e-4 && avoided, "with --ablate, KV-cache sampling gives the full pass's logits (max diff %.2e)", worst);
}

int main() {
    set_threads(2);
    g_threads = 1;
    std::printf("unit tests: %s\n", config_string().c_str());
    test_aux();
    test_forward_reference();
    test_dense();
    test_kv_cache();
    test_ablation();
    test_data();
    test_overfit();
    test_roundtrip();
    test_json_escapes();
    test_threads();
    test_recipe();
    return report("test_model");
}
