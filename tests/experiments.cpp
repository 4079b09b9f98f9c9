// The domain-mix experiment: do experts specialise? (README, "Do experts
// specialise?"). `cmake --build build --target experiments` builds the model
// variants below and runs this program, which trains each on
// data/domain_mix_train.txt with several seeds (two runs at a time, one
// thread each), evaluates the best checkpoint of every run, and writes
//   OUT/RESULTS.md        one table: mean and spread over seeds per config
//   OUT/experiments.svg   the configs compared: test loss curves and the
//                         final figures as heatmaps
// Each run's own files (checkpoints, log.tsv, report.svg, train.log,
// eval.log) stay in RUNS/<config>/seed<N>.
//
//   experiments --bin-dir DIR --data DIR --runs DIR --out DIR
//               [--steps N] [--seeds N] [--jobs N] [--quick] [--reuse] [--only NAME,...]
//
// --quick is a smoke run (300 steps, one seed), to see that it all works.
// --reuse reads back the runs already in RUNS instead of training them again.
// --only runs the named configs alone (e.g. one added to the grid).
#include "cli.h"

#include <thread>

// The grid: config name, the binary built for it (CMakeLists.txt), extra flags.
struct Config {
    const char *name, *bin, *flags, *what;
};
static const Config ALL_CONFIGS[] = {
    {"dense", "moe_exp_dense", "", "dense baseline: one MLP of width 4C (E=1)"},
    {"top1", "moe_exp_top1", "", "E=4, top-1, gate = router probability, aux 0.01"},
    {"top1-noaux", "moe_exp_top1", "--aux-coef 0", "the same without the load-balancing loss"},
    {"top2", "moe_exp_top2", "", "E=4, top-2, renormalised gates, aux 0.01 (the default build)"},
    {"top1-renorm", "moe_exp_top1_renorm", "", "E=4, top-1 with the gate renormalised to 1.0 (no router gradient)"},
    {"dense-active", "moe_exp_dense_active", "", "dense, width 8C: the active size of top2"},
    {"dense-total", "moe_exp_dense_total", "", "dense, width 16C: the total size of top2"},
    {"top2-bias", "moe_exp_top2_bias", "--aux-coef 0",
     "E=4, top-2, loss-free balancing (bias rate 1e-3), no aux loss"},
    {"sigmoid-bias", "moe_exp_top2_bias_sigmoid", "--aux-coef 0",
     "top2-bias with sigmoid gates (DeepSeek-V3's router), no aux loss"},
    {"top-p", "moe_exp_topp", "", "E=4, top-p 0.75 (1 to 4 experts), entropy loss 1e-4, aux 0.01"},
    {"top2-seq", "moe_exp_top2_seq", "", "top2 with the aux loss per sequence (line), not per batch"},
};
static std::vector<Config> CONFIGS;  // the grid's configs, or those --only names
static const char* const DOMAINS[3] = {"names", "arith", "code"};

// What one run measured.
struct Result {
    bool ok = false, reused = false;
    double test = NAN, dom[3] = {NAN, NAN, NAN}, greedy = NAN, sampled = NAN, ms = NAN, wall = NAN;
    int sampled_n = 0;
    std::vector<double> cv;       // per layer: coefficient of variation of the expert load
    std::vector<double> maxvio;   // per layer: (max load - mean load) / mean load
    std::vector<double> cv_run, maxvio_run;  // the same per layer, averaged over every evaluation of the run (log.tsv)
    double experts_dom[3] = {NAN, NAN, NAN};  // top-p: experts per token on each domain's file
    std::string experts_cls;                 // top-p: eval's "experts per token ... by the byte read" line
    std::vector<double> mi_dom;   // per layer: I(domain; first expert) / H(domain)
    std::vector<double> mi_cls;   // per layer: I(byte class; first expert) / H(byte class)
    std::vector<std::vector<std::vector<double>>> route;  // [layer][domain][expert] shares
    std::vector<std::pair<double, double>> curve;         // (step, test loss) from log.tsv
    int64_t params = 0, active = 0;
    // How much the loss still fell over the last fifth of training (moe's own
    // test split, from log.tsv): near 0 when the run has flattened.
    double late_drop() const {
        if (curve.size() < 2) return NAN;
        double at = curve.back().first * 0.8, before = curve.front().second;
        for (auto [st, l] : curve)
            if (st <= at) before = l;
        return before - curve.back().second;
    }
};

