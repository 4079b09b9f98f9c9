// The reports: --val and the training history (log.tsv, report.svg), the
// routing tables, --arith and the --route explorer.
//   unit: parse_arith, routing_for, log_tsv/read_log, shares, training_svg,
//         called directly (moe.cpp is included, as in the other tests);
//   cli:  the built binaries, run as a user runs them on a small slice of
//         the domain-mix data (data/domain_mix_train.txt, data/domain_*_val.txt).
//
//   test_report GROUP MOE MOE_INFER DATA_DIR SCRATCH_DIR     (GROUP: unit | cli)
#include "cli.h"

#include <random>
#include <regex>

// ----------------------------------------------------------------------------
// Helpers

static std::vector<std::string> lines_of(const std::string& s) {
    std::vector<std::string> v;
    size_t start = 0;
    for (size_t end; (end = s.find('\n', start)) != std::string::npos; start = end + 1) v.push_back(s.substr(start, end - start));
    if (start < s.size()) v.push_back(s.substr(start));
    return v;
}
static std::vector<std::string> fields(const std::string& s, char sep) {
    std::vector<std::string> v;
    size_t start = 0;
    for (size_t end; (end = s.find(sep, start)) != std::string::npos; start = end + 1) v.push_back(s.substr(start, end - start));
    v.push_back(s.substr(start));
    return v;
}
static std::vector<std::string> words(const std::string& s) {
    std::vector<std::string> v;
    std::string w;
    for (char c : s) {
        if (c == ' ' || c == '\t') {
            if (!w.empty()) v.push_back(w), w.clear();
        } else {
            w += c;
        }
    }
    if (!w.empty()) v.push_back(w);
    return v;
}
static size_t count(const std::string& s, const std::string& what) {
    size_t n = 0;
    for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) n++;
    return n;
}
static bool starts(const std::string& s, const std::string& p) { return s.rfind(p, 0) == 0; }
static bool ends(const std::string& s, const std::string& p) {
    return s.size() >= p.size() && s.compare(s.size() - p.size(), p.size(), p) == 0;
}
// A whole string as a finite number.
static bool number(const std::string& s, double* v) {
    char* end = nullptr;
    *v = std::strtod(s.c_str(), &end);
    return !s.empty() && end == s.c_str() + s.size() && std::isfinite(*v);
}

// The header log_tsv must write, spelled out here rather than taken from moe.cpp.
static std::string want_header(const std::vector<std::string>& vals) {
    std::string h = "step\ttrain\ttest\tlr";
    for (const auto& v : vals) h += "\tval:" + v;
    for (int l = 0; l < N_LAYER; l++)
        for (int e = 0; e < E; e++) h += "\tload:L" + std::to_string(l) + "e" + std::to_string(e);
    return h;
}

// What an SVG must be: one document, starting <svg and ending </svg>, text
// elements balanced, no NaN or infinity in a numeric attribute or a label,
// and every coordinate inside the declared width and height. Returns a
// description of the first problem, or "".
static std::string svg_problem(const std::string& svg) {
    if (!starts(svg, "<svg")) return "does not start with <svg";
    if (!ends(svg, "</svg>\n")) return "does not end with </svg>\\n";
    if (count(svg, "<svg") != 1 || count(svg, "</svg>") != 1) return "not exactly one <svg> element";
    if (count(svg, "<text") != count(svg, "</text>")) return "unbalanced <text> elements";
    static const std::regex attr("([a-zA-Z][a-zA-Z0-9-]*)=\"([^\"]*)\"");
    double W = -1, H = -1;
    {
        std::smatch m;
        std::string head = svg.substr(0, svg.find('>'));
        if (std::regex_search(head, m, std::regex(" width=\"([^\"]*)\"")) && number(m[1], &W) &&
            std::regex_search(head, m, std::regex(" height=\"([^\"]*)\"")) && number(m[1], &H)) {
        } else {
            return "the <svg> element has no numeric width and height";
        }
    }
    // element by element: <name attrs...>
    for (size_t at = svg.find('<'); at != std::string::npos; at = svg.find('<', at + 1)) {
        size_t close = svg.find('>', at);
        if (close == std::string::npos) return "an unterminated tag";
        std::string tag = svg.substr(at, close - at + 1);
        if (starts(tag, "</")) continue;
        std::map<std::string, std::string> a;
        for (std::sregex_iterator it(tag.begin(), tag.end(), attr), e; it != e; ++it) a[(*it)[1]] = (*it)[2];
        for (const char* k : {"x", "y", "x1", "x2", "y1", "y2", "width", "height"}) {
            if (!a.count(k) || (starts(tag, "<svg") && (k == std::string("width") || k == std::string("height")))) continue;
            if (starts(tag, "<rect") && a[k].find('%') != std::string::npos) continue;  // the background
            double v;
            if (!number(a[k], &v)) return std::string("attribute ") + k + "=\"" + a[k] + "\" is not a finite number in " + tag;
            bool horizontal = k[0] == 'x' || k[0] == 'w';
            if (v < -0.5 || v > (horizontal ? W : H) + 0.5) return std::string("attribute ") + k + " outside the picture in " + tag;
        }
        if (starts(tag, "<rect") && a.count("y") && a.count("height")) {
            double y = std::atof(a["y"].c_str()), h = std::atof(a["height"].c_str());
            if (y + h > H + 0.5) return "a rectangle reaches below the picture: " + tag;
        }
        if (a.count("points")) {
            for (const auto& p : words(a["points"])) {
                auto xy = fields(p, ',');
                double x, y;
                if (xy.size() != 2 || !number(xy[0], &x) || !number(xy[1], &y)) return "a bad point '" + p + "' in " + tag;
                if (x < -0.5 || x > W + 0.5 || y < -0.5 || y > H + 0.5) return "a point outside the picture in " + tag;
            }
        }
        if (starts(tag, "<text")) {
            std::string t = svg.substr(close + 1, svg.find("</text>", close) - close - 1);
            std::string low;
            for (char c : t) low += (char)std::tolower((unsigned char)c);
            static const std::regex bad("(^|[^a-z])-?(nan|inf)([^a-z]|$)");
            if (std::regex_search(low, bad)) return "a label reads '" + t + "'";
        }
    }
    return "";
}
// The points of each polyline, in order.
static std::vector<std::vector<std::string>> polylines(const std::string& svg) {
    std::vector<std::vector<std::string>> v;
    for (size_t at = svg.find("<polyline"); at != std::string::npos; at = svg.find("<polyline", at + 1)) {
        size_t p = svg.find("points=\"", at), q2 = svg.find('"', p + 8);
        v.push_back(words(svg.substr(p + 8, q2 - p - 8)));
    }
    return v;
}

