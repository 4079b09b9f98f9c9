// The command line, run as a user runs it: exact resume, thread-count
// independence, bad input (clear error, non-zero exit, good checkpoint
// untouched), and the inference-only binary against the training one.
//
//   test_cli GROUP MOE MOE_INFER NAMES_TXT SCRATCH_DIR
#include "cli.h"

#include <regex>

static void test_resume() {
    std::string a = g_dir + "/resume_a", b = g_dir + "/resume_b";
    Run ra = train(a, 40);
    Run rb1 = train(b, 20);
    Run rb2 = train(b, 40, "--resume");
    check(ra.code == 0 && rb1.code == 0 && rb2.code == 0, "40 steps, and 20 + resume to 40, all exit 0");
    check(has(rb2.out, "resuming from"), "the resumed run says where it resumed from");
    check(slurp(a + "/last.safetensors") == slurp(b + "/last.safetensors"),
          "resume: last.safetensors (weights, AdamW moments, step, generator) is byte-identical");
    check(slurp(a + "/model.safetensors") == slurp(b + "/model.safetensors"), "resume: the best model is byte-identical");
    std::string la = losses(ra.out, 20), lb = losses(rb2.out, 20);
    check(!la.empty() && la == lb, "resume: the losses printed for steps 21-40 are identical:\n%s", la.c_str());
    Run rc = train(b, 40, "--resume");
    check(rc.code == 0 && has(rc.out, "nothing to train"), "resuming a finished run trains nothing and says so");

    // --resume remembers its data: without -i it continues on the run's own
    // file (here from a directory without names.txt, the default), and
    // another file is refused unless --new-data says so.
    std::string f = g_dir + "/remember", other = g_dir + "/other.txt";
    check(train(f, 20).code == 0, "a run to resume");
    Run own = run("cd " + q(g_dir) + " && " + q(g_moe) + " -o " + q(f) + " --max-steps 30 --eval-interval 10 --num-samples 0 --resume");
    check(own.code == 0 && has(own.out, "data: " + g_small), "--resume without -i continues on the run's own data file");
    std::string small = read_file(g_small);
    write(other, small.substr(0, small.size() / 2));
    Run mixed = run(q(g_moe) + " -i " + q(other) + " -o " + q(f) + " --max-steps 40 --resume");
    check(mixed.code == 1 && has(mixed.out, "was trained on '" + g_small + "'") && has(mixed.out, "--new-data"),
          "--resume with another -i: exit 1, names the run's file and --new-data");
    Run meant = run(q(g_moe) + " -i " + q(other) + " -o " + q(f) + " --max-steps 40 --eval-interval 10 --num-samples 0 --resume --new-data");
    check(meant.code == 0, "... and with --new-data it continues on the other file (exit %d)", meant.code);

    // Fine-tuning from the work dir's own model, with no last.safetensors: the
    // model it holds is replaced only by a better one. First as it comes
    // (whatever the new losses, the model changes exactly when one beat the
    // carried loss), then with a loss no model beats (it must not change).
    std::string e = g_dir + "/finetune";
    check(train(e, 20).code == 0, "a model to fine-tune");
    for (int unbeatable = 0; unbeatable < 2; unbeatable++) {
        fs::remove(e + "/last.safetensors");
        if (unbeatable) {  // the same bytes but a best loss of nearly 0 (same length, so the header stays valid)
            std::string ck = slurp(e + "/model.safetensors");
            size_t at = ck.find("\"best_test_loss\":\"") + 18, end = ck.find('"', at);
            ck.replace(at, end - at, "0." + std::string(end - at - 3, '0') + "1");
            write(e + "/model.safetensors", ck);
        }
        const std::string before = slurp(e + "/model.safetensors");
        Run ft = train(e, 20, "--resume --checkpoint " + q(e + "/model.safetensors") + " --learning-rate 1e-3");
        std::smatch held;
        double carried = std::regex_search(ft.out, held, std::regex("holds test loss ([0-9.]+)")) ? std::stod(held[1]) : NAN;
        bool better = false;  // did an evaluation of the fine-tuned model beat the carried loss?
        const std::regex eval_line("test loss ([0-9.]+) \\|");
        for (std::sregex_iterator it(ft.out.begin(), ft.out.end(), eval_line), end; it != end; ++it)
            better |= std::stod((*it)[1]) < carried;
        const bool changed = slurp(e + "/model.safetensors") != before;
        check(ft.code == 0 && std::isfinite(carried) && changed == better && (!unbeatable || !changed),
              "fine-tuning into the model's own dir carries its test loss (%.4f); the model %s", carried,
              changed ? "is replaced by a better one" : "is kept: nothing beat it");
    }

    // nanoGPT's recipe, every part of it on: the schedule's position and the
    // dropout masks continue exactly. (The cosine ends at --lr-decay-steps,
    // given here, so that the 20-step run follows the 40-step schedule.)
    const std::string recipe = "--lr-schedule cosine --warmup-steps 5 --min-lr 1e-4 --lr-decay-steps 40 "
                               "--learning-rate 2e-3 --grad-clip 0.5 --dropout 0.1 --decay 2d --weight-decay 0.1";
    std::string c = g_dir + "/recipe_a", d = g_dir + "/recipe_b";
    Run r40 = train(c, 40, recipe), r20 = train(d, 20, recipe), r2040 = train(d, 40, recipe + " --resume");
    check(r40.code == 0 && r20.code == 0 && r2040.code == 0 && has(r40.out, "| norm ") && has(r40.out, "| lr "),
          "the recipe's runs exit 0 and print the rate and the gradient norm");
    check(slurp(c + "/last.safetensors") == slurp(d + "/last.safetensors"),
          "recipe resume: last.safetensors (with the dropout generator) is byte-identical to an unbroken run");
    check(losses(r40.out, 20) == losses(r2040.out, 20), "recipe resume: the losses, rates and norms of steps 21-40 are identical");
    check(slurp(c + "/last.safetensors") != slurp(a + "/last.safetensors"), "the recipe changes the run");
}

