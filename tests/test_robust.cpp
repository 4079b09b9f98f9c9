// Nothing lost, nothing crashes: interrupts, a loss that blows up, a full
// disk, hostile checkpoints and data files, every flag's bad values, and
// kill -9 during checkpoint writes. Each case checks the exit code, the
// message and what is on disk afterwards.
//
//   test_robust GROUP MOE MOE_INFER NAMES_TXT SCRATCH_DIR
#include "cli.h"

#include <random>

// A checkpoint's step, or -1 if the file does not load as a whole checkpoint.
static int64_t step_of(const std::string& path) {
    try {
        Checkpoint ck = read_safetensors(path);
        Model m;
        load_model(m, ck);
        return meta_int(ck, "step");
    } catch (const std::exception&) {
        return -1;
    }
}

// Run moe in the background and send it `signals` (e.g. "INT" or "INT INT")
// after `delay` seconds; returns the exit code and the output.
static Run interrupt(const std::string& args, double delay, const std::string& signals) {
    std::string log = g_dir + "/interrupt.log";
    std::string kills;
    for (size_t i = 0, j; i < signals.size(); i = j + 1) {
        j = signals.find(' ', i);
        if (j == std::string::npos) j = signals.size();
        kills += "kill -" + signals.substr(i, j - i) + " $p; ";
    }
    char d[32];
    std::snprintf(d, sizeof d, "%.2f", delay);
    // sh -c 'SCRIPT' MOE: the script runs "$0" (the binary) in the background
    Run r = run("sh -c " + q("\"$0\" " + args + " > " + log + " 2>&1 & p=$!; sleep " + d + "; " + kills + "wait $p") +
                " " + q(g_moe));
    r.out = slurp(log);
    return r;
}

static void test_signals() {
    std::string dir = g_dir + "/sig", straight = g_dir + "/straight";
    std::string common = "-i " + q(g_small) + " --eval-interval 1000000 --log-interval 50 --num-samples 0";
    Run r = interrupt(common + " -o " + q(dir) + " --max-steps 100000000", 1.5, "INT");
    const std::string said = "stopped by Ctrl-C after step ";
    size_t at = r.out.find(said);
    int64_t step = at == std::string::npos ? -1 : std::atoll(r.out.c_str() + at + said.size());
    check(r.code == 130 && step > 0 && has(r.out, "--resume"),
          "Ctrl-C: exit 130 after finishing step %lld, says how to resume", (long long)step);
    check(step_of(dir + "/last.safetensors") == step, "Ctrl-C: last.safetensors loads and holds step %lld", (long long)step);
    // resuming the interrupted run equals never stopping it
    std::string to = " --max-steps " + std::to_string(step + 20);
    Run a = run(q(g_moe) + " " + common + " -o " + q(dir) + to + " --resume");
    Run b = run(q(g_moe) + " " + common + " -o " + q(straight) + to);
    check(a.code == 0 && b.code == 0 && slurp(dir + "/last.safetensors") == slurp(straight + "/last.safetensors"),
          "interrupted + --resume gives byte for byte the checkpoint of an unbroken run");

    std::string term = g_dir + "/term";
    r = interrupt(common + " -o " + q(term) + " --max-steps 100000000", 1.5, "TERM");
    check(r.code == 143 && has(r.out, "stopped by SIGTERM") && step_of(term + "/last.safetensors") > 0,
          "SIGTERM: exit 143 with a checkpoint that loads");
    std::string hup = g_dir + "/hup";
    r = interrupt(common + " -o " + q(hup) + " --max-steps 100000000", 1.5, "HUP");
    check(r.code == 129 && has(r.out, "--resume") && step_of(hup + "/last.safetensors") > 0,
          "SIGHUP (a closed terminal): exit 129 with a checkpoint that loads, as SIGTERM");

    // Two Ctrl-C in a row: out at once, and the checkpoint from before is whole.
    int64_t before = step_of(term + "/last.safetensors");
    r = interrupt(common + " -o " + q(term) + " --max-steps 100000000 --resume --eval-interval 1", 1.5, "INT INT");
    int64_t after = step_of(term + "/last.safetensors");
    check(r.code == 130 && after >= before, "second Ctrl-C exits at once (130); the checkpoint still loads (step %lld -> %lld)",
          (long long)before, (long long)after);
}

