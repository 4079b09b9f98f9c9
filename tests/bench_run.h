// A training run as the benchmark makes it (weights and batches from seed
// 1), and the median its rows report, for bench.cpp and for bench_pair.cpp,
// which includes this once per model shape, each time in its own namespace
// after moe.cpp.
struct Run {
    Dataset d;
    Model m;
    AdamW opt;
    Rng rng = make_rng(1, STREAM_TRAIN);
    std::vector<int> in, tg;
    int B = 0;
};
static void start_run(Run& r, const std::string& data, bool text, int B) {
    r.d = load_dataset(data, text, 1, ""), r.B = B;
    model_init(r.m, (int)r.d.vocab.size() + 1);
    Rng init = make_rng(1, STREAM_INIT);
    init_params(r.m.params, r.m.tensors, init);
}
// One training step; returns its time in ms.
static double train_step(Run& r, int step) {
    double t0 = now_ms();
    train_batch(r.in, r.tg, r.d, r.B, r.rng);
    model_forward(r.m, r.in.data(), r.tg.data(), r.B, r.d.T, AUX_COEF);
    model_backward(r.m);
    adamw_update(r.m, r.opt, step);
    return now_ms() - t0;
}

static double median(std::vector<double> v) {
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}