// A routing table as print_routing prints it: layers, each a list of rows
// (name, E shares, token count). Empty if the title is not in the output.
struct TableRow {
    std::string name;
    std::vector<double> share;
    double tokens = 0;
};
using Table = std::vector<std::vector<TableRow>>;
static Table parse_table(const std::string& out, const std::string& title, std::string* problem) {
    Table t;
    std::vector<std::string> ls = lines_of(out);
    size_t i = 0;
    while (i < ls.size() && !starts(ls[i], title)) i++;
    if (i == ls.size()) return *problem = "no table titled '" + title + "'", t;
    for (i++; i < ls.size(); i++) {
        const std::string& l = ls[i];
        if (starts(l, "layer ")) {
            std::vector<std::string> w = words(l);
            if ((int)w.size() != E + 3 || w[1] != std::to_string(t.size()) || w.back() != "tokens")
                return *problem = "bad layer header '" + l + "'", t;
            t.emplace_back();
            continue;
        }
        if (!starts(l, "  ") || t.empty()) break;
        std::vector<std::string> w = words(l);
        if ((int)w.size() < E + 2) return *problem = "bad row '" + l + "'", t;
        TableRow r;
        for (size_t j = 0; j + E + 1 < w.size(); j++) r.name += (j ? " " : "") + w[j];
        for (int e = 0; e < E; e++) {
            double v;
            if (!number(w[w.size() - E - 1 + e], &v)) return *problem = "bad share in '" + l + "'", t;
            r.share.push_back(v);
        }
        if (!number(w.back(), &r.tokens)) return *problem = "bad token count in '" + l + "'", t;
        t.back().push_back(r);
    }
    return t;
}
// Every row of every layer: shares in [0, 1] summing to 1 (each printed
// with 3 decimals, so within E * 0.0005), rows named `names` in order with
// `tokens` tokens (when given). Returns a description of the first problem.
static std::string table_problem(const Table& t, const std::vector<std::string>& names, const std::vector<double>& tokens) {
    if ((int)t.size() != N_LAYER) return "has " + std::to_string(t.size()) + " layers, want " + std::to_string(N_LAYER);
    for (size_t l = 0; l < t.size(); l++) {
        if (t[l].size() != names.size()) return "layer " + std::to_string(l) + " has " + std::to_string(t[l].size()) + " rows";
        for (size_t r = 0; r < t[l].size(); r++) {
            const TableRow& row = t[l][r];
            double sum = 0;
            for (double v : row.share) sum += v;
            bool in_range = std::all_of(row.share.begin(), row.share.end(), [](double v) { return v >= 0 && v <= 1; });
            if (row.name != names[r]) return "layer " + std::to_string(l) + " row " + std::to_string(r) + " is '" + row.name + "'";
            if (!in_range || std::fabs(sum - 1) > 0.0005 * E + 1e-9)
                return "layer " + std::to_string(l) + " row " + row.name + ": shares sum to " + std::to_string(sum);
            if (!tokens.empty() && row.tokens != tokens[r])
                return "layer " + std::to_string(l) + " row " + row.name + ": " + std::to_string(row.tokens) + " tokens, want " +
                       std::to_string(tokens[r]);
        }
    }
    return "";
}

// ----------------------------------------------------------------------------
// unit

static void test_parse_arith() {
    struct Good {
        const char* s;
        int64_t value;
        const char *prompt, *answer;
    };
    for (const Good& g : {Good{"23+45=68", 68, "23+45=", "68"}, Good{"512-17=495", 495, "512-17=", "495"},
                          Good{"7*6=42", 42, "7*6=", "42"}, Good{"7*6=", 42, "7*6=", ""}, Good{"3-5=-2", -2, "3-5=", "-2"},
                          Good{"1+2=3=4", 3, "1+2=", "3=4"}, Good{"007+1=8", 8, "007+1=", "8"},
                          Good{"999999999*999999999=", 999999998000000001LL, "999999999*999999999=", ""}}) {
        int64_t v = -12345;
        std::string p = "?", a = "?";
        bool ok = parse_arith(g.s, &v, &p, &a);
        check(ok && v == g.value && p == g.prompt && a == g.answer, "parse_arith(\"%s\"): value %lld, prompt '%s', answer '%s'",
              g.s, (long long)v, p.c_str(), a.c_str());
    }
    for (const char* s : {"abc", "+1=2", "1+=2", "1+2", "1/2=0", "", "=", "1+2 =3", " 1+2=3", "1++2=3", "-1+2=1", "1+2",
                          "12345678901+1=1", "1+1234567890=1", "1234567890*1="}) {
        int64_t v = -12345;
        std::string p = "?", a = "?";
        check(!parse_arith(s, &v, &p, &a), "parse_arith rejects \"%s\"", s);
    }
    // An embedded NUL must not count as the operator (strchr finds the terminator).
    int64_t v;
    std::string p, a;
    check(!parse_arith(std::string("1\0" "2=3", 5), &v, &p, &a), "parse_arith rejects \"1\\02=3\" (NUL is no operator)");
}

static void test_routing_for() {
    const std::string vocab = " ()+-=abc019:";
    Routing r = routing_for(vocab);
    //                  marker      ' '        '('        ')'        '+'           '-'           '='
    std::vector<int> want = {CLS_MARKER, CLS_OTHER, CLS_OTHER, CLS_OTHER, CLS_OPERATOR, CLS_OPERATOR, CLS_OPERATOR,
                             // a b c
                             CLS_LETTER, CLS_LETTER, CLS_LETTER,
                             // 0 1 9
                             CLS_DIGIT, CLS_DIGIT, CLS_DIGIT,
                             // ':'
                             CLS_OTHER};
    check(r.cls == want, "routing_for(\"%s\"): token 0 is the marker, then other/operator/letter/digit per byte", vocab.c_str());
    Routing r2 = routing_for(std::string("*/<>%_\xc3\xa9Z\x01", 10));
    std::vector<int> want2 = {CLS_MARKER,   CLS_OPERATOR, CLS_OPERATOR, CLS_OPERATOR, CLS_OPERATOR, CLS_OPERATOR,
                              CLS_OTHER,    CLS_LETTER,   CLS_LETTER,   CLS_LETTER,   CLS_OTHER};
    check(r2.cls == want2, "routing_for: * / < > %% are operators, _ and 0x01 other, UTF-8 bytes and Z letters");
    check(r.first.size() == (size_t)N_LAYER * E && r.by_class.size() == (size_t)N_LAYER * N_CLASS * E &&
              std::all_of(r.first.begin(), r.first.end(), [](double x) { return x == 0; }) &&
              std::all_of(r.by_class.begin(), r.by_class.end(), [](double x) { return x == 0; }),
          "routing_for: the counts start at zero, [N_LAYER*E] and [N_LAYER*N_CLASS*E]");
    // A text-mode vocabulary may hold the byte 0 (binary data): it is no operator.
    Routing r3 = routing_for(std::string("\0a", 2));
    check(r3.cls.size() == 3 && r3.cls[1] == CLS_OTHER,
          "routing_for: the byte 0x00 (possible in --text data) is classed punct/space, not operator (got %s)",
          r3.cls.size() == 3 ? CLASS_NAMES[r3.cls[1]] : "?");
}

static LogRow row_at(int64_t step, double f, bool val = true) {
    LogRow r;
    r.step = step, r.train = 3.0 / f + 0.1234567, r.test = 3.1 / f + 1e-7, r.lr = 1e-3 / f;
    if (val) r.val = {2.0 / f + 0.3333333, 2.5 / f, 2.8 / f + 0.0000004};
    for (int l = 0; l < N_LAYER; l++)
        for (int e = 0; e < E; e++) r.load.push_back((1.0 + 0.1 * ((e + l + (int)step / 100) % 3)) / (E + 0.1 * E));
    return r;
}