static void test_threads() {
    // 3 threads on this 2-core machine: cuts at other places, moved by the
    // timing of a crowded machine (see parallel_for); the results must not move.
    std::string a = g_dir + "/threads_1", b = g_dir + "/threads_2", c = g_dir + "/threads_3";
    Run r1 = train(a, 30, "--threads 1"), r2 = train(b, 30, "--threads 2"), r3 = train(c, 30, "--threads 3");
    check(r1.code == 0 && r2.code == 0 && r3.code == 0, "training with 1, 2 and 3 threads exits 0");
    check(slurp(a + "/last.safetensors") == slurp(b + "/last.safetensors"),
          "1 and 2 threads give byte-identical checkpoints after 30 steps");
    check(slurp(a + "/last.safetensors") == slurp(c + "/last.safetensors"),
          "1 and 3 threads give byte-identical checkpoints after 30 steps");
    check(losses(r1.out, 0) == losses(r2.out, 0) && losses(r1.out, 0) == losses(r3.out, 0),
          "1, 2 and 3 threads print the same losses");
}

// Two builds that must train the same model: MOE (argument 2) and the one in
// argument 3's place, e.g. top-p with a threshold near 0 (one expert a
// token) and the top-1 build. Their metadata differ; every tensor must not.
static std::string tensor_bytes(const std::string& path) {  // a safetensors file without its header
    std::string f = slurp(path);
    if (f.size() < 8) return "";
    uint64_t n = 0;
    for (int i = 7; i >= 0; i--) n = n << 8 | (unsigned char)f[i];
    return n + 8 <= f.size() ? f.substr(8 + n) : "";
}
static void test_same() {
    std::string a = g_dir + "/a", b = g_dir + "/b";
    Run ra = train(a, 30), rb = run(q(g_infer) + " -i " + q(g_small) + " -o " + q(b) +
                                    " --max-steps 30 --eval-interval 20 --log-interval 10 --num-samples 3");
    check(ra.code == 0 && rb.code == 0, "both builds train 30 steps (exit %d, %d)", ra.code, rb.code);
    for (const char* f : {"/model.safetensors", "/last.safetensors"}) {
        const std::string ta = tensor_bytes(a + f), tb = tensor_bytes(b + f);
        check(!ta.empty() && ta == tb, "%s: every tensor byte-identical (%zu bytes of tensors)", f + 1, ta.size());
    }
}

