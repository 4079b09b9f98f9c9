// Helpers for tests that run the built binaries as a user would.
#pragma once
#include "common.h"

#include <sys/wait.h>  // WEXITSTATUS: the tests run on POSIX systems

namespace fs = std::filesystem;
static std::string g_moe, g_infer, g_dir, g_small;

struct Run {
    int code;
    std::string out;  // stdout and stderr together
};
static Run run(const std::string& cmd) {
    std::string full = cmd + " 2>&1";
    FILE* p = popen(full.c_str(), "r");
    if (!p) return {-1, "popen failed"};
    std::string out;
    char buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
    int status = pclose(p);
    return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, out};
}
static std::string q(const std::string& s) { return "'" + s + "'"; }
static void write(const std::string& path, const std::string& s) {
    std::unique_ptr<FILE, int (*)(FILE*)> f(std::fopen(path.c_str(), "wb"), std::fclose);
    std::fwrite(s.data(), 1, s.size(), f.get());
}
static std::string slurp(const std::string& path) {
    std::error_code ec;
    return fs::exists(path, ec) ? read_file(path) : std::string("<missing>");
}
static bool has(const std::string& s, const std::string& what) { return s.find(what) != std::string::npos; }

// Train `steps` steps into dir with the small data set.
[[maybe_unused]] static std::string train_command(const std::string& dir, int steps, const std::string& extra = "") {
    return q(g_moe) + " -i " + q(g_small) + " -o " + q(dir) + " --max-steps " + std::to_string(steps) +
           " --eval-interval 20 --log-interval 10 --num-samples 3 " + extra;
}
[[maybe_unused]] static Run train(const std::string& dir, int steps, const std::string& extra = "") {
    return run(train_command(dir, steps, extra));
}
// The lines a run prints about steps after `from`, without the timings.
[[maybe_unused]] static std::string losses(const std::string& out, int from) {
    std::string s;
    size_t start = 0;
    for (size_t end; (end = out.find('\n', start)) != std::string::npos; start = end + 1) {
        std::string line = out.substr(start, end - start);
        if (line.rfind("step", 0) != 0 || std::atoi(line.c_str() + 4) <= from || has(line, "saved")) continue;
        size_t ms = line.find(" ms/step");
        s += (ms == std::string::npos ? line : line.substr(0, line.rfind(" | ", ms))) + "\n";
    }
    return s;
}

// Arguments: GROUP MOE MOE_INFER NAMES_TXT SCRATCH_DIR. Makes a fresh
// scratch dir for the group and a small copy of names.txt (3000 lines keep
// each run to a second or two). Returns the group.
[[maybe_unused]] static std::string setup(int argc, char** argv, const char* groups) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s %s MOE MOE_INFER NAMES_TXT SCRATCH_DIR\n", argv[0], groups);
        std::exit(2);
    }
    std::string group = argv[1];
    g_moe = argv[2], g_infer = argv[3], g_dir = std::string(argv[5]) + "/" + group;
    fs::remove_all(g_dir);
    fs::create_directories(g_dir);
    std::vector<Line> lines = split_lines(read_file(argv[4]));
    std::string small;
    for (size_t i = 0; i < lines.size() && i < 3000; i++) small += lines[i].text + "\n";
    g_small = g_dir + "/small.txt";
    write(g_small, small);
    return group;
}