static void test_log() {
    const std::vector<std::string> vals = {"a", "b", "c"};
    std::vector<LogRow> hist = {row_at(100, 1), row_at(200, 2), row_at(300, 3)};
    hist[2].test = NAN;  // a run without a test split logs NaN
    const std::string tsv = log_tsv(hist, vals);
    std::vector<std::string> ls = lines_of(tsv);
    check(ends(tsv, "\n") && ls.size() == 4 && ls[0] == want_header(vals), "log_tsv: the header, then a line per row:\n%s",
          ls.empty() ? "" : ls[0].c_str());
    check(ls.size() == 4 && starts(ls[1], "100\t") && fields(ls[1], '\t').size() == 7 + (size_t)N_LAYER * E,
          "log_tsv: each row has step, train, test, lr, 3 val and N_LAYER*E load fields");
    check(log_tsv({}, {}) == want_header({}) + "\n", "log_tsv without --val: just step, train, test, lr and the loads");

    const std::string path = g_dir + "/log.tsv";
    write(path, tsv);
    std::vector<LogRow> back = read_log(path, vals, 1000);
    bool same = back.size() == hist.size();
    for (size_t i = 0; same && i < back.size(); i++) {
        const LogRow &a = hist[i], &b = back[i];
        auto near = [](double x, double y, double tol) { return (std::isnan(x) && std::isnan(y)) || std::fabs(x - y) <= tol; };
        same = a.step == b.step && near(a.train, b.train, 5e-7) && near(a.test, b.test, 5e-7) &&
               near(a.lr, b.lr, 1e-9) && a.val.size() == b.val.size() &&
               a.load.size() == b.load.size();
        for (size_t v = 0; same && v < a.val.size(); v++) same = near(a.val[v], b.val[v], 5e-7);
        for (size_t v = 0; same && v < a.load.size(); v++) same = near(a.load[v], b.load[v], 5e-6);
    }
    check(same, "read_log(log_tsv(h)) gives h back, to the printed precision (a NaN test loss included)");
    check(log_tsv(back, vals) == tsv, "log_tsv(read_log(f)) writes f again, byte for byte");
    std::vector<LogRow> upto = read_log(path, vals, 250);
    check(upto.size() == 2 && upto[0].step == 100 && upto[1].step == 200, "read_log drops the rows after up_to (250: steps 100, 200)");
    check(read_log(path, vals, 300).size() == 3 && read_log(path, vals, 99).empty(), "read_log: up_to is inclusive; 99 keeps nothing");
    check(read_log(path, {"a", "b"}, 1000).empty(), "read_log: a log of other --val files (fewer) reads as empty");
    check(read_log(path, {"a", "b", "x"}, 1000).empty(), "read_log: a log of other --val files (renamed) reads as empty");
    check(read_log(path, {}, 1000).empty(), "read_log: a log with --val files, read without them, is empty");
    check(read_log(g_dir + "/none.tsv", vals, 1000).empty(), "read_log: a missing file reads as empty");
    std::string crlf;
    for (const auto& l : ls) crlf += l + "\r\n";
    write(path, crlf);
    check(read_log(path, vals, 1000).size() == 3, "read_log: a log with CRLF line ends reads the same");
    auto broken = [&](const char* what, const std::string& text) {
        write(path, text);
        check(read_log(path, vals, 1000).empty(), "read_log: %s -> empty", what);
    };
    std::vector<std::string> f = fields(ls[2], '\t');
    auto join = [](const std::vector<std::string>& v) {
        std::string s;
        for (size_t i = 0; i < v.size(); i++) s += (i ? "\t" : "") + v[i];
        return s;
    };
    std::vector<std::string> word = f, fewer = f, more = f, empty_field = f;
    word[3] = "abc", fewer.pop_back(), more.push_back("0.1"), empty_field[4] = "";
    broken("a field that is not a number", ls[0] + "\n" + ls[1] + "\n" + join(word) + "\n");
    broken("a row with a field missing", ls[0] + "\n" + ls[1] + "\n" + join(fewer) + "\n");
    broken("a row with a field too many", ls[0] + "\n" + ls[1] + "\n" + join(more) + "\n");
    broken("an empty field", ls[0] + "\n" + ls[1] + "\n" + join(empty_field) + "\n");
    broken("a row ending in a tab", ls[0] + "\n" + ls[1] + "\t\n");
    broken("a header alone with a different case", "Step" + ls[0].substr(4) + "\n" + ls[1] + "\n");
    // steps that no integer holds (converting them would be undefined behaviour)
    for (const char* step : {"1e300", "nan", "-5", "12.5", "inf"}) {
        std::vector<std::string> g = f;
        g[0] = step;
        broken((std::string("a step of ") + step).c_str(), ls[0] + "\n" + ls[1] + "\n" + join(g) + "\n");
    }
}

static void test_shares() {
    std::vector<double> counts((size_t)N_LAYER * E, 0);
    for (int e = 0; e < E; e++) counts[e] = 1 + e;  // layer 0: 1, 2, ..., E; the other layers: nothing
    std::vector<double> s = shares(counts, 0);
    double sum = 0, n = E * (E + 1) / 2.0;
    bool each = s.size() == (size_t)E;
    for (int e = 0; each && e < E; e++) sum += s[e], each = std::fabs(s[e] - (1 + e) / n) < 1e-12;
    check(each && std::fabs(sum - 1) < 1e-12, "shares: counts 1..E become fractions (1..E)/%g, summing to 1", n);
    if (N_LAYER > 1) {
        std::vector<double> z = shares(counts, N_LAYER - 1);
        check(z.size() == (size_t)E && std::all_of(z.begin(), z.end(), [](double x) { return std::isnan(x); }),
              "shares: a layer with no tokens gives NaN, not 0 or a division by zero");
    }
}

// A Routing with counts in the marker, letter and digit classes and none in
// the others; and by-file counts for 3 files, file `zero_file` (if >= 0) with none.
static Routing some_routing() {
    Routing rt = routing_for(" ()+-=abc019:");
    for (int l = 0; l < N_LAYER; l++)
        for (int c : {CLS_MARKER, CLS_LETTER, CLS_DIGIT})
            for (int e = 0; e < E; e++) rt.by_class[((size_t)l * N_CLASS + c) * E + e] = 1 + (e * 7 + c * 3 + l) % 5;
    return rt;
}
static std::vector<std::vector<double>> some_files(int zero_file) {
    std::vector<std::vector<double>> f(3, std::vector<double>((size_t)N_LAYER * E, 0));
    for (int v = 0; v < 3; v++)
        for (int i = 0; i < N_LAYER * E; i++) f[v][i] = v == zero_file ? 0 : 1 + (i * 5 + v) % 7;
    if (E >= 2 && zero_file != 0) f[0][0] = 1, f[0][1] = 6;  // layer 0 of file a: e0 1/7 = 0.14, e1 6/7 = 0.86
    for (int e = 2; e < E && zero_file != 0; e++) f[0][e] = 0;
    return f;
}