// A top-p build (argument 2): what it reports about the experts each token
// took, and the threshold as part of the model (the default inference build,
// argument 3, must refuse its checkpoint).
static void test_topp() {
    const std::string dir = g_dir + "/run";
    Run r = train(dir, 40, "--threads 1");
    check(r.code == 0 && has(r.out, "| experts/token ") && has(r.out, "| entropy ") && has(r.out, "at most: "),
          "training prints experts per token, the router entropy and the range of active parameters");
    std::vector<Line> log = split_lines(slurp(dir + "/log.tsv"));
    bool in_range = log.size() == 3;  // the header and the evaluations at steps 20 and 40
    for (size_t i = 1; i < log.size(); i++) {
        const double x = std::strtod(log[i].text.c_str() + log[i].text.rfind('\t') + 1, nullptr);
        in_range = in_range && x >= 1 && x <= K;
    }
    check(!log.empty() && has(log[0].text, "\texperts_per_token") && in_range,
          "log.tsv has an experts_per_token column, between 1 and %d at every evaluation", K);
    const std::string ck = " --checkpoint " + q(dir + "/model.safetensors");
    Run ev = run(q(g_moe) + ck + " --eval " + q(g_small));
    double ex = 0;
    const size_t at = ev.out.find("  experts per token ");
    if (at != std::string::npos) ex = std::strtod(ev.out.c_str() + at + 20, nullptr);
    check(ev.code == 0 && ex >= 1 && ex <= K && has(ev.out, "experts per token (top-p, mean over layers) by the byte read: "),
          "--eval prints experts per token for the file (%.3f) and by the class of byte read", ex);
    Run rt = run(q(g_moe) + ck + " --route emma --gates");
    // each byte's cell in each layer ends with "(n)": n must be the number of experts listed in it
    int rows = 0, bad = 0;
    for (const Line& l : split_lines(rt.out)) {
        if (l.text.rfind("  ", 0) != 0 || l.text.find(" |") == std::string::npos || has(l.text, "byte")) continue;
        rows++;
        size_t p = l.text.find(" |");
        while (p != std::string::npos) {
            const size_t q2 = l.text.find(" |", p + 2);
            const std::string cell = l.text.substr(p + 2, q2 == std::string::npos ? std::string::npos : q2 - p - 2);
            int listed = 0;
            for (size_t e = cell.find(" e"); e != std::string::npos; e = cell.find(" e", e + 2)) listed++;
            const size_t open = cell.rfind('(');
            bad += open == std::string::npos || std::atoi(cell.c_str() + open + 1) != listed || listed < 1;
            p = q2;
        }
    }
    check(rt.code == 0 && rows == 5 && bad == 0, "--route --gates: each of the %d bytes shows how many experts it got "
          "in each layer, as many as it lists (%d wrong)", rows, bad);
    Run other = run(q(g_infer) + ck + " --eval " + q(g_small));
    check(other.code != 0 && has(other.out, "top_p=0.5") && has(other.out, "-DMOE_TOP_P=0.5"),
          "a build without top-p refuses the checkpoint, naming the rebuild: %s",
          other.out.substr(0, other.out.find('\n')).c_str());
}