static void test_nan() {
    std::string dir = g_dir + "/nan";
    check(train(dir, 20).code == 0, "a good run to protect");
    std::string last = slurp(dir + "/last.safetensors"), best = slurp(dir + "/model.safetensors");
    Run r = train(dir, 400, "--resume --learning-rate 10");
    check(r.code == 1 && has(r.out, "at step") && has(r.out, "lower --learning-rate") &&
              (has(r.out, "loss became") || has(r.out, "NaN or infinite")),
          "a loss that blows up: exit 1, names the step, suggests a lower learning rate");
    check(slurp(dir + "/last.safetensors") == last && slurp(dir + "/model.safetensors") == best,
          "the blown-up run left the last good checkpoints untouched");
    // the gradient check names the first tensor that went bad
    Model m;
    model_init(m, 5);
    m.grads[m.tensors[7].offset + 3] = NAN;
    m.grads[m.tensors[9].offset] = INFINITY;
    const TensorInfo* t = bad_gradient(m);
    check(t && t->name == m.tensors[7].name, "a NaN gradient is reported in its tensor: %s", t ? t->name.c_str() : "none");
}

static void test_disk() {
    std::string dir = g_dir + "/disk";
    check(train(dir, 20).code == 0, "a good run to protect");
    std::string last = slurp(dir + "/last.safetensors");
    // A run's temporary files are NAME.tmp.PID. Run as `sh -c '...; exec moe'`,
    // moe has the shell's pid ($$), so its temporary file can be made in
    // advance: a link to /dev/full, where every write fails as on a full disk.
    auto with_full = [&](const std::string& path, const std::string& cmd) {
        return run("sh -c \"ln -s /dev/full " + path + ".tmp.\\$\\$; exec " + cmd + "\"");
    };
    auto temps = [](const std::string& d) {  // the temporary files left in d
        int n = 0;
        for (const auto& e : fs::directory_iterator(d)) n += has(e.path().filename().string(), ".tmp.");
        return n;
    };
    Run r = with_full(dir + "/last.safetensors", train_command(dir, 40, "--resume"));
    check(r.code == 1 && has(r.out, "cannot write checkpoint") && has(r.out, "No space left on device"),
          "a full disk (writes redirected to /dev/full): exit 1, says so");
    check(slurp(dir + "/last.safetensors") == last && temps(dir) == 0,
          "the previous checkpoint survives and the temporary file is gone");
    // Temporary names are the process's own: another's file of the old fixed
    // name is left alone, and a dead run's leftover is cleared by the next.
    write(dir + "/last.safetensors.tmp", "someone else's"), write(dir + "/model.safetensors.tmp.999999999", "left over");
    r = train(dir, 40, "--resume");
    check(r.code == 0 && slurp(dir + "/last.safetensors.tmp") == "someone else's" && temps(dir) == 0,
          "temporary names are unique to the process; a dead run's are removed (exit %d)", r.code);
    fs::remove(dir + "/last.safetensors.tmp");
    r = train("/dev/null/out", 20);
    check(r.code == 1 && has(r.out, "cannot use work dir"), "a work dir that cannot be created: exit 1, says so");
    // What the run will write is tried before the first step, not found after it.
    std::string blocked = g_dir + "/blocked", full = g_dir + "/full";
    fs::create_directories(blocked + "/log.tsv");
    r = train(blocked, 20);
    check(r.code == 1 && has(r.out, "log.tsv': it is there and is not a file") &&
              !has(r.out, "step     10"),
          "log.tsv is a directory: exit 1 before the first step, says so (exit %d)", r.code);
    fs::create_directories(full);
    r = with_full(full + "/.probe", train_command(full, 20));
    check(r.code == 1 && has(r.out, "No space left on device") && !has(r.out, "step     10"),
          "a full disk is found before the first step: exit 1, says so (exit %d)", r.code);
    // Two trainings in one work dir: the second is refused while the first runs.
    std::string shared = g_dir + "/shared", log1 = g_dir + "/first.log", log2 = g_dir + "/second.log";
    const std::string args = "-i " + q(g_small) + " -o " + q(shared) + " --max-steps 100000000 --eval-interval 1000000 --num-samples 0";
    Run both = run("sh -c " + q("\"$0\" " + args + " > " + log1 + " 2>&1 & p=$!; sleep 1.5; \"$0\" " + args + " --overwrite > " + log2 +
                                " 2>&1; echo $? >> " + log2 + "; kill -INT $p; wait $p") + " " + q(g_moe));
    const std::string second = slurp(log2), first = slurp(log1);
    check(has(second, "is in use by process") && has(second, "\n1\n") && has(first, "stopped by Ctrl-C"),
          "a second training in the same work dir: exit 1, 'in use by process N'; the first goes on until stopped");
    if (!has(second, "is in use by process")) std::printf("%s\n", second.c_str());
    (void)both;
}