static void test_svg() {
    const std::vector<std::string> vals = {"a", "b", "c"};
    std::vector<LogRow> hist = {row_at(100, 1), row_at(200, 2), row_at(300, 3)};
    std::string svg = training_svg("title <with> & \"marks\"", hist, vals, some_files(-1), some_routing());
    std::string p = svg_problem(svg);
    check(p.empty(), "training_svg: a complete SVG, text balanced, no NaN/inf, everything inside the picture%s%s",
          p.empty() ? "" : ": ", p.c_str());
    auto pl = polylines(svg);
    check(pl.size() == 5 + (size_t)N_LAYER * E, "training_svg: one polyline per series: train, test, 3 val files, E per layer (%zu)",
          pl.size());
    check(!pl.empty() && std::all_of(pl.begin(), pl.end(), [](const std::vector<std::string>& v) { return v.size() == 3; }),
          "training_svg: every polyline has a point per history row (3)");
    check(has(svg, ">train</text>") && has(svg, ">test</text>") && has(svg, ">a</text>") && has(svg, ">b</text>") &&
              has(svg, ">c</text>"),
          "training_svg: the legend names train, test and each --val file");
    check(has(svg, "title &lt;with&gt; &amp; &quot;marks&quot;") && !has(svg, "<with>"), "training_svg: the title is escaped");
    check(E < 2 || has(svg, ">0.86</text>"), "training_svg: the by-file heatmap shows shares (6 of 7 -> 0.86)");
    check(has(svg, ">marker</text>") && has(svg, ">letters</text>") && has(svg, ">digits</text>") && !has(svg, ">operators</text>") &&
              !has(svg, ">punct/space</text>"),
          "training_svg: the byte-class heatmap has rows for the classes that have tokens, only");

    // No --val files; a run without a test split (NaN test loss); a single row.
    std::vector<LogRow> h2 = {row_at(100, 1, false)};
    h2[0].test = NAN;
    std::string svg2 = training_svg("no val", h2, {}, {}, some_routing());
    p = svg_problem(svg2);
    check(p.empty(), "training_svg without --val, one row, NaN test loss: a sound SVG%s%s", p.empty() ? "" : ": ", p.c_str());
    auto pl2 = polylines(svg2);
    check(pl2.size() == 2 + (size_t)N_LAYER * E && pl2.size() >= 2 && pl2[0].size() == 1 && pl2[1].empty(),
          "training_svg without --val: train, test and the loads; the NaN test loss is left out of its line");
    size_t circles = 0;
    for (size_t at = svg2.find("<circle"); at != std::string::npos; at = svg2.find("<circle", at + 1)) circles++;
    check(circles == 1 + (size_t)N_LAYER * E && has(svg2, ">100</text>") && has(svg2, ">101</text>") && !has(svg2, ">100.1</text>"),
          "one evaluation: each point is drawn as a marker (%zu), and the steps are ticked 100, 101, not 100.1", circles);

    // A --val file whose tokens were never counted: its shares are NaN, drawn as "-".
    std::string svg3 = training_svg("zero", hist, vals, some_files(1), some_routing());
    p = svg_problem(svg3);
    check(p.empty() && has(svg3, ">-</text>"), "training_svg with a file of no tokens: '-' in its cells, no NaN%s%s",
          p.empty() ? "" : ": ", p.c_str());
    // The checker itself notices broken pictures.
    auto mutated = [&](const std::string& from, const std::string& to) {
        std::string s = svg;
        size_t at = s.find(from);
        return at == std::string::npos ? std::string("<svg") : s.replace(at, from.size(), to);
    };
    check(!svg_problem(mutated("<text x=\"", "<text x=\"nan")).empty() && !svg_problem(mutated("</text>", "")).empty() &&
              !svg_problem(mutated("points=\"", "points=\"5000,1 ")).empty() && !svg_problem(mutated(">train<", ">-nan<")).empty() &&
              !svg_problem(svg.substr(0, svg.size() - 2)).empty(),
          "svg_problem (this test's checker) notices a NaN attribute, an open <text>, a point outside, a NaN label, a cut file");
    // An empty history (the first evaluation has not happened): still a picture.
    std::string svg4 = training_svg("empty", {}, vals, some_files(-1), routing_for("ab"));
    p = svg_problem(svg4);
    check(p.empty(), "training_svg with no history and no routing counts: a sound SVG%s%s", p.empty() ? "" : ": ", p.c_str());
}

// The table checker on tables written here: it passes a good one and notices
// a row whose shares do not sum to 1, a wrong token count, a missing layer.
static void test_table_checker() {
    auto table = [](double last, int layers) {
        std::string s = "routing by x: title\n";
        for (int l = 0; l < layers; l++) {
            s += "layer " + std::to_string(l) + "   ";
            for (int e = 0; e < E; e++) s += "   e" + std::to_string(e);
            s += "   tokens\n  a    ";
            for (int e = 0; e < E; e++) s += fmt("  %.3f", e == E - 1 ? last : 1.0 / E);
            s += "       10\n";
        }
        return s + "report: done\n";
    };
    std::string p1, p2, p3, p4;
    double good = 1 - (E - 1) * std::stod(fmt("%.3f", 1.0 / E));
    Table t = parse_table(table(good, N_LAYER), "routing by x", &p1);
    if (p1.empty()) p1 = table_problem(t, {"a"}, {10});
    Table bad = parse_table(table(good - 0.01, N_LAYER), "routing by x", &p2);
    if (p2.empty()) p2 = table_problem(bad, {"a"}, {10});
    p3 = table_problem(t, {"a"}, {11});
    Table few = parse_table(table(good, N_LAYER - 1), "routing by x", &p4);
    if (p4.empty()) p4 = table_problem(few, {"a"}, {10});
    check(p1.empty() && !p2.empty() && !p3.empty() && !p4.empty(),
          "the table checker passes a good table, fails a row summing to 0.99, a wrong count, a missing layer%s%s",
          p1.empty() ? "" : ": ", p1.c_str());
}

// ----------------------------------------------------------------------------
// cli

static std::string g_train, g_vals[3], g_bad;
static char g_missing = 0;
static const char* VAL_NAMES[3] = {"arith", "code", "names"};
static std::string M() { return q(g_moe) + " --threads 1 "; }
static std::string I() { return q(g_infer) + " --threads 1 "; }

// The first n lines of src that fit the context, written to dst; returns them.
static std::vector<std::string> take(const std::string& src, size_t n, const std::string& dst) {
    std::vector<std::string> out;
    std::string s;
    for (const auto& l : split_lines(read_file(src))) {
        if (out.size() == n) break;
        if ((int)l.text.size() + 1 > BLOCK_SIZE) continue;
        out.push_back(l.text), s += l.text + "\n";
    }
    write(dst, s);
    return out;
}
static double tokens_of(const std::vector<std::string>& ls) {
    double n = 0;
    for (const auto& l : ls) n += (double)l.size() + 1;
    return n;
}
static std::vector<std::string> g_val_lines[3];

static std::string train_cmd(const std::string& dir, int steps, const std::string& extra = "") {
    return M() + "-i " + q(g_train) + " -o " + q(dir) + " --max-steps " + std::to_string(steps) +
           " --eval-interval 100 --log-interval 100 --num-samples 0 --val " + q(g_vals[0]) + " " + q(g_vals[1]) + " " +
           q(g_vals[2]) + " " + extra;
}
// The rows of a log.tsv: the steps, and the rows themselves.
static std::vector<std::string> log_rows(const std::string& dir) {
    std::vector<std::string> ls = lines_of(slurp(dir + "/log.tsv"));
    if (!ls.empty()) ls.erase(ls.begin());
    return ls;
}
static std::string steps_of(const std::vector<std::string>& rows) {
    std::string s;
    for (const auto& r : rows) s += (s.empty() ? "" : ",") + fields(r, '\t')[0];
    return s;
}

