/*
domain_mix.cpp: makes the "domain mix" data set, three kinds of short lines
shuffled together, for watching whether the experts of moe.cpp specialise.

The three domains look nothing alike, so a router that has learned anything
should send them to different experts:

  names       the lines of names.txt                  emma
  arithmetic  sums, differences and products          417+38=455
  code        tiny Python-like one-liners             for i in range(5):a=a*2

Each domain has as many lines as names.txt (29,693). Of each, 500 go to its
own validation file (domain_names_val.txt, domain_arith_val.txt,
domain_code_val.txt), 500 to the mixed test file (domain_mix_test.txt, 1,500
lines, shuffled) and the rest to domain_mix_train.txt (all three, shuffled).

No line appears twice, in one file or across files. Every line is 1 to 28
bytes of ASCII and ends in "\n", so each fits moe.cpp's default context
(MOE_BLOCK_SIZE 32) with its start and end markers.

Build and run (from the repo root; CMake builds it too, see data/README.md):

    g++ -std=c++17 -O2 data/domain_mix.cpp -o domain_mix
    ./domain_mix names.txt data                 # (re)write the five files
    ./domain_mix --check data names.txt         # do data/'s files match the code?
    ./domain_mix --seed 7 names.txt /tmp/mix    # another draw of the same recipe

The output is a function of names.txt and the seed alone, byte for byte, on
every compiler and standard library: the random numbers come from our own
generator, never from <random> (whose distributions differ between
libraries), and nothing iterates an unordered container.
*/

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <map>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace fs = std::filesystem;

// Every error is a message for the user: what went wrong and how to fix it.
[[noreturn]] static void fail(const std::string& msg) { throw std::runtime_error(msg); }

constexpr uint64_t DEFAULT_SEED = 3407;  // moe.cpp's default seed too
constexpr size_t HELD_OUT = 500;         // lines per domain in each of val and test
constexpr size_t MAX_LINE = 28;          // bytes, without the "\n"