// The load CV (population sd / mean) and MaxVio ((max - mean) / mean) of one
// layer's E loads.
static void balance(const std::vector<double>& f_e, double* cv, double* maxvio) {
    double mean = 0, ss = 0;
    for (double x : f_e) mean += x / (double)f_e.size();
    for (double x : f_e) ss += (x - mean) * (x - mean) / (double)f_e.size();
    const double mx = f_e.empty() ? NAN : *std::max_element(f_e.begin(), f_e.end());
    *cv = mean > 0 && f_e.size() > 1 ? std::sqrt(ss) / mean : NAN;
    *maxvio = mean > 0 ? (mx - mean) / mean : NAN;
}

static double median(std::vector<double> v) {
    if (v.empty()) return NAN;
    std::sort(v.begin(), v.end());
    return v.size() % 2 ? v[v.size() / 2] : (v[v.size() / 2 - 1] + v[v.size() / 2]) / 2;
}
static void mean_sd(const std::vector<double>& v, double* mean, double* sd) {
    double s = 0, ss = 0;
    for (double x : v) s += x;
    *mean = v.empty() ? NAN : s / (double)v.size();
    for (double x : v) ss += (x - *mean) * (x - *mean);
    *sd = v.size() > 1 ? std::sqrt(ss / (double)(v.size() - 1)) : 0;
}
// Normalised mutual information of a contingency table counts[row][col]:
// I(row; col) / H(row), 0 when the column (the expert) says nothing about the
// row (domain or class), 1 when it determines it.
static double norm_mi(const std::vector<std::vector<double>>& counts) {
    double n = 0;
    std::vector<double> rs(counts.size(), 0), cs(counts.empty() ? 0 : counts[0].size(), 0);
    for (size_t r = 0; r < counts.size(); r++)
        for (size_t c = 0; c < counts[r].size(); c++) n += counts[r][c], rs[r] += counts[r][c], cs[c] += counts[r][c];
    if (n == 0) return NAN;
    double mi = 0, h = 0;
    for (size_t r = 0; r < counts.size(); r++) {
        if (rs[r] > 0) h -= rs[r] / n * std::log(rs[r] / n);
        for (size_t c = 0; c < counts[r].size(); c++)
            if (counts[r][c] > 0) mi += counts[r][c] / n * std::log(counts[r][c] * n / (rs[r] * cs[c]));
    }
    return h > 0 ? mi / h : NAN;
}

// The routing tables eval prints: after a line starting with `title`, blocks
// "layer L ..." followed by rows "  NAME share... tokens". Returns
// counts[layer][row name] = shares x tokens.
static std::vector<std::map<std::string, std::vector<double>>> parse_routing(const std::string& out,
                                                                             const std::string& title) {
    std::vector<std::map<std::string, std::vector<double>>> t;
    size_t at = out.find("\n" + title);
    if (at == std::string::npos) return t;
    std::vector<Line> lines = split_lines(out.substr(at + 1));
    for (size_t i = 1; i < lines.size(); i++) {
        const std::string& s = lines[i].text;
        if (s.rfind("layer ", 0) == 0) {
            t.emplace_back();
            continue;
        }
        if (s.rfind("  ", 0) != 0 || t.empty()) break;  // the table ended
        char name[512];
        int used = 0;
        if (std::sscanf(s.c_str(), "%511s%n", name, &used) != 1) break;
        std::vector<double> v;
        const char* p = s.c_str() + used;
        for (char* end;; p = end) {
            double x = std::strtod(p, &end);
            if (end == p) break;
            v.push_back(x);
        }
        if (v.size() < 2) break;
        double tokens = v.back();
        v.pop_back();
        for (double& x : v) x *= tokens;
        t.back()[name] = v;
    }
    return t;
}