static void cli_train(const std::string& dir) {
    Run r = run(train_cmd(dir, 200));
    check(r.code == 0, "training 200 steps with --val a b c exits 0");
    if (r.code) std::printf("%s\n", r.out.c_str());
    std::vector<std::string> ls = lines_of(slurp(dir + "/log.tsv"));
    std::vector<std::string> names(VAL_NAMES, VAL_NAMES + 3);
    check(!ls.empty() && ls[0] == want_header(names), "log.tsv header: step train test val:arith val:code val:names load:L0e0...: %s",
          ls.empty() ? "<none>" : ls[0].c_str());
    std::vector<std::string> rows = log_rows(dir);
    check(steps_of(rows) == "100,200", "log.tsv has exactly the rows of steps 100 and 200 (got %s)", steps_of(rows).c_str());
    bool finite = !rows.empty();
    for (const auto& row : rows) {
        std::vector<std::string> f = fields(row, '\t');
        finite &= f.size() == 7 + (size_t)N_LAYER * E;  // step, train, test, lr, 3 val, the loads
        for (size_t i = 0; finite && i < f.size(); i++) {
            double v;
            finite = number(f[i], &v) && (i < 7 || (v >= 0 && v <= 1));
        }
    }
    check(finite, "log.tsv rows: 7 + N_LAYER*E fields, all finite numbers, loads in [0, 1]");
    std::string svg = slurp(dir + "/report.svg"), p = svg_problem(svg);
    check(p.empty(), "report.svg is a complete, sound SVG%s%s", p.empty() ? "" : ": ", p.c_str());
    auto pl = polylines(svg);
    check(pl.size() == 5 + (size_t)N_LAYER * E + (E > 1 ? N_LAYER : 0) && pl[0].size() == 2 && pl.back().size() == 2,
          "report.svg: a polyline per series (train, test, 3 val, N_LAYER*E loads, N_LAYER saturations), 2 points each");
    check(E == 1 || (has(r.out, "routing dynamics, on the first ") && has(r.out, "saturation >= 0.9 from step")),
          "the final report prints the routing dynamics");
    // step    100 | val arith X | code Y | names Z, and the same numbers in log.tsv
    std::regex val_line("step +([0-9]+) \\| val arith ([0-9.]+) \\| code ([0-9.]+) \\| names ([0-9.]+)\\n");
    int n_val = 0;
    bool agree = true;
    for (std::sregex_iterator it(r.out.begin(), r.out.end(), val_line), e; it != e; ++it, n_val++) {
        std::string step = (*it)[1];
        for (const auto& row : rows) {
            std::vector<std::string> f = fields(row, '\t');
            if (f[0] != step) continue;
            for (int v = 0; v < 3; v++) agree &= std::fabs(std::atof(f[4 + v].c_str()) - std::atof((*it)[2 + v].str().c_str())) < 6e-5;
        }
    }
    check(n_val == 2 && has(r.out, "step    100 | val arith "), "stdout has a 'step    100 | val arith X | code Y | names Z' line per evaluation");
    check(agree && n_val == 2, "the printed val losses are those in log.tsv");
    if (E > 1) {
        std::string prob;
        Table t = parse_table(r.out, "routing by --val file", &prob);
        if (prob.empty()) prob = table_problem(t, names, {tokens_of(g_val_lines[0]), tokens_of(g_val_lines[1]), tokens_of(g_val_lines[2])});
        check(prob.empty(), "final table 'routing by --val file': a row per file per layer, shares sum to 1, tokens = bytes + markers%s%s",
              prob.empty() ? "" : ": ", prob.c_str());
        prob.clear();
        Table c = parse_table(r.out, "routing by the class of the byte read", &prob);
        std::vector<std::string> present;
        if (prob.empty() && !c.empty())
            for (const auto& row : c[0]) present.push_back(row.name);
        if (prob.empty()) prob = table_problem(c, present, {});
        // The test split is 10% of the 2000 lines: 200 line-start markers.
        bool marker = prob.empty() && !c[0].empty() && c[0][0].name == "marker" && c[0][0].tokens == 200;
        check(prob.empty() && marker && present.size() >= 4,
              "final table 'routing by the class of the byte read': shares sum to 1, 200 markers (the test lines)%s%s",
              prob.empty() ? "" : ": ", prob.c_str());
    }
    check(!has(r.out, "\x1b["), "no colour escapes in the piped output of training");
}

static void cli_eval(const std::string& dir) {
    const std::string ck = q(dir + "/last.safetensors");
    Run r = run(M() + "--checkpoint " + ck + " --eval " + q(g_vals[0]) + " " + q(g_vals[2]));
    check(r.code == 0, "--eval arith names exits 0");
    std::vector<std::string> ls = lines_of(r.out);
    bool shape = ls.size() >= 4;
    for (int f = 0; shape && f < 2; f++) {
        const std::vector<std::string>& file = g_val_lines[f ? 2 : 0];
        std::string want = "eval " + g_vals[f ? 2 : 0] + " loss ";
        char tail[64];
        std::snprintf(tail, sizeof tail, " tokens %.0f", tokens_of(file));
        shape &= starts(ls[2 * f], want) && ends(ls[2 * f], tail) && starts(ls[2 * f + 1], "  expert load L0 ");
        // each layer's load sums to 1 (printed with 2 decimals)
        std::vector<std::string> w = words(ls[2 * f + 1]);
        shape &= (int)w.size() == 2 + N_LAYER * (E + 1) + (N_LAYER - 1);
        double sum = 0;
        int in_layer = 0;
        for (size_t i = 2; shape && i < w.size(); i++) {
            if (w[i] == "|" || w[i][0] == 'L') {
                if (w[i] == "|") shape &= std::fabs(sum - 1) <= 0.005 * E + 1e-9 && in_layer == E, sum = 0, in_layer = 0;
                continue;
            }
            double v;
            shape &= number(w[i], &v), sum += v, in_layer++;
        }
        shape &= std::fabs(sum - 1) <= 0.005 * E + 1e-9 && in_layer == E;
    }
    check(shape, "--eval prints 'eval FILE loss X tokens N' (N = bytes + markers), then '  expert load L0 ...' summing to 1 per layer");
    if (!shape) std::printf("%s\n", r.out.c_str());
    // The loss of a --val file at step 200 is the --eval loss of the step-200 checkpoint.
    std::vector<std::string> rows = log_rows(dir);
    std::smatch m;
    bool same = rows.size() == 2 && std::regex_search(r.out, m, std::regex("loss ([0-9.]+) tokens")) &&
                fields(rows[1], '\t')[4] == m[1].str();  // step, train, test, lr, then val:arith
    check(same, "the val:arith loss logged at step 200 equals --eval's loss on the step-200 checkpoint");
    if (E > 1) {
        std::string prob;
        Table t = parse_table(r.out, "routing by file", &prob);
        if (prob.empty()) prob = table_problem(t, {g_vals[0], g_vals[2]}, {tokens_of(g_val_lines[0]), tokens_of(g_val_lines[2])});
        check(prob.empty(), "--eval: table 'routing by file', shares sum to 1, tokens per file%s%s", prob.empty() ? "" : ": ",
              prob.c_str());
        // the class table counts the bytes read, whose classes the test can count itself
        double n[N_CLASS] = {};
        for (int f : {0, 2})
            for (const auto& l : g_val_lines[f]) {
                n[CLS_MARKER]++;
                for (unsigned char c : l)
                    n[std::isalpha(c) || c >= 0x80 ? CLS_LETTER
                      : std::isdigit(c)            ? CLS_DIGIT
                      : c && std::strchr("+-*/=<>%", c) ? CLS_OPERATOR
                                                   : CLS_OTHER]++;
            }
        std::vector<std::string> names;
        std::vector<double> tokens;
        for (int c = 0; c < N_CLASS; c++)
            if (n[c] > 0) names.push_back(CLASS_NAMES[c]), tokens.push_back(n[c]);
        prob.clear();
        Table c = parse_table(r.out, "routing by the class of the byte read", &prob);
        if (prob.empty()) prob = table_problem(c, names, tokens);
        check(prob.empty(), "--eval: table by byte class, shares sum to 1, each class's count of bytes read%s%s",
              prob.empty() ? "" : ": ", prob.c_str());
    }
    check(!has(r.out, "\x1b["), "no colour escapes in the piped output of --eval");
}