// Rebuild a safetensors file with a new header (same data).
static std::string with_header(const std::string& file, const std::string& header) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | (unsigned char)file[i];
    std::string out(8, '\0');
    for (int i = 0; i < 8; i++) out[i] = (char)(header.size() >> (8 * i));
    return out + header + file.substr(8 + n);
}
static std::string header_of(const std::string& file) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | (unsigned char)file[i];
    return file.substr(8, n);
}
static std::string replace_first(std::string s, const std::string& a, const std::string& b) {
    size_t at = s.find(a);
    return at == std::string::npos ? s : s.replace(at, a.size(), b);
}

static void test_checkpoints() {
    std::string dir = g_dir + "/ck";
    check(train(dir, 20).code == 0, "a run whose checkpoint we damage");
    const std::string good = slurp(dir + "/model.safetensors"), h = header_of(good);
    std::string n_layer = "\"n_layer\":\"" + std::to_string(N_LAYER) + "\"";
    struct Case {
        const char* what;
        std::string file, msg;
    } cases[] = {
        {"empty file", "", "shorter than the 8-byte header"},
        {"header length past the end", good.substr(0, 8) + h.substr(0, 10), "runs past the end"},
        {"absurd header length", std::string("\0\0\0\0\0\1\0\0", 8) + good.substr(8), "runs past the end"},
        {"invalid JSON", with_header(good, replace_first(h, "\"dtype\":", "\"dtype\"")), "invalid JSON"},
        {"not JSON at all", with_header(good, std::string(h.size(), 'x')), "invalid JSON"},
        {"nested too deeply", with_header(good, std::string(50, '[') + std::string(50, ']')), "nested too deeply"},
        {"duplicate tensor", with_header(good, replace_first(h, "\"lm_head.weight\"", "\"transformer.wte.weight\"")), "appears twice"},
        {"missing tensor", with_header(good, replace_first(h, "\"lm_head.weight\"", "\"lm_head.weigh_\"")), "lacks tensor 'lm_head.weight'"},
        {"wrong dtype", with_header(good, replace_first(h, "\"F32\"", "\"F16\"")), "F32 only"},
        {"shape against the build", with_header(good, replace_first(h, "\"shape\":[" + std::to_string(BLOCK_SIZE) + "," + std::to_string(C) + "]", "\"shape\":[" + std::to_string(C) + "," + std::to_string(BLOCK_SIZE) + "]")), "but this build expects"},
        {"offsets disagree with the shape", with_header(good, replace_first(h, "\"data_offsets\":[0,", "\"data_offsets\":[4,")), ""},
        {"offsets outside the data", with_header(good, replace_first(h, "\"shape\":[" + std::to_string(C) + "]", "\"shape\":[" + std::to_string(C * 1000000) + "]")), ""},
        {"absurd shape", with_header(good, replace_first(h, "\"shape\":[" + std::to_string(C) + "]", "\"shape\":[4000000000,4000000000]")), "absurdly large"},
        {"stray bytes after the data", good + "xxxx", "stray bytes"},
        {"metadata missing", with_header(good, replace_first(h, n_layer + ",", "")), "lacks metadata 'n_layer'"},
        {"vocabulary not hex", with_header(good, replace_first(h, "\"vocab\":\"", "\"vocab\":\"zz")), ""},
        {"metadata value not a string", with_header(good, replace_first(h, n_layer, "\"n_layer\":4")), "is not a string"},
    };
    int i = 0;
    for (const auto& c : cases) {
        std::string path = g_dir + "/bad" + std::to_string(i++) + ".safetensors";
        write(path, c.file);
        Run r = run(q(g_moe) + " --sample-only --checkpoint " + q(path));
        bool ok = r.code == 1 && has(r.out, "error: ") && has(r.out, c.msg);
        check(ok, "checkpoint with %s: exit %d, a clear error%s%s", c.what, r.code, c.msg.empty() ? "" : ": ", c.msg.c_str());
        if (!ok) std::printf("%s\n", r.out.c_str());
    }
    // A file too big to be a checkpoint is refused before it is read.
    std::string big = g_dir + "/big.safetensors";
    write(big, "x");
    fs::resize_file(big, (uint64_t)3 << 30);  // sparse: takes no disk space
    Run r = run(q(g_moe) + " --sample-only --checkpoint " + q(big));
    check(r.code == 1 && has(r.out, "more than any checkpoint of this build"), "a 3 GiB file as a checkpoint: refused at once");
    fs::remove(big);
}