static void test_bad_input() {
    std::string good = g_dir + "/good";
    check(train(good, 20).code == 0, "a good run to protect");
    const std::string model = slurp(good + "/model.safetensors"), last = slurp(good + "/last.safetensors");
    auto untouched = [&] {
        return slurp(good + "/model.safetensors") == model && slurp(good + "/last.safetensors") == last;
    };
    auto expect = [&](const char* what, const std::string& args, int code, const std::string& msg) {
        Run r = run(q(g_moe) + " -o " + q(good) + " " + args);
        bool ok = r.code == code && has(r.out, msg) && untouched();
        check(ok, "%s: exit %d, says '%s', checkpoints untouched", what, r.code, msg.c_str());
        if (!ok) std::printf("%s\n", r.out.c_str());
    };
    std::string empty = g_dir + "/empty.txt", blank = g_dir + "/blank.txt", longl = g_dir + "/long.txt";
    write(empty, ""), write(blank, "\n\n\r\n"), write(longl, "ok\n" + std::string(BLOCK_SIZE + 5, 'x') + "\n");
    expect("missing data file", "-i " + q(g_dir + "/nope.txt"), 1, "no such file");
    expect("data file is a directory", "-i " + q(g_dir), 1, "is a directory");
    expect("empty data file", "-i " + q(empty), 1, "is empty");
    expect("only blank lines", "-i " + q(blank), 1, "no non-empty lines");
    expect("line longer than the context", "-i " + q(longl), 1, "long.txt:2: line of");
    expect("unknown flag", "--bogus", 2, "unknown option '--bogus'");
    expect("negative step count", "--max-steps -5", 2, "--max-steps needs an integer");
    expect("non-numeric learning rate", "--learning-rate fast", 2, "--learning-rate needs a number");
    expect("flag without its value", "--seed", 2, "--seed needs a value");
    expect("warmup longer than the run", "--max-steps 20 --warmup-steps 50", 2, "is more than --max-steps");
    expect("warmup that leaves no cosine", "--max-steps 20 --warmup-steps 20 --lr-schedule cosine", 2, "leaves no steps");
    expect("negative gradient clip", "--grad-clip -1", 2, "--grad-clip needs a number from 0");
    expect("non-finite gradient clip", "--grad-clip nan", 2, "--grad-clip needs a number");
    expect("dropout of 1", "--dropout 1", 2, "--dropout needs a probability below 1");
    expect("negative dropout", "--dropout -0.1", 2, "--dropout needs a number from 0 to 1");
    expect("infinite dropout", "--dropout inf", 2, "--dropout needs a number");
    expect("min-lr above the rate", "--learning-rate 1e-3 --min-lr 1e-2", 2, "is above the learning rate");
    expect("unknown schedule", "--lr-schedule linear", 2, "--lr-schedule takes constant or cosine");
    expect("unknown decay rule", "--decay biases", 2, "--decay takes all or 2d");
    expect("--resume with --eval", "--resume --eval " + q(g_small), 2, "--resume trains, and --eval uses a trained model");
    expect("--resume with --sample-only", "--resume --sample-only", 2, "--resume trains, and --sample-only");
    expect("--prompt with --num-samples", "--prompt em --num-samples 3", 2, "--prompt makes one continuation");
    // longer than the context the model trained on (its longest name + 1), though within BLOCK_SIZE
    std::string longer = g_dir + "/longer.txt", word(BLOCK_SIZE - 2, 'a');
    write(longer, "emma\n" + word + "\n");
    expect("--eval line longer than the trained context", "--eval " + q(longer), 1, "the model was trained on lines of at most");
    expect("--prompt that fills the context", "--prompt " + word, 1, "give a shorter prompt");

    std::string trunc = g_dir + "/trunc.safetensors", bad = g_dir + "/badjson.safetensors",
                other = g_dir + "/other.safetensors", nan = g_dir + "/nan.safetensors";
    write(trunc, last.substr(0, last.size() / 2));
    std::string b = last;
    b[8] = '[';  // the header no longer starts an object
    write(bad, b);
    std::string o = last;  // the same file claiming one more layer than this build has
    size_t at = o.find("\"n_layer\":\"");
    o[at + 11] = (char)('0' + (N_LAYER % 9) + 1);
    write(other, o);
    std::string other2 = g_dir + "/other2.safetensors", o2 = o;  // ... and also another block size
    size_t bs = o2.find("\"block_size\":\"");
    o2.replace(bs, 14 + std::to_string(BLOCK_SIZE).size(), "\"block_size\":\"" + std::to_string(BLOCK_SIZE + 1));
    write(other2, o2);
    std::string n = last;
    size_t hdr = 0;
    for (int i = 7; i >= 0; i--) hdr = hdr << 8 | (unsigned char)n[i];
    std::memset(&n[8 + hdr], 0xff, 4);  // the first weight becomes a NaN
    write(nan, n);
    expect("missing checkpoint", "--resume --checkpoint " + q(g_dir + "/none.safetensors"), 1, "does not exist");
    expect("truncated checkpoint", "-i " + q(g_small) + " --resume --checkpoint " + q(trunc), 1, "truncated");
    expect("corrupted checkpoint", "-i " + q(g_small) + " --resume --checkpoint " + q(bad), 1, "invalid JSON");
    expect("checkpoint of another configuration", "-i " + q(g_small) + " --resume --checkpoint " + q(other), 1,
           "rebuild with -DMOE_N_LAYER=");
    expect("checkpoint with two constants of another configuration", "-i " + q(g_small) + " --resume --checkpoint " + q(other2), 1,
           " -DMOE_BLOCK_SIZE=" + std::to_string(BLOCK_SIZE + 1) + " (g++");
    expect("NaN in a checkpoint", "--sample-only --checkpoint " + q(nan), 1, "NaN");
    std::string odd = g_dir + "/odd.txt";
    write(odd, "abc\nab%c\n");
    expect("byte outside the vocabulary", "--eval " + q(odd), 1, "odd.txt:2: byte '%'");
    // a fresh run where a trained model is: refused, naming it and the ways on
    expect("fresh run into a work dir that holds a model", "-i " + q(g_small) + " --max-steps 5", 1,
           "already holds a trained model (model.safetensors: step 20, test loss ");
    Run keep = run(q(g_moe) + " -i " + q(g_small) + " -o " + q(good) + " --max-steps 5");
    check(has(keep.out, "--resume") && has(keep.out, "another work dir with -o") && has(keep.out, "--overwrite"),
          "... and the message names --resume, -o and --overwrite");
    Run over = train(good, 5, "--overwrite");
    check(over.code == 0 && slurp(good + "/model.safetensors") != model && has(slurp(good + "/last.safetensors"), "\"step\":\"5\""),
          "--overwrite: the fresh run replaces the model (exit %d)", over.code);
}