static void cli_arith(const std::string& dir) {
    const std::string ck = q(dir + "/last.safetensors");
    int lines = 0;
    for (const auto& l : g_val_lines[0]) {
        int64_t v;
        std::string p, a;
        lines += parse_arith(l, &v, &p, &a);
    }
    Run r = run(M() + "--checkpoint " + ck + " --arith " + q(g_vals[0]));
    std::smatch g, s;
    bool greedy = std::regex_search(r.out, g, std::regex("arith greedy: ([0-9]+) / ([0-9]+) held-out prompts completed correctly"));
    bool sampled = std::regex_search(r.out, s, std::regex("arith sampled: ([0-9]+) samples, ([0-9]+) are arithmetic, ([0-9]+) of those correct"));
    int R = greedy ? std::stoi(g[1]) : -1, T = greedy ? std::stoi(g[2]) : -1;
    check(r.code == 0 && greedy && T == (int)g_val_lines[0].size() && T == lines && R >= 0 && R <= T,
          "--arith: 'arith greedy: R / T' with T = %zu, the lines of the file", g_val_lines[0].size());
    if (!greedy) std::printf("%s\n", r.out.c_str());
    int n = sampled ? std::stoi(s[1]) : -1, P = sampled ? std::stoi(s[2]) : -1, Cc = sampled ? std::stoi(s[3]) : -1;
    check(sampled && n == 1000 && 0 <= Cc && Cc <= P && P <= 1000, "--arith: 'arith sampled: 1000 samples, P are arithmetic, C of those correct', 0 <= C <= P <= 1000 (P %d, C %d)", P, Cc);
    // at most 5 wrong answers are shown, each "  wrong: a+b=got (want v)"
    int wrong = 0;
    bool wrong_ok = true;
    std::regex wl("  wrong: ([0-9]+[-+*][0-9]+=)(.*) \\(want (-?[0-9]+)\\)");
    for (const auto& l : lines_of(r.out)) {
        if (!starts(l, "  wrong: ")) continue;
        std::smatch m;
        wrong++;
        int64_t v;
        std::string p, a;
        wrong_ok &= std::regex_match(l, m, wl) && parse_arith(m[1].str() + "0", &v, &p, &a) && std::to_string(v) == m[3].str() &&
                    m[2].str() != m[3].str();
    }
    check(greedy && wrong == std::min(5, T - R) && wrong_ok, "--arith: min(5, T - R) = %d '  wrong: PROMPT GOT (want V)' lines, each really wrong (%d)",
          greedy ? std::min(5, T - R) : -1, wrong);
    Run ri = run(I() + "--checkpoint " + ck + " --arith " + q(g_vals[0]));
    check(ri.code == 0 && ri.out == r.out, "--arith: the inference-only binary prints the same report");
    for (const auto& bin : {M(), I()}) {
        Run b = run(bin + "--checkpoint " + ck + " --arith " + q(g_vals[2]));
        check(b.code == 1 && has(b.out, "--arith: '" + g_vals[2] + "' has no lines of the form a+b=c"),
              "--arith on a file of names (no arithmetic): exit 1, says so (%s binary; exit %d)", bin == M() ? "training" : "inference-only", b.code);
    }
    check(!has(r.out, "\x1b["), "no colour escapes in the piped output of --arith");
}

// Parse --route's plain output for one line: the shown text and per layer the digits.
static bool parse_route(const std::vector<std::string>& ls, size_t at, const std::string& text, std::string* why) {
    if (at + 2 + N_LAYER > ls.size()) return *why = "too short", false;
    if (ls[at] != "route \"" + text + "\"  (^ is the line start)") return *why = "header '" + ls[at] + "'", false;
    if (ls[at + 1] != "       ^" + text) return *why = "text line '" + ls[at + 1] + "'", false;
    for (int l = 0; l < N_LAYER; l++) {
        const std::string& s = ls[at + 2 + l];
        std::vector<std::string> w = words(s);
        if (w.size() != 2 || w[0] != "L" + std::to_string(l) || w[1].size() != text.size() + 1 || s.find(w[1]) != 7)
            return *why = "layer line '" + s + "'", false;
        for (char c : w[1])
            if (!std::isdigit((unsigned char)c) || c - '0' >= E) return *why = "expert '" + std::string(1, c) + "'", false;
    }
    return true;
}

