"""Before / after: the same bench_step comparison run on two (or more) checkouts of the code, interleaved.

    python benchmarks/bench_commits.py --code before=/path/to/old/checkout/code --code after=. --rounds 3 \\
        --json ../results/step_before_after.json -- --compare sup mt uamt --steps 3 --warmup 1 --threads 1

Everything after ``--`` is passed to each checkout's own ``benchmarks/bench_step.py`` (run with this Python, from
that checkout's ``code/`` folder, so each times its own code on the same interpreter, torch and data). Rounds
alternate the order of the checkouts (A B, B A, ...), so a slow drift of the machine's load is shared. Per
configuration and checkout the statistic is the median over rounds of bench_step's per-round median step time,
wall-clock and CPU time; the table gives each checkout's time relative to the first ``--code``. On a machine
shared with other work prefer the CPU-time ratio and ``--threads 1``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import common as C  # noqa: E402
from utils.report import markdown_table  # noqa: E402
from utils.runtime import machine_info  # noqa: E402


def parse_args(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    bench_args = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--code", action="append", required=True, metavar="NAME=DIR",
                   help="a checkout's code/ folder (holding benchmarks/bench_step.py); give it twice or more")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per bench_step run")
    C.add_json_arg(p)
    args = p.parse_args(own)
    codes = []
    for item in args.code:
        name, sep, folder = item.partition("=")
        if not sep or not name or not (Path(folder) / "benchmarks" / "bench_step.py").is_file():
            raise C.BenchmarkError(f"--code {item!r}: expected NAME=DIR with DIR/benchmarks/bench_step.py")
        codes.append((name, Path(folder).resolve()))
    if len(codes) < 2 or len({n for n, _ in codes}) != len(codes):
        raise C.BenchmarkError("give at least two --code entries with different names")
    if args.rounds < 1:
        raise C.BenchmarkError(f"--rounds must be >= 1, got {args.rounds}")
    return args, codes, bench_args


def commit_of(folder: Path) -> str:
    try:
        return subprocess.run(["git", "-C", str(folder), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_bench(folder: Path, bench_args: list, out: Path, timeout) -> dict:
    """One bench_step run of the checkout ``folder`` -> its JSON payload."""
    cmd = [sys.executable, "benchmarks/bench_step.py", *bench_args, "--json", str(out)]
    proc = subprocess.run(cmd, cwd=folder, timeout=timeout, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench_step in {folder} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def combine(runs: dict, codes: list) -> list[dict]:
    """Per configuration label: per checkout the median over rounds of the per-round step medians."""
    first = codes[0][0]
    labels = [r["label"] for r in runs[first][0]["results"]]
    rows = []
    for label in labels:
        row = {"label": label}
        for name, _ in codes:
            per_round = [next(r for r in payload["results"] if r["label"] == label) for payload in runs[name]]
            row[name] = {"wall": statistics.median(r["step"]["median"] for r in per_round),
                         "cpu": statistics.median(r["cpu_step"]["median"] for r in per_round),
                         "rounds_wall": [r["step"]["median"] for r in per_round]}
        for name, _ in codes[1:]:
            row[f"{name}/{first}"] = {k: row[name][k] / row[first][k] for k in ("wall", "cpu")}
        rows.append(row)
    return rows


def main(argv=None) -> dict:
    args, codes, bench_args = parse_args(argv)
    runs = {name: [] for name, _ in codes}
    with tempfile.TemporaryDirectory(prefix="bench_commits_") as tmp:
        for rnd in range(args.rounds):
            order = codes if rnd % 2 == 0 else codes[::-1]
            for name, folder in order:
                print(f"[round {rnd + 1}/{args.rounds}] {name} ({folder}) ...", file=sys.stderr, flush=True)
                runs[name].append(run_bench(folder, bench_args, Path(tmp) / f"{name}_{rnd}.json", args.timeout))
    rows = combine(runs, codes)
    first = codes[0][0]
    header = ["configuration"] + [f"{n} step (wall / CPU)" for n, _ in codes] + \
             [f"{n} / {first} (wall / CPU)" for n, _ in codes[1:]]
    table = [[r["label"]] + [f"{C.fmt_seconds(r[n]['wall'])} / {C.fmt_seconds(r[n]['cpu'])}" for n, _ in codes]
             + [f"{r[f'{n}/{first}']['wall']:.3f} / {r[f'{n}/{first}']['cpu']:.3f}" for n, _ in codes[1:]]
             for r in rows]
    print(markdown_table(header, table))
    payload = {"benchmark": "train_step_before_after", "bench_step_args": bench_args, "rounds": args.rounds,
               "codes": {n: {"folder": str(f), "commit": commit_of(f)} for n, f in codes},
               "machine": machine_info(), "rows": rows, "raw": runs}
    C.write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