static void test_inference() {
    std::string dir = g_dir + "/infer";
    check(train(dir, 20).code == 0, "a run to load");
    std::string ck = q(dir + "/model.safetensors");
    Run t = run(q(g_moe) + " --checkpoint " + ck + " --eval " + q(g_small));
    Run i = run(q(g_infer) + " --checkpoint " + ck + " --eval " + q(g_small));
    // every line of the file is one prediction per byte plus the end marker
    std::string data = read_file(g_small);
    int64_t tokens = 0;
    for (const auto& l : split_lines(data)) tokens += (int64_t)l.text.size() + 1;
    std::string want = "eval " + g_small + " loss ";
    check(t.code == 0 && t.out.rfind(want, 0) == 0 && has(t.out, " tokens " + std::to_string(tokens) + "\n"),
          "--eval prints 'eval FILE loss X tokens %lld': %s", (long long)tokens, t.out.c_str());
    check(i.code == 0 && i.out == t.out, "the inference-only binary evaluates identically");
    Run s = run(q(g_infer) + " -i " + q(g_small) + " --checkpoint " + ck + " --num-samples 5 --seed 7");
    Run s2 = run(q(g_moe) + " -i " + q(g_small) + " --sample-only --checkpoint " + ck + " --num-samples 5 --seed 7");
    check(s.code == 0 && s.out == s2.out && has(s.out, "samples that are new"),
          "inference-only samples equal the training binary's --sample-only samples");
    Run p = run(q(g_infer) + " --checkpoint " + ck + " --prompt em --seed 3");
    check(p.code == 0 && p.out.rfind("em", 0) == 0, "--prompt continues the prompt: %s", p.out.c_str());
    for (const char* flag : {"--resume", "--max-steps 5", "--learning-rate 0.1", "--val x", "--overwrite"}) {
        Run r = run(q(g_infer) + " --checkpoint " + ck + " " + flag);
        check(r.code == 2 && has(r.out, "training flag") && has(r.out, "inference-only"),
              "the inference-only binary refuses %s: exit %d", flag, r.code);
    }
    Run h = run(q(g_infer) + " --help"), th = run(q(g_moe) + " --help");
    check(h.code == 0 && has(h.out, "inference-only build") && has(h.out, "--eval FILE") && !has(h.out, "--max-steps") &&
              !has(h.out, "--resume") && th.code == 0 && has(th.out, "--max-steps") && !has(th.out, "inference-only build"),
          "each build's --help lists what that build does");
}

