// libFuzzer target: any bytes as a data file, in line mode and in text mode,
// then a training batch and an evaluation pass over it on a tiny model. Every
// input gives a data set or a clear error, never a crash.
#define MOE_NO_MAIN
#include "../moe.cpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    std::string raw((const char*)data, size);
    for (bool text : {false, true}) {
        try {
            Dataset d = dataset_from_bytes(raw, "fuzz", text, 1, "");
            Model m;
            model_init(m, (int)d.vocab.size() + 1);
            Rng r = make_rng(1, STREAM_INIT);
            init_params(m.params, m.tensors, r);
            std::vector<int> in, tg;
            train_batch(in, tg, d, 2, r);
            model_forward(m, in.data(), tg.data(), 2, d.T, 0.01f);
            if (!text) eval_lines(m, d.test, d.T, 4);
        } catch (const std::runtime_error&) {
        }
    }
    return 0;
}