// splitmix64, as in moe.cpp. below() takes the remainder: its bias (< n/2^64)
// is irrelevant here, and unlike std::uniform_int_distribution it is the same
// everywhere.
struct Rng {
    uint64_t state;
    uint64_t next() {
        uint64_t z = (state += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    uint64_t below(uint64_t n) { return next() % n; }
};
// One stream per job, so that changing (say) the code templates leaves the
// names split and the arithmetic lines exactly as they were.
enum Stream : uint64_t { STREAM_NAMES = 1, STREAM_ARITH = 2, STREAM_CODE = 3, STREAM_MIX = 4 };
static Rng make_rng(uint64_t seed, Stream s) {
    Rng r{seed * 0x2545F4914F6CDD1Dull + s * 0x9E3779B97F4A7C15ull};
    r.next();
    return r;
}

// Fisher-Yates with our below(): std::shuffle's result depends on the library.
static void shuffle(std::vector<std::string>& v, Rng& r) {
    for (size_t i = v.size(); i > 1; i--) std::swap(v[i - 1], v[(size_t)r.below(i)]);
}

// NOTE on drawing: C++ leaves the order in which the operands of + (or the
// arguments of a call) are evaluated unspecified, so f(r.below(10), r.below(10))
// may draw its two numbers in either order depending on the compiler. Every
// draw below is therefore its own statement.

// ---------------------------------------------------------------------------
// Names: checked strictly. A name must look like nothing but a name: a digit,
// a capital or a stray "\r" would blur the domains and add to the vocabulary.

static std::vector<std::string> read_names(const std::string& path) {
    std::error_code ec;
    if (fs::is_directory(path, ec)) fail("'" + path + "' is a directory: give the path of names.txt itself");
    std::ifstream f(path, std::ios::binary);
    if (!f) fail("cannot open '" + path + "': give the path of names.txt (it is in the repo root)");
    std::string raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (raw.empty()) fail("'" + path + "' is empty: it should hold one name per line (see data/README.md to rebuild it)");
    std::vector<std::string> names;
    std::map<std::string, size_t> first_seen;  // name -> line number, to report duplicates
    size_t start = 0, number = 0;
    while (start < raw.size()) {  // a missing final "\n" is fine; an extra one makes no empty line
        size_t end = std::min(raw.find('\n', start), raw.size());
        std::string name = raw.substr(start, end - start);
        start = end + 1;
        std::string where = path + ":" + std::to_string(++number) + ": ";
        if (name.empty()) fail(where + "empty line: remove it (every line must be one name)");
        for (unsigned char c : name)
            if (c < 'a' || c > 'z') {
                char hex[8];
                std::snprintf(hex, sizeof hex, "0x%02x", c);
                fail(where + "byte " + hex + " is not a letter a-z" +
                     (c == '\r' ? ": the file has Windows line endings; convert it with dos2unix"
                                : ": names must be lowercase a-z only; fix or remove that line"));
            }
        if (name.size() > MAX_LINE)
            fail(where + "the name has " + std::to_string(name.size()) + " letters, more than " +
                 std::to_string(MAX_LINE) + ": shorten or remove it");
        auto seen = first_seen.emplace(name, number);
        if (!seen.second)
            fail(where + "'" + name + "' repeats line " + std::to_string(seen.first->second) +
                 ": remove duplicates (e.g. awk '!seen[$0]++' names.txt > deduped.txt)");
        names.push_back(name);
    }
    if (names.size() <= 2 * HELD_OUT)
        fail("'" + path + "' has " + std::to_string(names.size()) + " names; at least " +
             std::to_string(2 * HELD_OUT + 1) + " are needed (500 validation, 500 test, the rest training)");
    return names;
}

// ---------------------------------------------------------------------------
// Arithmetic: a+b=c and a-b=c with operands 0-999 (a >= b, so no negative
// results), a*b=c with operands 0-99. Operators come in the ratio
// + : - : * = 2 : 2 : 1, because only 10,000 products exist: with an equal
// share over a third of the products drawn would be repeats, thrown away.

static std::string arith_line(Rng& r) {
    uint64_t op = r.below(5);
    uint64_t limit = op < 4 ? 1000 : 100;
    uint64_t a = r.below(limit);
    uint64_t b = r.below(limit);
    if (op < 2) return std::to_string(a) + "+" + std::to_string(b) + "=" + std::to_string(a + b);
    if (op < 4) {
        if (a < b) std::swap(a, b);
        return std::to_string(a) + "-" + std::to_string(b) + "=" + std::to_string(a - b);
    }
    return std::to_string(a) + "*" + std::to_string(b) + "=" + std::to_string(a * b);
}

// ---------------------------------------------------------------------------
// Code: each template is a line of Python with capital-letter holes, filled
// left to right (everything Python here is lowercase, so a capital is a hole):
//   V  a fresh variable       U  the last V again (x=x+1, not x=y+1)
//   N  a number 0-99          O  an operator + - *
//   Q  a comparison           F  a function name
//   L  a letter, quoted by the template       S  a list body: 1-4 numbers
// Repeating U is what makes the lines look like code rather than noise: a
// loop that updates its own counter, a function that uses its argument.

static const char* const TEMPLATES[] = {
    "V=UON",                    // x=x+1
    "VO=N",                     // n+=2
    "V=V[N]",                   // y=s[3]
    "V=[S]",                    // b=[1,2,3]
    "V.append(N)",              // c.append(4)
    "V=len(V)",                 // y=len(s)
    "V=U+'L'",                  // s=s+'x'
    "V=F(V,V)",                 // z=add(a,b)
    "print(V)",                 // print(x)
    "return VOV",               // return a+b
    "if VQN:V=N",               // if y>12:z=3
    "if VQV:return V",          // if a==b:return c
    "while VQN:U=UON",          // while n<10:n=n+2
    "for V in range(N):V=UON",  // for i in range(5):a=a*2
    "def F(V):return UON",      // def foo(x):return x*2
    "def F(V):print(U)",        // def foo(x):print(x)
};
static const std::vector<std::string> VARS = {"a", "b", "c", "i", "j", "n", "s", "x", "y", "z"};
static const std::vector<std::string> FUNCS = {"foo", "bar", "f", "g", "add", "sum_"};
static const std::vector<std::string> OPS = {"+", "-", "*"};
static const std::vector<std::string> CMPS = {"<", ">", "==", "!=", "<=", ">="};

static const std::string& pick(const std::vector<std::string>& v, Rng& r) { return v[(size_t)r.below(v.size())]; }

static std::string code_line(Rng& r) {
    const char* t = TEMPLATES[r.below(std::size(TEMPLATES))];
    std::string out, last_var;
    for (; *t; t++) {
        switch (*t) {
            case 'V': last_var = pick(VARS, r); out += last_var; break;
            case 'U': out += last_var; break;
            case 'N': out += std::to_string(r.below(100)); break;
            case 'O': out += pick(OPS, r); break;
            case 'Q': out += pick(CMPS, r); break;
            case 'F': out += pick(FUNCS, r); break;
            case 'L': out += (char)('a' + r.below(26)); break;
            case 'S': {
                uint64_t n = 1 + r.below(4);
                for (uint64_t i = 0; i < n; i++) out += (i ? "," : "") + std::to_string(r.below(100));
                break;
            }
            default: out += *t;
        }
    }
    return out;
}

// How many distinct lines the templates can make: the product of each hole's
// choices, summed over templates. Different fillings give different text and
// no two templates share a line, so this is exact.
static double choices(char hole) {
    switch (hole) {
        case 'V': return (double)VARS.size();
        case 'N': return 100;
        case 'O': return (double)OPS.size();
        case 'Q': return (double)CMPS.size();
        case 'F': return (double)FUNCS.size();
        case 'L': return 26;
        case 'S': return 100 + 1e4 + 1e6 + 1e8;  // one to four numbers
        default: return 1;                       // U and plain characters
    }
}
static double code_capacity() {
    double total = 0;
    for (const char* t : TEMPLATES) {
        double n = 1;
        for (; *t; t++) n *= choices(*t);
        total += n;
    }
    return total;
}

// n distinct lines from make(), in the order first drawn. A repeat is simply
// drawn again: the callers make sure far more lines exist than are asked for.
static std::vector<std::string> distinct_lines(size_t n, Rng& r, std::string (*make)(Rng&)) {
    std::set<std::string> seen;
    std::vector<std::string> out;
    while (out.size() < n) {
        std::string s = make(r);
        if (seen.insert(s).second) out.push_back(s);
    }
    return out;
}

// ---------------------------------------------------------------------------
// The five files, in memory.

struct File {
    std::string name, text;
    size_t lines = 0, longest = 0;
};

static std::vector<File> make_files(const std::vector<std::string>& names, uint64_t seed) {
    // Each domain gets as many lines as there are names. Drawing skips
    // repeats, so it is quick only while most possible lines are still unused.
    size_t n = names.size();
    double arith_capacity = 1000 * 1000 + 1000 * 1001 / 2 + 100 * 100;  // +, - (a >= b), *
    if ((double)n * 10 > std::min(arith_capacity, code_capacity()))
        fail(std::to_string(n) + " names is too many: arithmetic and code lines would run short (at most " +
             std::to_string((size_t)arith_capacity / 10) + ")");
    Rng rng[3] = {make_rng(seed, STREAM_NAMES), make_rng(seed, STREAM_ARITH), make_rng(seed, STREAM_CODE)};
    std::vector<std::string> domains[3] = {names, distinct_lines(n, rng[1], arith_line),
                                           distinct_lines(n, rng[2], code_line)};

    // Each domain is shuffled, then split: 500 validation, 500 test, the rest
    // training. The names need the shuffle most: names.txt is sorted by
    // popularity, girls first, so its first 1,000 lines would be an odd test
    // set. The generated lines need it too: drawing skips repeats, so late
    // draws are not quite like early ones (fewer products, for one).
    std::vector<std::string> lines[5];  // train, test, names val, arith val, code val
    for (int d = 0; d < 3; d++) {
        const std::vector<std::string>& v = domains[d];
        shuffle(domains[d], rng[d]);
        lines[2 + d].assign(v.begin(), v.begin() + HELD_OUT);
        lines[1].insert(lines[1].end(), v.begin() + HELD_OUT, v.begin() + 2 * HELD_OUT);
        lines[0].insert(lines[0].end(), v.begin() + 2 * HELD_OUT, v.end());
    }
    Rng mix = make_rng(seed, STREAM_MIX);
    shuffle(lines[0], mix);
    shuffle(lines[1], mix);

    // Check what the header promises, whatever the templates become: every
    // line short, printable ASCII, and in exactly one place.
    const char* file_names[5] = {"domain_mix_train.txt", "domain_mix_test.txt", "domain_names_val.txt",
                                 "domain_arith_val.txt", "domain_code_val.txt"};
    std::vector<File> files(5);
    std::set<std::string> everywhere;
    for (int i = 0; i < 5; i++) {
        files[i].name = file_names[i];
        for (const std::string& line : lines[i]) {
            bool ok = !line.empty() && line.size() <= MAX_LINE && line.back() != ' ';
            for (unsigned char c : line) ok = ok && c >= ' ' && c <= '~';
            if (!ok) fail("internal error: generated line '" + line + "' is empty, too long or not plain ASCII");
            if (!everywhere.insert(line).second) fail("internal error: line '" + line + "' generated twice");
            files[i].text += line + "\n";
            files[i].lines++;
            files[i].longest = std::max(files[i].longest, line.size());
        }
    }
    return files;
}

// ---------------------------------------------------------------------------
// Writing: all five go to .tmp files first and are then renamed into place,
// so a crash leaves each file old or new, never half written (and --check
// would notice a mix of old and new).

static void write_files(const std::vector<File>& files, const fs::path& dir) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) fail("cannot create the output directory '" + dir.string() + "': " + ec.message());
    for (const File& f : files) {
        fs::path tmp = dir / (f.name + ".tmp");
        std::ofstream out(tmp, std::ios::binary);  // binary: "\n" stays "\n" on Windows
        out.write(f.text.data(), (std::streamsize)f.text.size());
        out.close();
        if (!out) {
            for (const File& g : files) fs::remove(dir / (g.name + ".tmp"), ec);
            fail("cannot write '" + tmp.string() + "': check the disk space and the directory's permissions");
        }
    }
    for (const File& f : files) {
        fs::rename(dir / (f.name + ".tmp"), dir / f.name, ec);
        if (ec) fail("cannot rename '" + f.name + ".tmp' into place in '" + dir.string() + "': " + ec.message());
        std::printf("%-40s %6zu lines %9zu bytes, longest line %zu\n", (dir / f.name).string().c_str(), f.lines,
                    f.text.size(), f.longest);
    }
}

