#!/usr/bin/env python3
"""Opens a Tsunagi research extract with a second engine (DuckDB).

Usage: second_engine.py DATASET_DIR
Checks every table of manifest.json: the file opens, the row count and the
column names and types match the manifest; prints one JSON line with an
aggregate per table. Exit 2 when DuckDB is missing (install: pip install duckdb).
"""
import json
import os
import sys

try:
    import duckdb
except ImportError:
    print("duckdb is not installed: run `pip install duckdb`", file=sys.stderr)
    sys.exit(2)

TYPES = {"text": "VARCHAR", "date": "DATE", "number": "DOUBLE", "boolean": "BOOLEAN"}


def main(d):
    manifest = json.load(open(os.path.join(d, "manifest.json"), encoding="utf-8"))
    con = duckdb.connect()
    out = {"engine": "duckdb " + duckdb.__version__, "tables": {}}
    for t in manifest["tables"]:
        path = os.path.join(d, t["file"])
        n = con.execute("SELECT count(*) FROM read_parquet(?)", [path]).fetchone()[0]
        if n != t["rows"]:
            raise SystemExit(f"{t['name']}: {n} rows, manifest says {t['rows']}")
        cols = con.execute("DESCRIBE SELECT * FROM read_parquet(?)", [path]).fetchall()
        got = [(c[0], c[1]) for c in cols]
        want = [(c["name"], TYPES[c["type"]]) for c in t["columns"]]
        if got != want:
            raise SystemExit(f"{t['name']}: columns {got} != manifest {want}")
        persons = con.execute("SELECT count(DISTINCT pid) FROM read_parquet(?)", [path]).fetchone()[0]
        out["tables"][t["name"]] = {"rows": n, "persons": persons}
    obs = os.path.join(d, "observation.parquet")
    out["avg_by_code"] = {
        code: round(avg, 3)
        for code, avg in con.execute(
            "SELECT code, avg(value_num) FROM read_parquet(?) GROUP BY code ORDER BY code", [obs]
        ).fetchall()
    }
    print(json.dumps(out, ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
