"""Render the issue's clustering targets, cell by cell, as the markdown table README shows.

Reads a grid written by ``benchmarks/clustering.py`` (its ``verdicts`` are recomputed from the rows with the
script's own ``assess``), optionally an earlier grid for a "before" column, and prints the table and the counts.

Usage: .venv/bin/python benchmarks/targets_table.py benchmarks/results/clustering_targets.json [--before OLD.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from clustering import TARGETS, assess  # noqa: E402  (the grid's own definition of the targets)

COLUMNS = ("kvant auto", "faiss default", "faiss no-subsample")


def _entry(row):
    if row is None:
        return "—"
    if "seconds" not in row:
        return "skip"
    s = row["seconds"]
    t = f"{s:.3f} s" if s < 0.1 else f"{s:.2f} s"
    return f"{t} / {row['quality']:.5g}"


def _verdict(v, anchor, upper=True):
    if anchor not in v:
        return "—"
    a = v[anchor]
    word = ("**PASS**" if a["pass"] else "FAIL") if upper else ("pass" if a["pass"] else "fail")
    return f"{word} {a['speedup']:.2f}×, {a['quality_loss'] * 100:+.2f}%"


def render(res, before=None) -> list[str]:
    rows = res["rows"]
    verdicts = {tuple(v["cell"]): v for v in assess(rows)}
    old = {tuple(v["cell"]): v for v in assess(before["rows"])} if before else {}
    by_cell: dict = {}
    for r in rows:
        by_cell.setdefault((r["dataset"], r["n"], r["dim"], r["k"], r["metric"]), {})[r["method"]] = r
    measured = {r["method"] for r in rows}
    columns = [c for c in COLUMNS if c in measured]  # an anchor this grid did not run gets no columns
    targets = [t for t in TARGETS if t[0] in measured]
    names = {"kvant auto": "kvant auto", "faiss default": "FAISS default", "faiss no-subsample": "FAISS no-subsample"}
    head = (["cell"] + [names[c] for c in columns]
            + [f"auto vs {a.removeprefix('faiss ')} (≥{sp:g}×, ≤{tol * 100:g}%)" for a, sp, tol in targets]
            + (["before: vs default"] if before else []))
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, m in by_cell.items():
        ds, n, dim, k, metric = key
        cells = [f"{ds} {n}×{dim} K={k} {metric}"] + [_entry(m.get(c)) for c in columns]
        v = verdicts.get(key, {})
        cells += [_verdict(v, a) for a, _, _ in targets]
        if before:
            cells.append(_verdict(old.get(key, {}), "faiss default", upper=False))
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    for anchor, speed, tol in TARGETS:
        vs = [v[anchor] for v in verdicts.values() if anchor in v]
        if not vs:
            continue
        sp = [a["speedup"] for a in vs]
        out.append(f"- vs {anchor} (≥{speed:g}×, ≤{tol * 100:g}% worse): {sum(a['pass'] for a in vs)} of {len(vs)} "
                   f"cells pass; faster in {sum(s > 1 for s in sp)}, ≥{speed:g}× in {sum(s >= speed for s in sp)} "
                   f"(median {statistics.median(sp):.2f}×, range {min(sp):.2f}–{max(sp):.2f}×); quality within "
                   f"{tol * 100:g}% in {sum(a['quality_loss'] <= tol for a in vs)}, better in "
                   f"{sum(a['quality_loss'] < 0 for a in vs)} (median loss "
                   f"{statistics.median(a['quality_loss'] for a in vs) * 100:+.2f}%)")
        ov = [o[anchor] for o in old.values() if anchor in o]
        if ov:  # (the earlier grid may not have measured this anchor)
            out.append(f"  - before: {sum(a['pass'] for a in ov)} of {len(ov)} pass "
                       f"(median {statistics.median(a['speedup'] for a in ov):.2f}×)")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("grid")
    p.add_argument("--before", default=None)
    args = p.parse_args(argv)
    res = json.loads(Path(args.grid).read_text())
    before = json.loads(Path(args.before).read_text()) if args.before else None
    print("\n".join(render(res, before)))


if __name__ == "__main__":
    main()
