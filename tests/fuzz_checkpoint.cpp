// libFuzzer target: any bytes as a checkpoint file. The loader must turn
// every input into a model or a clear error (an exception), never a crash,
// a hang or a huge allocation. Built on a tiny model (see CMakeLists.txt).
#define MOE_NO_MAIN
#include "../moe.cpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    try {
        Checkpoint ck = parse_safetensors(std::string((const char*)data, size), "fuzz");
        Model m;
        load_model(m, ck);
        checkpoint_vocab(ck);
    } catch (const std::runtime_error&) {
    }
    return 0;
}