static void cli_route(const std::string& dir) {
    const std::string ck = q(dir + "/last.safetensors");
    const std::string text = "23+45=68";
    Run r = run(M() + "--checkpoint " + ck + " --route " + q(text));
    std::vector<std::string> ls = lines_of(r.out);
    std::string why;
    bool ok = r.code == 0 && parse_route(ls, 0, text, &why);
    check(ok, "--route \"23+45=68\": the line '^23+45=68', then N_LAYER lines of 9 expert digits < E%s%s", ok ? "" : ": ", why.c_str());
    if (!ok) std::printf("%s\n", r.out.c_str());
    check(!has(r.out, "\x1b["), "--route piped: no colour escapes");
    Run again = run(M() + "--checkpoint " + ck + " --route " + q(text));
    check(again.code == 0 && again.out == r.out, "--route twice gives identical output");
    Run inf = run(I() + "--checkpoint " + ck + " --route " + q(text));
    check(inf.code == 0 && inf.out == r.out, "the inference-only binary routes identically");

    // --gates: a row per byte, K "eN g" pairs per layer
    Run g = run(M() + "--checkpoint " + ck + " --route " + q(text) + " --gates");
    std::vector<std::string> gl = lines_of(g.out);
    bool same_start = gl.size() >= ls.size() && std::equal(ls.begin(), ls.end(), gl.begin());
    size_t at = ls.size();
    bool hdr = at < gl.size() && starts(gl[at], "  byte ") && count(gl[at], "| L") == (size_t)N_LAYER;
    bool rows_ok = hdr && gl.size() == at + 1 + text.size() + 1;
    std::string shown = "^" + text, bad;
    for (size_t i = 0; rows_ok && i < shown.size(); i++) {
        std::vector<std::string> w = words(gl[at + 1 + i]);
        rows_ok = (int)w.size() == 1 + N_LAYER * (1 + 2 * K) && w[0] == std::string(1, shown[i]);
        for (int l = 0; rows_ok && l < N_LAYER; l++) {
            size_t b = 1 + l * (1 + 2 * K);
            rows_ok = w[b] == "|";
            double sum = 0;
            std::set<int> experts;
            for (int j = 0; rows_ok && j < K; j++) {
                const std::string& e = w[b + 1 + 2 * j];
                double gate;
                rows_ok = e.size() >= 2 && e[0] == 'e' && std::isdigit((unsigned char)e[1]) && std::atoi(e.c_str() + 1) < E &&
                          number(w[b + 2 + 2 * j], &gate) && gate > 0 && gate <= 1;
                sum += gate, experts.insert(std::atoi(e.c_str() + 1));
                // the first choice is the digit of the plain table
                if (rows_ok && j == 0) rows_ok = ls[2 + l][7 + i] - '0' == std::atoi(e.c_str() + 1);
            }
            rows_ok = rows_ok && (int)experts.size() == K && (!(K > 1 && NORM_TOPK) || std::fabs(sum - 1) <= 0.005 * K + 1e-9);
            if (!rows_ok) bad = gl[at + 1 + i];
        }
    }
    check(g.code == 0 && same_start && rows_ok,
          "--gates: the plain table, then a row per byte (9) with K distinct 'eN g' per layer, the first the digit above%s%s",
          (K > 1 && NORM_TOPK) ? ", gates summing to 1" : "", bad.empty() ? "" : (": " + bad).c_str());
    if (!(g.code == 0 && same_start && rows_ok)) std::printf("%s\n", g.out.c_str());

    // --route - : every line of standard input, each as --route would route it
    std::string in = g_dir + "/route_in.txt";
    write(in, text + "\n\nabc\r\n");
    Run two = run(M() + "--checkpoint " + ck + " --route - < " + q(in));
    Run abc = run(M() + "--checkpoint " + ck + " --route abc");
    std::vector<std::string> tl = lines_of(two.out);
    std::string why2;
    bool both = two.code == 0 && parse_route(tl, 0, text, &why) && parse_route(tl, ls.size(), "abc", &why2) &&
                two.out == r.out + abc.out;
    check(both, "--route - with two lines (a blank and a CRLF between): both routed, each as --route TEXT does");
    Run inf2 = run(I() + "--checkpoint " + ck + " --route - < " + q(in));
    check(inf2.code == 0 && inf2.out == two.out, "the inference-only binary supports --route - too");

    // the limits: the trained context (longest training line + 1) less the
    // marker fits, one more byte does not (those positions were never trained)
    const int ctx = (int)meta_int(read_safetensors(dir + "/last.safetensors"), "context");
    Run fit = run(M() + "--checkpoint " + ck + " --route " + q(std::string(ctx - 1, 'a')));
    check(fit.code == 0 && parse_route(lines_of(fit.out), 0, std::string(ctx - 1, 'a'), &why),
          "--route of context - 1 = %d bytes works", ctx - 1);
    Run lng = run(M() + "--checkpoint " + ck + " --route " + q(std::string(ctx, 'a')));
    check(lng.code == 1 && has(lng.out, "has " + std::to_string(ctx) + " bytes; this model was trained on at most " +
                                            std::to_string(ctx - 1)),
          "--route of context = %d bytes: exit 1, names the limit %d (exit %d)", ctx, ctx - 1, lng.code);
    std::string ch = std::string(1, g_missing);
    Run out = run(M() + "--checkpoint " + ck + " --route " + q("ab" + ch));
    check(out.code == 1 && has(out.out, "--route: byte '" + ch + "'") && has(out.out, "not in the model's vocabulary"),
          "--route with a byte outside the vocabulary: exit 1, names the byte (exit %d)", out.code);
    std::string in2 = g_dir + "/route_long.txt";
    write(in2, "abc\n" + std::string(ctx, 'a') + "\nabc\n");
    Run lng2 = run(I() + "--checkpoint " + ck + " --route - < " + q(in2));
    size_t first = lng2.out.find("^abc"), last = lng2.out.rfind("^abc");
    check(lng2.code == 1 && has(lng2.out, "this model was trained on at most") && first != last &&
              has(lng2.out, "1 line(s) of standard input could not be routed"),
          "--route - with a too-long middle line: the others are routed, the error names the limit, exit 1");

    // On a terminal the bytes are coloured instead; NO_COLOR turns that off.
    if (std::system("command -v script >/dev/null 2>&1") == 0) {
        std::string cmd = "script -qec " + q(g_moe + " --threads 1 --checkpoint " + dir + "/last.safetensors --route " + text) + " /dev/null";
        Run tty = run(cmd + " </dev/null");
        Run plain = run("NO_COLOR=1 " + cmd + " </dev/null");
        check(tty.code == 0 && has(tty.out, "\x1b[48;5;") && !has(tty.out, "       ^" + text),
              "--route on a terminal (script(1)): coloured bytes, no digit rows");
        check(plain.code == 0 && !has(plain.out, "\x1b[") && has(plain.out, "       ^" + text), "NO_COLOR=1 on a terminal: plain text");
    } else {
        std::printf("skip: no script(1) to give --route a terminal\n");
    }
}

static void cli_bad_val() {
    std::string dir = g_dir + "/badval";
    Run r = run(M() + "-i " + q(g_train) + " -o " + q(dir) + " --max-steps 10 --num-samples 0 --val " + q(g_vals[0]) + " " + q(g_bad));
    std::string ch = std::string(1, g_missing);
    check(r.code == 1 && has(r.out, g_bad + ":2: byte '" + ch + "'"), "--val with a byte outside the training vocabulary: exit 1, names file:line (exit %d)",
          r.code);
    if (r.code != 1) std::printf("%s\n", r.out.c_str());
    check(!fs::exists(dir), "... and fails before making the work dir");
    Run t = run(M() + "-i " + q(g_train) + " -o " + q(dir) + " --text --max-steps 10 --val " + q(g_vals[0]));
    check(t.code == 1 && has(t.out, "--val works in line mode"), "--val in --text mode: exit 1, says --val needs line mode (exit %d)", t.code);
    Run none = run(M() + "-i " + q(g_train) + " -o " + q(dir) + " --val --max-steps 10");
    check(none.code == 2 && has(none.out, "--val needs at least one file"), "--val followed by a flag: exit 2, needs a file");
}

static void cli_resume(const std::string& dir) {
    std::vector<std::string> before = log_rows(dir);
    Run r = run(train_cmd(dir, 300, "--resume"));
    check(r.code == 0 && has(r.out, "resuming from"), "--resume --max-steps 300 with the same --val files exits 0");
    std::vector<std::string> rows = log_rows(dir);
    check(steps_of(rows) == "100,200,300", "after the resume log.tsv has steps 100,200,300, no duplicates (got %s)", steps_of(rows).c_str());
    check(rows.size() == 3 && before.size() == 2 && rows[0] == before[0] && rows[1] == before[1],
          "the resumed log keeps the first run's rows unchanged");
    auto pl = polylines(slurp(dir + "/report.svg"));
    check(!pl.empty() && pl[0].size() == 3, "report.svg after the resume draws all 3 evaluations");
    check(!has(r.out, "(no log.tsv"), "a resume that finds its log says nothing about it");

    // a finished run resumed again: nothing to train, and the log untouched
    std::string log = slurp(dir + "/log.tsv");
    Run fin = run(train_cmd(dir, 300, "--resume"));
    check(fin.code == 0 && has(fin.out, "nothing to train") && slurp(dir + "/log.tsv") == log,
          "resuming a finished run with --val: exit 0, nothing to train, log.tsv untouched (exit %d)", fin.code);
    if (fin.code != 0) std::printf("%s\n", fin.out.c_str());

    fs::remove(dir + "/log.tsv");
    Run nolog = run(train_cmd(dir, 400, "--resume"));
    check(nolog.code == 0 && has(nolog.out, "(no log.tsv"), "--resume after deleting log.tsv: exit 0, with the note '(no log.tsv ...'");
    check(steps_of(log_rows(dir)) == "400" && svg_problem(slurp(dir + "/report.svg")).empty(),
          "... and the new log starts at the resumed run's evaluation (step 400), report.svg sound");
}