static void test_data() {
    std::string d = g_dir + "/";
    auto expect = [&](const char* what, const std::string& args, const std::string& msg) {
        Run r = run(q(g_moe) + " -o " + q(d + "out") + " --max-steps 5 --num-samples 0 " + args);
        bool ok = r.code == 1 && has(r.out, msg) && !fs::exists(d + "out/last.safetensors");
        check(ok, "%s: exit %d, says '%s', writes nothing", what, r.code, msg.c_str());
        if (!ok) std::printf("%s\n", r.out.c_str());
    };
    write(d + "nul.txt", std::string("emma\nab\0c\n", 10));
    expect("a NUL byte in line mode", "-i " + q(d + "nul.txt"), "nul.txt:2: a NUL byte");
    expect("a device as the data file", "-i /dev/null", "is not a file or a pipe");
    // A pipe is read to its end, under the same size limit as a file.
    run("mkfifo " + q(d + "fifo"));
    // `cmd > fifo` in the background; it gives up after 30 s if nothing reads the pipe
    auto feed = [&](const std::string& cmd) {
        return "timeout 30 sh -c " + q(cmd + " > " + d + "fifo") + " > /dev/null 2>&1 & ";
    };
#if !MOE_SANITIZED  // a gigabyte through a pipe takes minutes under a sanitizer, and tests no memory access
    Run big = run(feed("head -c 1100000000 /dev/zero") + q(g_moe) + " -i " + q(d + "fifo") + " -o " +
                  q(d + "out") + " --max-steps 5");
    check(big.code == 1 && has(big.out, "(a pipe) goes on past that") && !fs::exists(d + "out/last.safetensors"),
          "a pipe longer than the limit: exit %d, says so, writes nothing", big.code);
#endif
    write(d + "huge.txt", "x");
    fs::resize_file(d + "huge.txt", (uint64_t)3 << 30);
    expect("a 3 GiB data file", "-i " + q(d + "huge.txt"), "takes at most");
    fs::remove(d + "huge.txt");
    write(d + "short.txt", "hello world\n");
    expect("a file too small for one text window", "--text -i " + q(d + "short.txt"), "text mode needs at least");
    write(d + "empty.txt", "");
    expect("an empty file", "-i " + q(d + "empty.txt"), "is empty");
    write(d + "blank.txt", "\n \n"), write(d + "blank2.txt", "\r\n\n\r\n");
    expect("only line endings", "-i " + q(d + "blank2.txt"), "no non-empty lines");
    expect("a directory", "-i " + q(g_dir), "is a directory");
    // CRLF is LF: the same lines with either ending train to the same bytes.
    std::string lf = slurp(g_small), crlf;
    for (char c : lf) crlf += c == '\n' ? std::string("\r\n") : std::string(1, c);
    write(d + "crlf.txt", crlf);
    Run a = run(q(g_moe) + " -i " + q(g_small) + " -o " + q(d + "lf") + " --max-steps 20 --num-samples 0");
    Run b = run(q(g_moe) + " -i " + q(d + "crlf.txt") + " -o " + q(d + "crlf") + " --max-steps 20 --num-samples 0");
    // (the weights and moments, byte for byte; the headers differ only in the data file they name)
    auto tensors = [](const std::string& f) { return f.size() < 8 ? f : f.substr(8 + header_of(f).size()); };
    check(a.code == 0 && b.code == 0 && tensors(slurp(d + "lf/last.safetensors")) == tensors(slurp(d + "crlf/last.safetensors")),
          "CRLF line endings train exactly as LF");
    Run p = run(feed("cat " + g_small) + q(g_moe) + " -i " + q(d + "fifo") + " -o " +
                q(d + "piped") + " --max-steps 20 --num-samples 0");
    check(p.code == 0 && tensors(slurp(d + "lf/last.safetensors")) == tensors(slurp(d + "piped/last.safetensors")),
          "-i from a pipe trains exactly as from the file (exit %d)", p.code);
    const std::string ck = " --checkpoint " + q(d + "lf/model.safetensors") + " --eval ";
    Run ef = run(q(g_moe) + ck + q(g_small)), ep = run("cat " + q(g_small) + " | " + q(g_moe) + ck + "/dev/stdin");
    auto loss = [](const std::string& out) { return out.substr(0, out.find('\n')).substr(out.find(" loss ")); };
    check(ef.code == 0 && ep.code == 0 && has(ep.out, "eval /dev/stdin loss") && loss(ef.out) == loss(ep.out),
          "--eval from a pipe (/dev/stdin) gives the file's loss: %s", ep.out.substr(0, ep.out.find('\n')).c_str());
}