// A line for a message, quoted, with invisible bytes (a "\r" above all) shown.
static std::string quote(const std::string& s) {
    std::string q = "'";
    for (unsigned char c : s) {
        char hex[8];
        std::snprintf(hex, sizeof hex, "\\x%02x", c);
        q += c == '\r' ? std::string("\\r") : c >= ' ' && c <= '~' ? std::string(1, (char)c) : std::string(hex);
    }
    return q + "'";
}

// Compares each file in dir with what the code makes now, and says where the
// first difference is; returns how many files differ.
static int check_files(const std::vector<File>& files, const fs::path& dir) {
    int bad = 0;
    for (const File& f : files) {
        std::string path = (dir / f.name).string();
        std::ifstream in(path, std::ios::binary);
        std::string have((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        if (in.is_open() && have == f.text) {
            std::printf("%s: ok (%zu lines)\n", path.c_str(), f.lines);
            continue;
        }
        bad++;
        if (!in.is_open()) {
            std::printf("%s: missing\n", path.c_str());
            continue;
        }
        std::istringstream want_s(f.text), have_s(have);
        std::string want_line, have_line;
        for (size_t number = 1;; number++) {
            bool w = (bool)std::getline(want_s, want_line), h = (bool)std::getline(have_s, have_line);
            if (w && h && want_line == have_line) continue;
            if (!w && !h) {  // the same lines, so the bytes differ at the very end
                std::printf("%s: the last line does not end in a newline\n", path.c_str());
                break;
            }
            std::printf("%s: line %zu differs: expected %s, found %s\n", path.c_str(), number,
                        w ? quote(want_line).c_str() : "end of file", h ? quote(have_line).c_str() : "end of file");
            break;
        }
    }
    if (bad)
        std::printf("%d file(s) differ from what data/domain_mix.cpp makes. If the change is intended, regenerate "
                    "them with `cmake --build build --target domain_data` and commit the result\n", bad);
    return bad;
}

int main(int argc, char** argv) {
    const char* usage =
        "usage: domain_mix [--seed N] NAMES_TXT OUT_DIR     write the five domain-mix files into OUT_DIR\n"
        "       domain_mix [--seed N] --check DIR NAMES_TXT compare DIR's files with what this code makes\n";
    try {
        uint64_t seed = DEFAULT_SEED;
        std::string check_dir;
        std::vector<std::string> args;
        for (int i = 1; i < argc; i++) {
            std::string a = argv[i];
            bool has_value = i + 1 < argc;
            if (a == "--seed" && has_value) {
                std::string v = argv[++i];
                errno = 0;
                seed = std::strtoull(v.c_str(), nullptr, 10);
                if (v.empty() || v.find_first_not_of("0123456789") != std::string::npos || errno == ERANGE)
                    fail("--seed wants a whole number from 0 to 2^64-1, not '" + v + "'");
            } else if (a == "--check" && has_value) {
                check_dir = argv[++i];
            } else if (a == "-h" || a == "--help") {
                std::printf("%s", usage);
                return 0;
            } else if (!a.empty() && a[0] == '-') {
                fail("unknown or incomplete option '" + a + "'\n" + usage);
            } else {
                args.push_back(a);
            }
        }
        if (args.size() != (check_dir.empty() ? 2u : 1u)) fail(std::string("wrong number of arguments\n") + usage);
        std::vector<File> files = make_files(read_names(args[0]), seed);
        if (!check_dir.empty()) return check_files(files, check_dir) ? 1 : 0;
        write_files(files, args[1]);
        return 0;
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