// Train and evaluate one config with one seed in `dir`. With `reuse`, a run
// whose logs are already there (from an earlier, complete run of the same
// grid) is read back instead of trained again: the tables can be remade
// after a change to this program.
static Result run_one(const Config& c, const std::string& bin_dir, const std::string& data, const std::string& dir,
                      int seed, int64_t steps, int eval_interval, bool reuse) {
    Result r;
    fs::create_directories(dir);
    const std::string bin = q((fs::path(bin_dir) / c.bin).string());
    auto df = [&](const std::string& f) { return q((fs::path(data) / f).string()); };
    const std::string vals =
        df("domain_names_val.txt") + " " + df("domain_arith_val.txt") + " " + df("domain_code_val.txt");
    Run tr, ev;
    if (reuse && fs::exists(dir + "/eval.log") && fs::exists(dir + "/wall_seconds")) {
        tr = {0, slurp(dir + "/train.log")}, ev = {0, slurp(dir + "/eval.log")}, r.reused = true;
        r.wall = std::strtod(slurp(dir + "/wall_seconds").c_str(), nullptr);
    } else {
        double t0 = now_ms();
        tr = run(bin + " -i " + df("domain_mix_train.txt") + " -o " + q(dir) + " --seed " + std::to_string(seed) +
                 " --max-steps " + std::to_string(steps) + " --eval-interval " + std::to_string(eval_interval) +
                 " --threads 1 --num-samples 0 --overwrite --val " + vals + " " + c.flags);
        r.wall = (now_ms() - t0) / 1000;
        write(dir + "/train.log", tr.out);
        if (tr.code != 0) {
            std::fprintf(stderr, "%s seed %d: training failed (exit %d), see %s/train.log\n", c.name, seed, tr.code,
                         dir.c_str());
            return r;
        }
        ev = run(bin + " --threads 1 --seed " + std::to_string(seed) + " --checkpoint " + q(dir + "/model.safetensors") +
                 " --eval " + df("domain_mix_test.txt") + " " + vals + " --arith " + df("domain_arith_val.txt"));
        write(dir + "/eval.log", ev.out);
        write(dir + "/wall_seconds", fmt("%.1f\n", r.wall));
    }
    if (ev.code != 0) {
        std::fprintf(stderr, "%s seed %d: evaluation failed (exit %d), see %s/eval.log\n", c.name, seed, ev.code, dir.c_str());
        return r;
    }
    // train.log: ms per step of every progress line, and the parameter counts.
    std::vector<double> ms;
    for (const auto& l : split_lines(tr.out)) {
        const std::string& s = l.text;
        size_t at = s.find(" ms/step");
        if (at != std::string::npos) {
            size_t b = s.rfind("| ", at);
            ms.push_back(std::strtod(s.c_str() + b + 2, nullptr));
        }
        long long tot, act;
        if (std::sscanf(s.c_str(), "parameters: %lld total, %lld active", &tot, &act) == 2) r.params = tot, r.active = act;
    }
    r.ms = median(ms);
    // eval.log: losses, the load of the mixed test set, routing, arithmetic.
    std::vector<Line> lines = split_lines(ev.out);
    for (size_t i = 0; i < lines.size(); i++) {
        const std::string& s = lines[i].text;
        char file[1024];
        double loss;
        if (std::sscanf(s.c_str(), "eval %1023s loss %lf", file, &loss) == 2) {
            std::string f = fs::path(file).filename().string();
            if (f == "domain_mix_test.txt") {
                r.test = loss;
                // the next line: "  expert load L0 a b c d | L1 ..."
                if (i + 1 < lines.size()) {
                    std::string ld = lines[i + 1].text;
                    for (size_t p = ld.find(" L"); p != std::string::npos; p = ld.find(" L", p + 1)) {
                        std::vector<double> f_e;
                        const char* q0 = ld.c_str() + ld.find(' ', p + 1);
                        for (char* end;; q0 = end) {
                            double x = std::strtod(q0, &end);
                            if (end == q0) break;
                            f_e.push_back(x);
                        }
                        double cv, mv;
                        balance(f_e, &cv, &mv);
                        r.cv.push_back(cv), r.maxvio.push_back(mv);
                    }
                }
            }
            for (int d = 0; d < 3; d++)
                if (f == std::string("domain_") + DOMAINS[d] + "_val.txt") {
                    r.dom[d] = loss;
                    double ex;  // top-p builds print "  experts per token X (L0 ...)" after the load
                    if (i + 2 < lines.size() && std::sscanf(lines[i + 2].text.c_str(), "  experts per token %lf", &ex) == 1)
                        r.experts_dom[d] = ex;
                }
        }
        if (s.rfind("experts per token (top-p", 0) == 0) r.experts_cls = s.substr(s.find(':') + 2);
        int right, total, parsed, correct, n;
        if (std::sscanf(s.c_str(), "arith greedy: %d / %d", &right, &total) == 2) r.greedy = 100.0 * right / total;
        if (std::sscanf(s.c_str(), "arith sampled: %d samples, %d are arithmetic, %d", &n, &parsed, &correct) == 3)
            r.sampled = parsed ? 100.0 * correct / parsed : NAN, r.sampled_n = parsed;
    }
    auto by_file = parse_routing(ev.out, "routing by file");
    auto by_class = parse_routing(ev.out, "routing by the class");
    for (const auto& layer : by_file) {  // the three domain files only, in DOMAINS order
        std::vector<std::vector<double>> counts, share;
        for (int d = 0; d < 3; d++)
            for (const auto& kv : layer)
                if (fs::path(kv.first).filename().string() == std::string("domain_") + DOMAINS[d] + "_val.txt") {
                    counts.push_back(kv.second);
                    double n_tok = std::accumulate(kv.second.begin(), kv.second.end(), 0.0);
                    share.push_back(kv.second);
                    for (double& x : share.back()) x /= n_tok;
                }
        r.mi_dom.push_back(norm_mi(counts));
        r.route.push_back(share);
    }
    for (const auto& layer : by_class) {
        std::vector<std::vector<double>> counts;
        for (const auto& kv : layer) counts.push_back(kv.second);
        r.mi_cls.push_back(norm_mi(counts));
    }
    // log.tsv: the test loss (moe's own split of the training file) and the
    // expert load (columns load:L<l>e<e>) at every evaluation.
    std::vector<Line> log = split_lines(slurp(dir + "/log.tsv"));
    std::vector<std::pair<int, size_t>> load_col;  // (layer, column) of each load column, in order
    if (!log.empty()) {
        size_t col = 0;
        for (size_t at = 0, next; at != std::string::npos; at = next == std::string::npos ? next : next + 1, col++) {
            next = log[0].text.find('\t', at);
            const std::string name = log[0].text.substr(at, next == std::string::npos ? next : next - at);
            if (name.rfind("load:L", 0) == 0) load_col.push_back({std::atoi(name.c_str() + 6), col});
        }
    }
    const int n_layers = load_col.empty() ? 0 : load_col.back().first + 1;
    r.cv_run.assign(n_layers, 0), r.maxvio_run.assign(n_layers, 0);
    for (size_t i = 1; i < log.size(); i++) {
        std::vector<double> f;
        const char* p = log[i].text.c_str();
        for (char* end;; p = end + 1) {
            f.push_back(std::strtod(p, &end));
            if (*end != '\t') break;
        }
        r.curve.push_back({f[0], f.size() > 2 ? f[2] : NAN});
        for (int l = 0; l < n_layers; l++) {
            std::vector<double> f_e;
            for (auto [layer, at] : load_col)
                if (layer == l && at < f.size()) f_e.push_back(f[at]);
            double cv, mv;
            balance(f_e, &cv, &mv);
            r.cv_run[l] += cv / (double)(log.size() - 1), r.maxvio_run[l] += mv / (double)(log.size() - 1);
        }
    }
    r.ok = std::isfinite(r.test);
    return r;
}