// --ablate and --knockout on a small trained model.
static void test_knockout() {
    std::string dir = g_dir + "/knockout";
    check(train(dir, 40).code == 0, "a run to take apart");
    const std::string ck = " --checkpoint " + q(dir + "/model.safetensors") + " ", few = dir + "/few.txt";
    std::string some;  // 200 lines keep the 1 + N_LAYER * E + E - K + 1 evaluations quick
    for (const auto& l : split_lines(read_file(g_small))) some += l.number <= 200 ? l.text + "\n" : "";
    write(few, some);
    auto loss_of = [](const std::string& out) {
        size_t at = out.find(" loss ");
        return at == std::string::npos ? NAN : std::atof(out.c_str() + at + 6);
    };
    Run base = run(q(g_moe) + ck + "--eval " + q(few));
    Run kn = run(q(g_moe) + ck + "--knockout " + q(few));
    check(base.code == 0 && kn.code == 0 && has(kn.out, "knockout " + few + ": loss ") && fs::exists(dir + "/knockout.svg"),
          "--knockout prints its table and writes knockout.svg beside the checkpoint (exit %d)", kn.code);
    // Parse the table: a row per layer, E changes and their total.
    std::vector<std::vector<double>> cells;
    bool totals = true;
    for (const auto& l : split_lines(kn.out)) {
        std::vector<double> v;
        const char* p = l.text.c_str();
        if (l.text.rfind("  ", 0) != 0 || !std::isdigit((unsigned char)l.text[2]) || !has(l.text, "+")) continue;
        for (char* end; *p; p = end) {
            double x = std::strtod(p, &end);
            if (end == p) break;
            v.push_back(x);
        }
        if (v.size() != (size_t)E + 2) continue;  // layer, E cells, total
        double sum = 0;
        for (int e = 0; e < E; e++) sum += v[1 + e];
        totals = totals && std::fabs(sum - v[E + 1]) <= 0.5e-4 * (E + 1);
        cells.push_back(v);
    }
    check(cells.size() == (size_t)N_LAYER && totals, "--knockout: a row per layer (%zu), each row's total is the sum of its cells",
          cells.size());
    // A cell is --eval with that one expert ablated, less the full model's loss.
    Run ab = run(q(g_moe) + ck + "--eval " + q(few) + " --ablate 1:" + std::to_string(E - 1));
    const double want = loss_of(ab.out) - loss_of(base.out);
    check(ab.code == 0 && has(ab.out, "ablated (removed from the routing): 1:") && cells.size() > 1 &&
              std::fabs(cells[1][E] - want) < 1e-4,
          "--knockout's cell (1, %d) = --eval --ablate 1:%d minus the full loss: %.4f vs %.4f", E - 1, E - 1,
          cells.size() > 1 ? cells[1][E] : NAN, want);
    // The redundancy curve: r = 0 is the plain model's loss; taking experts away costs.
    const size_t curve = kn.out.find("redundancy:");
    size_t at = kn.out.find("\n  0  ", curve);
    const double r0 = at == std::string::npos ? NAN : std::atof(kn.out.c_str() + at + 6);
    at = kn.out.find("\n  " + std::to_string(E - K) + "  ", curve);
    const double rmax = at == std::string::npos ? NAN : std::atof(kn.out.c_str() + at + 6);
    check(std::fabs(r0 - loss_of(base.out)) < 1e-6 && rmax > r0,
          "redundancy: r = 0 is the --eval loss (%.6f), r = E-K costs more (%.6f)", r0, rmax);
    const std::string svg = slurp(dir + "/knockout.svg");
    size_t rects = 0;
    for (size_t i = svg.find("<rect"); i != std::string::npos; i = svg.find("<rect", i + 1)) rects++;
    check(rects == 1 + (size_t)N_LAYER * E && has(svg, "</svg>"), "knockout.svg: a cell per (layer, expert) (%zu rects)", rects);
    // Mistakes are usage errors.
    const std::string all = [] {
        std::string s;
        for (int e = 0; e <= E - K; e++) s += (s.empty() ? "0:" : ",0:") + std::to_string(e);
        return s;
    }();
    for (const std::string& bad : {"--eval " + q(few) + " --ablate " + all, "--eval " + q(few) + " --ablate 9:0",
                                   "--eval " + q(few) + " --ablate 0", std::string("--ablate 0:0"), "--knockout " + q(few) + " --eval " + q(few)}) {
        Run r = run(q(g_moe) + ck + bad);
        check(r.code == 2, "refused with exit 2: %s (exit %d)", bad.c_str(), r.code);
    }
}

int main(int argc, char** argv) {
    std::string group = setup(argc, argv, "resume|threads|bad-input|inference|knockout|same|topp");
    if (group == "resume") test_resume();
    else if (group == "threads") test_threads();
    else if (group == "bad-input") test_bad_input();
    else if (group == "inference") test_inference();
    else if (group == "knockout") test_knockout();
    else if (group == "same") test_same();
    else if (group == "topp") test_topp();
    else return std::fprintf(stderr, "unknown group %s\n", group.c_str()), 2;
    return report(("test_cli " + group).c_str());
}