static void test_cli(const std::string& data) {
    g_train = g_dir + "/train.txt";
    std::vector<std::string> train = take(data + "/domain_mix_train.txt", 2000, g_train);
    for (int v = 0; v < 3; v++)
        g_vals[v] = g_dir + "/" + VAL_NAMES[v] + ".txt",
        g_val_lines[v] = take(data + "/domain_" + VAL_NAMES[v] + "_val.txt", 50, g_vals[v]);
    // a printable byte the training data lacks, for the vocabulary errors
    std::string vocab;
    for (const auto& l : train) vocab += l;
    vocab = vocab_of(vocab);
    char missing = 0;
    for (char c : std::string("~@#$&!?`")) if (vocab.find(c) == std::string::npos) { missing = c; break; }
    if (!check(missing && train.size() == 2000, "setup: 2000 training lines, and a byte they lack ('%c')", missing)) return;
    g_missing = missing;
    g_bad = g_dir + "/bad.txt";
    write(g_bad, "abc\nab" + std::string(1, missing) + "c\n");

    const std::string dir = g_dir + "/run";
    cli_train(dir);
    cli_eval(dir);
    cli_arith(dir);
    cli_route(dir);
    cli_bad_val();
    cli_resume(dir);
}

// Routing dynamics: saturation, co-activation and vocabulary specialisation
// on routings made up for the purpose, where the answer is known.
static void test_dynamics() {
    std::mt19937 gen(7);
    const size_t n = 20000;
    // a random top-K choice per (token, layer): K distinct experts
    auto random_picks = [&]() {
        std::vector<int16_t> p;
        for (size_t t = 0; t < n * N_LAYER; t++) {
            std::vector<int> e(E);
            std::iota(e.begin(), e.end(), 0);
            std::shuffle(e.begin(), e.end(), gen);
            for (int j = 0; j < K; j++) p.push_back((int16_t)e[j]);
        }
        return p;
    };
    const std::vector<int16_t> a = random_picks(), b = random_picks();
    bool self = true, chance = true;
    for (int l = 0; l < N_LAYER; l++) {
        self = self && saturation(a, a, l) == 1.0;
        chance = chance && std::fabs(saturation(a, b, l) - (double)K / E) < 0.02;
    }
    check(self, "saturation of a routing against itself is exactly 1");
    check(chance, "saturation of two random routings is about K/E = %.3f (layer 0: %.3f)", (double)K / E, saturation(a, b, 0));
    // A router keyed on the byte: every occurrence of a byte takes the same experts.
    std::vector<int> bytes(n);
    std::vector<int16_t> keyed;
    for (size_t t = 0; t < n; t++) {
        bytes[t] = (int)(gen() % 30);
        for (int l = 0; l < N_LAYER; l++)
            for (int j = 0; j < K; j++) keyed.push_back((int16_t)((bytes[t] + l + j) % E));
    }
    const double spec = vocab_specialisation(keyed, bytes, 1), rnd = vocab_specialisation(a, bytes, 1);
    check(spec == 1.0 && rnd < (double)K / E + 0.05, "vocabulary specialisation: 1 for a router keyed on the byte (%.3f), "
          "about K/E for a random one (%.3f)", spec, rnd);
    // A byte seen fewer than 10 times is left out: 9 tokens give no figure at all.
    std::vector<int> nine(9, 5);
    check(std::isnan(vocab_specialisation(a, nine, 0)), "vocabulary specialisation counts only bytes seen 10 times or more");
    // Co-activation on three tokens whose choices are known.
    if (K == 2 && E >= 3) {
        std::vector<int16_t> p;
        const int pairs[3][2] = {{0, 1}, {0, 2}, {1, 0}};
        for (auto& pr : pairs)
            for (int l = 0; l < N_LAYER; l++) p.push_back((int16_t)pr[0]), p.push_back((int16_t)pr[1]);
        std::vector<double> counts;
        const std::vector<double> c = coactivation(p, 0, &counts);
        // expert 0 was chosen 3 times, twice beside 1 and once beside 2
        check(counts[0 * E + 1] == 2 && counts[0 * E + 2] == 1 && counts[1 * E + 0] == 2 && counts[2 * E + 0] == 1 &&
                  counts[1 * E + 2] == 0 && std::fabs(c[0 * E + 1] - 2.0 / 3) < 1e-12 && c[1 * E + 0] == 1 && c[2 * E + 0] == 1,
              "co-activation counts exactly: P(1 | 0) = 2/3, P(0 | 1) = 1, P(0 | 2) = 1");
    }
    bool rows = true;  // every row of a random routing's co-activation sums to K - 1
    const std::vector<double> c = coactivation(a, 2);
    for (int x = 0; x < E; x++) rows = rows && std::fabs(std::accumulate(c.begin() + x * E, c.begin() + (x + 1) * E, 0.0) - (K - 1)) < 1e-9;
    check(rows, "each co-activation row sums to K - 1");
    // settled_at: the first step from which saturation stays at 0.9 or more
    Settling s;
    s.steps = {100, 200, 300, 400};
    s.picks = {b, a, b, a};  // random, final, random, final: settled only at the end
    check(settled_at(s, 0) == 400, "settled_at: a routing that leaves its final form again settles only at the end (%lld)",
          (long long)settled_at(s, 0));
    s.picks = {b, a, a, a};
    check(settled_at(s, 0) == 200, "settled_at: final from step 200 on gives 200 (%lld)", (long long)settled_at(s, 0));
    const std::string svg = training_svg("dyn", {row_at(100, 1), row_at(200, 2)}, {}, {}, some_routing(), s);
    check(svg_problem(svg).empty() && has(svg, "router saturation") && polylines(svg).size() == 2 + (size_t)N_LAYER * E + (E > 1 ? N_LAYER : 0),
          "report.svg draws each layer's saturation against step %s", svg_problem(svg).c_str());
}

int main(int argc, char** argv) {
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s unit|cli MOE MOE_INFER DATA_DIR SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    std::string group = argv[1];
    g_moe = argv[2], g_infer = argv[3], g_dir = std::string(argv[5]) + "/report_" + group;
    fs::remove_all(g_dir);
    fs::create_directories(g_dir);
    if (group == "unit") {
        test_parse_arith();
        test_routing_for();
        test_log();
        test_shares();
        test_svg();
        test_table_checker();
        test_dynamics();
    } else if (group == "cli") {
        test_cli(argv[4]);
    } else {
        return std::fprintf(stderr, "unknown group %s\n", group.c_str()), 2;
    }
    return report(("test_report " + group).c_str());
}