// "mean ± sd" of a field over the seeds that finished.
static std::string ms_str(const std::vector<double>& v, const char* f) {
    std::vector<double> ok;
    for (double x : v)
        if (std::isfinite(x)) ok.push_back(x);
    if (ok.empty()) return "-";
    double mean, sd;
    mean_sd(ok, &mean, &sd);
    return fmt(f, mean) + (ok.size() > 1 ? " ± " + fmt(f, sd) : "");
}

int main(int argc, char** argv) {
    std::string bin_dir, data, runs, out;
    int64_t steps = 20000;
    int seeds = 3, jobs = 2, eval_interval = 1000;
    bool quick = false, reuse = false;
    std::string only;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        auto val = [&]() -> std::string {
            if (i + 1 >= argc) {
                std::fprintf(stderr, "%s needs a value\n", a.c_str());
                std::exit(2);
            }
            return argv[++i];
        };
        if (a == "--bin-dir") bin_dir = val();
        else if (a == "--data") data = val();
        else if (a == "--runs") runs = val();
        else if (a == "--out") out = val();
        else if (a == "--steps") steps = std::atoll(val().c_str());
        else if (a == "--seeds") seeds = std::atoi(val().c_str());
        else if (a == "--jobs") jobs = std::atoi(val().c_str());
        else if (a == "--quick") quick = true;
        else if (a == "--reuse") reuse = true;
        else if (a == "--only") only = "," + val() + ",";
        else {
            std::fprintf(stderr, "unknown option '%s'\nusage: experiments --bin-dir DIR --data DIR --runs DIR --out DIR "
                                 "[--steps N] [--seeds N] [--jobs N] [--quick] [--reuse] [--only NAME,...]\n", a.c_str());
            return 2;
        }
    }
    if (bin_dir.empty() || data.empty() || runs.empty() || out.empty() || steps < 1 || seeds < 1 || jobs < 1) {
        std::fprintf(stderr, "usage: experiments --bin-dir DIR --data DIR --runs DIR --out DIR [--steps N] [--seeds N] "
                             "[--jobs N] [--quick] [--reuse] [--only NAME,...]\n");
        return 2;
    }
    if (quick) steps = 300, seeds = 1, eval_interval = 100;
    eval_interval = (int)std::min<int64_t>(eval_interval, steps);
    for (const Config& c : ALL_CONFIGS)
        if (only.empty() || only.find(std::string(",") + c.name + ",") != std::string::npos) CONFIGS.push_back(c);
    if (CONFIGS.empty()) {
        std::fprintf(stderr, "--only %s names no config of the grid\n", only.substr(1, only.size() - 2).c_str());
        return 2;
    }
    const int n_cfg = (int)CONFIGS.size();
    std::printf("domain-mix experiment: %d configs x %d seeds, %lld steps each, %d runs at a time\n", n_cfg, seeds,
                (long long)steps, jobs);
    std::fflush(stdout);

    // The runs, shared out among `jobs` threads; each result has its own slot.
    std::vector<Result> res((size_t)n_cfg * seeds);
    std::atomic<int> next{0};
    std::mutex print;
    double t0 = now_ms();
    auto worker = [&] {
        for (int i; (i = next++) < (int)res.size();) {
            const Config& c = CONFIGS[i / seeds];
            int seed = 1 + i % seeds;
            std::string dir = (fs::path(runs) / c.name / ("seed" + std::to_string(seed))).string();
            res[i] = run_one(c, bin_dir, data, dir, seed, steps, eval_interval, reuse);
            std::lock_guard<std::mutex> lk(print);
            std::printf("  %-12s seed %d: test %.4f, arith greedy %.1f%%, %.2f ms/step, %.0f s  (%.0f s so far)\n", c.name,
                        seed, res[i].test, res[i].greedy, res[i].ms, res[i].wall, (now_ms() - t0) / 1000);
            std::fflush(stdout);
        }
    };
    std::vector<std::thread> pool;
    for (int j = 0; j < jobs; j++) pool.emplace_back(worker);
    for (auto& t : pool) t.join();
    double wall = (now_ms() - t0) / 1000;
    // The grid's wall time: measured now, or, when every run was read back
    // (--reuse), the one stored by the run that trained them.
    const std::string wall_file = (fs::path(runs) / "grid_wall_seconds").string();
    bool all_reused = fs::exists(wall_file);
    for (const auto& r : res) all_reused = all_reused && r.reused;
    if (all_reused) wall = std::strtod(slurp(wall_file).c_str(), nullptr);
    else write(wall_file, fmt("%.0f\n", wall));

    // RESULTS.md
    std::string md = "# Domain-mix experiment\n\n";
    md += "Generated by `tests/experiments.cpp` (`cmake --build build --target experiments`): " + std::to_string(n_cfg) +
          " configs x " + std::to_string(seeds) + " seeds (1.." + std::to_string(seeds) + "), " + std::to_string(steps) +
          " steps each, batch 32, lr 5e-4, one thread per run, " + std::to_string(jobs) + " runs at a time; wall time " +
          fmt("%.0f", wall) + " s. Figures are mean ± standard deviation over the seeds, measured on the best " +
          "checkpoint of each run (lowest loss on moe's own test split of the training file).\n\n";
    md += "- test: loss (nats per token) on `data/domain_mix_test.txt` (held out, 500 lines per domain)\n";
    md += "- names / arith / code: loss on each domain's held-out validation file\n";
    md += "- greedy: % of the 500 held-out prompts `a op b=` completed exactly right; sampled: % right of the "
          "free samples (of 1000) that are arithmetic\n";
    md += "- load CV: coefficient of variation of the expert load f on the test set, per layer (0 = perfectly even; "
          "sqrt(E-1) = 1.73 = one expert takes all); MaxVio: (largest load - mean load) / mean load, per layer "
          "(0 = even; E-1 = 3 = one expert takes all); over training: the same on moe's test split at every "
          "evaluation (log.tsv), averaged over the evaluations\n";
    md += "- experts/token: top-p's mean experts per token on each domain's file (names arith code); - for top-k, where it is K\n";
    md += "- MI domain / MI class: I(domain; first-choice expert) / H(domain), and the same for the class of the byte "
          "read (letter, digit, operator, punctuation, line marker), per layer: 0 = the expert says nothing about it, "
          "1 = it determines it\n";
    md += "- fall in last 20%: how much the test loss (moe's split, from log.tsv) still fell over the last fifth of "
          "the steps; near 0 means the run had flattened\n";
    md += "- ms/step (median of the progress lines) and wall s: two runs at a time on this machine's two cores, with "
          "whatever else ran beside them; rough figures, not a benchmark (`--target bench` is)\n\n";
    md += "| config | what | params (active) | test | names | arith | code | greedy % | sampled % | load CV per layer | "
          "MaxVio per layer | load CV over training | MaxVio over training | experts/token | MI domain per layer | "
          "MI class per layer | fall in last 20% | ms/step | wall s |\n";
    md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
    auto per_layer = [&](int ci, std::vector<double> Result::*f) {
        std::string s;
        size_t n_l = 0;
        for (int k = 0; k < seeds; k++) n_l = std::max(n_l, (res[ci * seeds + k].*f).size());
        for (size_t l = 0; l < n_l; l++) {
            std::vector<double> v;
            for (int k = 0; k < seeds; k++)
                if (res[ci * seeds + k].ok && l < (res[ci * seeds + k].*f).size() &&
                    std::isfinite((res[ci * seeds + k].*f)[l]))
                    v.push_back((res[ci * seeds + k].*f)[l]);
            double mean, sd;
            mean_sd(v, &mean, &sd);
            if (std::isfinite(mean)) s += (s.empty() ? "" : " ") + fmt("%.2f", mean);
        }
        return s.empty() ? std::string("-") : s;
    };
    for (int ci = 0; ci < n_cfg; ci++) {
        auto col = [&](auto get, const char* f) {
            std::vector<double> v;
            for (int k = 0; k < seeds; k++)
                if (res[ci * seeds + k].ok) v.push_back(get(res[ci * seeds + k]));
            return ms_str(v, f);
        };
        const Result& r0 = res[ci * seeds];
        md += std::string("| ") + CONFIGS[ci].name + " | " + CONFIGS[ci].what + " | " + std::to_string(r0.params) + " (" +
              std::to_string(r0.active) + ") | " + col([](const Result& r) { return r.test; }, "%.4f") + " | " +
              col([](const Result& r) { return r.dom[0]; }, "%.4f") + " | " +
              col([](const Result& r) { return r.dom[1]; }, "%.4f") + " | " +
              col([](const Result& r) { return r.dom[2]; }, "%.4f") + " | " +
              col([](const Result& r) { return r.greedy; }, "%.1f") + " | " +
              col([](const Result& r) { return r.sampled; }, "%.1f") + " | " + per_layer(ci, &Result::cv) + " | " +
              per_layer(ci, &Result::maxvio) + " | " + per_layer(ci, &Result::cv_run) + " | " +
              per_layer(ci, &Result::maxvio_run) + " | " +
              (std::isfinite(r0.experts_dom[0]) ? col([](const Result& r) { return r.experts_dom[0]; }, "%.2f") + " " +
                                                      col([](const Result& r) { return r.experts_dom[1]; }, "%.2f") + " " +
                                                      col([](const Result& r) { return r.experts_dom[2]; }, "%.2f")
                                                : std::string("-")) + " | " +
              per_layer(ci, &Result::mi_dom) + " | " + per_layer(ci, &Result::mi_cls) + " | " +
              col([](const Result& r) { return r.late_drop(); }, "%.4f") + " | " +
              col([](const Result& r) { return r.ms; }, "%.2f") + " | " +
              col([](const Result& r) { return r.wall; }, "%.0f") + " |\n";
    }
    // Top-p: experts per token by the byte read, each seed.
    for (int ci = 0; ci < n_cfg; ci++)
        for (int k = 0; k < seeds; k++)
            if (!res[ci * seeds + k].experts_cls.empty()) {
                if (md.find("## Experts per token") == std::string::npos)
                    md += "\n## Experts per token by the byte read (top-p)\n\nOver the four evaluated files together (the mixed "
                          "test set and the three domain validation files), mean over layers.\n\n";
                md += std::string("- ") + CONFIGS[ci].name + ", seed " + std::to_string(k + 1) + ": " +
                      res[ci * seeds + k].experts_cls + "\n";
            }
    // Routing by domain of seed 1 of each MoE config (expert numbers are
    // arbitrary, so tables of different seeds cannot be averaged).
    md += "\n## Routing by domain (seed 1)\n\nShare of each domain's tokens whose first choice is expert e, per layer.\n";
    for (int ci = 0; ci < n_cfg; ci++) {
        const Result& r = res[ci * seeds];
        if (r.route.empty()) continue;
        md += std::string("\n**") + CONFIGS[ci].name + "**\n\n| layer | domain |";
        size_t ne = r.route[0].empty() ? 0 : r.route[0][0].size();
        for (size_t e = 0; e < ne; e++) md += " e" + std::to_string(e) + " |";
        md += "\n|---|---|";
        for (size_t e = 0; e < ne; e++) md += "---|";
        md += "\n";
        for (size_t l = 0; l < r.route.size(); l++)
            for (size_t d = 0; d < r.route[l].size(); d++) {
                md += "| " + std::to_string(l) + " | " + DOMAINS[d] + " |";
                for (double x : r.route[l][d]) md += " " + fmt("%.2f", x) + " |";
                md += "\n";
            }
    }
    fs::create_directories(out);
    write_text_atomic((fs::path(out) / "RESULTS.md").string(), "results", md);

    // experiments.svg: test-loss curves (mean over seeds) and the final figures.
    std::vector<Series> curves;
    for (int ci = 0; ci < n_cfg; ci++) {
        Series s{CONFIGS[ci].name, PALETTE[ci % 10], std::string(CONFIGS[ci].name).rfind("dense", 0) == 0, {}};
        const auto& c0 = res[ci * seeds].curve;
        for (size_t p = 0; p < c0.size(); p++) {
            double sum = 0;
            int n = 0;
            for (int k = 0; k < seeds; k++)
                if (p < res[ci * seeds + k].curve.size()) sum += res[ci * seeds + k].curve[p].second, n++;
            s.pts.push_back({c0[p].first, sum / n});
        }
        curves.push_back(s);
    }
    std::vector<std::string> rows;
    for (int ci = 0; ci < n_cfg; ci++) rows.push_back(CONFIGS[ci].name);
    auto table = [&](std::vector<std::function<double(const Result&)>> cols) {
        std::vector<std::vector<double>> v(n_cfg);
        for (int ci = 0; ci < n_cfg; ci++)
            for (auto& get : cols) {
                double s = 0;
                int n = 0;
                for (int k = 0; k < seeds; k++)
                    if (res[ci * seeds + k].ok && std::isfinite(get(res[ci * seeds + k]))) s += get(res[ci * seeds + k]), n++;
                v[ci].push_back(n ? s / n : NAN);
            }
        return v;
    };
    auto lo_hi = [](const std::vector<std::vector<double>>& v, double* lo, double* hi) {
        *lo = INFINITY, *hi = -INFINITY;
        for (const auto& r : v)
            for (double x : r)
                if (std::isfinite(x)) *lo = std::min(*lo, x), *hi = std::max(*hi, x);
    };
    std::string svg = svg_begin(980, 760);
    svg_text(svg, 10, 22,
             "domain mix: " + std::to_string(n_cfg) + " configs, mean of " + std::to_string(seeds) + " seeds, " +
                 std::to_string(steps) + " steps",
             "font-size=\"14\" font-weight=\"bold\"");
    svg_plot(svg, 0, 40, 980, 330, "test loss during training (moe's split of the training file; dashed: dense)",
             "step", curves);
    auto losses = table({[](const Result& r) { return r.test; }, [](const Result& r) { return r.dom[0]; },
                         [](const Result& r) { return r.dom[1]; }, [](const Result& r) { return r.dom[2]; }});
    double lo, hi;
    lo_hi(losses, &lo, &hi);
    for (int c = 0; c < 4; c++) {  // each column shaded on its own range: the domains differ far more than the configs
        std::vector<std::vector<double>> col;
        for (const auto& r : losses) col.push_back({r[c]});
        lo_hi(col, &lo, &hi);
        svg_heatmap(svg, c ? 100 + 60 * c : 0, 390, c ? 0 : 100, 60, c ? "" : "final loss (darker = higher, per column)",
                    c ? std::vector<std::string>(rows.size()) : rows, {std::vector<std::string>{"test", "names", "arith", "code"}[c]},
                    col, lo, hi, "%.3f");
    }
    auto acc = table({[](const Result& r) { return r.greedy; }, [](const Result& r) { return r.sampled; }});
    svg_heatmap(svg, 380, 390, 100, 64, "arithmetic accuracy %", rows, {"greedy", "sampled"}, acc, 0, 100, "%.1f");
    auto mi = table({[](const Result& r) { return r.mi_dom.size() > 0 ? r.mi_dom[0] : NAN; },
                     [](const Result& r) { return r.mi_dom.size() > 1 ? r.mi_dom[1] : NAN; },
                     [](const Result& r) { return r.mi_dom.size() > 2 ? r.mi_dom[2] : NAN; },
                     [](const Result& r) { return r.mi_dom.size() > 3 ? r.mi_dom[3] : NAN; }});
    svg_heatmap(svg, 620, 390, 100, 56, "MI(domain; expert) by layer", rows, {"L0", "L1", "L2", "L3"}, mi, 0, 1, "%.2f");
    auto cv = table({[](const Result& r) { return r.cv.size() > 0 ? r.cv[0] : NAN; },
                     [](const Result& r) { return r.cv.size() > 1 ? r.cv[1] : NAN; },
                     [](const Result& r) { return r.cv.size() > 2 ? r.cv[2] : NAN; },
                     [](const Result& r) { return r.cv.size() > 3 ? r.cv[3] : NAN; }});
    svg_heatmap(svg, 0, 580, 100, 64, "load CV by layer (0 = even)", rows, {"L0", "L1", "L2", "L3"}, cv, 0, 1.73, "%.2f");
    auto mic = table({[](const Result& r) { return r.mi_cls.size() > 0 ? r.mi_cls[0] : NAN; },
                      [](const Result& r) { return r.mi_cls.size() > 1 ? r.mi_cls[1] : NAN; },
                      [](const Result& r) { return r.mi_cls.size() > 2 ? r.mi_cls[2] : NAN; },
                      [](const Result& r) { return r.mi_cls.size() > 3 ? r.mi_cls[3] : NAN; }});
    svg_heatmap(svg, 440, 580, 100, 64, "MI(byte class; expert) by layer", rows, {"L0", "L1", "L2", "L3"}, mic, 0, 1,
                "%.2f");
    write_text_atomic((fs::path(out) / "experiments.svg").string(), "figure", svg + "</svg>\n");

    int failed = 0;
    for (const auto& r : res) failed += !r.ok;
    std::printf("%s\nwrote %s/RESULTS.md and %s/experiments.svg in %.0f s%s\n", md.c_str(), out.c_str(), out.c_str(), wall,
                failed ? (", " + std::to_string(failed) + " runs FAILED").c_str() : "");
    return failed ? 1 : 0;
}