// Memory follows the bytes of a line file, not its number of lines: 8 MB of
// two-byte lines (2.8 million examples) trains under a 200 MB address-space
// limit (it needed 465 MB when each line was a container of its own). Under
// a tighter limit the error names the file and its size. (Not under the
// sanitizers: their shadow memory needs terabytes of address space.)
static void test_memory() {
#if MOE_SANITIZED
    std::printf("skipped under a sanitizer\n");
#else
    std::string d = g_dir + "/", file = d + "two.txt", s;
    std::mt19937 gen(1);
    for (int i = 0; i < 8 * 1024 * 1024 / 3; i++) s += {char('a' + gen() % 26), char('a' + gen() % 26), '\n'};
    write(file, s);
    auto limited = [&](int kb, const std::string& out) {
        return run("ulimit -v " + std::to_string(kb) + "; " + q(g_moe) + " -i " + q(file) + " -o " + q(d + out) +
                   " --max-steps 1 --threads 1 --num-samples 0");
    };
    Run a = limited(200000, "fits");
    check(a.code == 0 && fs::exists(d + "fits/model.safetensors"),
          "2.8 million lines of 2 bytes train in 200 MB of address space (exit %d)", a.code);
    if (a.code) std::printf("%s\n", a.out.c_str());
    Run b = limited(50000, "tight");
    check(b.code == 1 && has(b.out, "out of memory") && has(b.out, "two.txt") && has(b.out, "8388606 bytes") &&
              !fs::exists(d + "tight/last.safetensors"),
          "in 50 MB: exit %d, the error names the file and its size", b.code);
    if (b.code != 1) std::printf("%s\n", b.out.c_str());
    fs::remove(file);
#endif
}

static void test_flags() {
    struct Flag {
        const char* name;
        bool zero_ok;
    } flags[] = {{"--max-steps", false},     {"--seed", true},          {"--batch-size", false},
                 {"--learning-rate", true},  {"--weight-decay", true},  {"--aux-coef", true},
                 {"--eval-interval", false}, {"--log-interval", false}, {"--temperature", true},
                 {"--top-k", true},          {"--num-samples", true},   {"--max-new-tokens", true},
                 {"--threads", false}};
    // -1, abc, 1e999 and a huge number are never valid; 0 is for some flags.
    int n = 0;
    for (const auto& f : flags) {
        for (std::string v : {"-1", "abc", "1e999", "99999999999999999999", "0", ""}) {
            bool missing = v.empty();
            if (v == "0" && f.zero_ok) {
                // accepted: the run then fails on the missing checkpoint instead (exit 1, not 2)
                Run r = run(q(g_moe) + " --sample-only --checkpoint " + q(g_dir + "/none") + " " + f.name + " 0");
                check(r.code == 1 && has(r.out, "does not exist"), "%s 0 is accepted", f.name);
                continue;
            }
            Run r = run(q(g_moe) + " " + f.name + (missing ? "" : " " + q(v)));
            // the error and one line pointing to --help, not the whole usage that would scroll it away
            bool ok = r.code == 2 && has(r.out, std::string(f.name) + " needs") && has(r.out, "--help") &&
                      !has(r.out, "usage:") && std::count(r.out.begin(), r.out.end(), '\n') == 2;
            n++;
            if (!ok) check(false, "%s '%s': exit %d: %s", f.name, v.c_str(), r.code, r.out.substr(0, 200).c_str());
        }
    }
    check(true, "%d bad flag values each exit 2 with the flag named, in two lines (the error, and --help)", n);
    Run r = run(q(g_moe) + " --eval");
    check(r.code == 2 && has(r.out, "--eval needs at least one file"), "--eval without files: exit 2");
}

// kill -9 at random moments while checkpoints are written every step: the
// checkpoint on disk must always load, and be the old one or a newer one.
static void test_killloop() {
    std::string dir = g_dir + "/kill";
    check(train(dir, 10).code == 0, "a first checkpoint");
    // How long a run takes to start and write its first checkpoint (much
    // longer under a sanitizer): the kills are spread around that time.
    double t0 = now_ms();
    train(dir, 11, "--resume");
    double first = (now_ms() - t0) / 1000;
    std::mt19937 gen(12345);
    std::uniform_real_distribution<double> when(0.6 * first, 1.8 * first);
    int64_t prev = step_of(dir + "/last.safetensors");
    int kills = 0, whole = 0, progressed = 0;
    for (int i = 0; i < 50; i++) {
        std::string args = "-i " + q(g_small) + " -o " + q(dir) +
                           " --resume --max-steps 100000000 --eval-interval 1 --log-interval 1000 --num-samples 0";
        interrupt(args, when(gen), "KILL");
        kills++;
        int64_t now = step_of(dir + "/last.safetensors");
        whole += now >= prev;
        progressed += now > prev;
        prev = std::max(prev, now);
    }
    check(whole == kills, "kill -9 x%d during checkpoint writes: the checkpoint loaded and was old or new every time (%d)",
          kills, whole);
    check(progressed > 0, "training progressed between kills in %d of %d rounds (last step %lld)", progressed, kills,
          (long long)prev);
}

int main(int argc, char** argv) {
    std::string group = setup(argc, argv, "signals|nan|disk|checkpoints|data|memory|flags|killloop");
    if (group == "signals") test_signals();
    else if (group == "nan") test_nan();
    else if (group == "disk") test_disk();
    else if (group == "checkpoints") test_checkpoints();
    else if (group == "data") test_data();
    else if (group == "memory") test_memory();
    else if (group == "flags") test_flags();
    else if (group == "killloop") test_killloop();
    else return std::fprintf(stderr, "unknown group %s\n", group.c_str()), 2;
    return report(("test_robust " + group).c_str());
}
