"""Every CPU figure of the README from one command: start-up (``--help``, ``--cfg job``), the first
run a newcomer makes (the default experiment, whole process), Lightning's overhead against a
plain loop (first, while the machine is quietest; in wall and in CPU time), the cached-feature
sweep against fine-tuning, and each dataset format's data paths. Each benchmark runs as its own
process, one after the other; its last line (one JSON object) is collected.

    .venv/bin/python scripts/bench_all.py            # about 10 minutes on a quiet 2-core CPU
    .venv/bin/python scripts/bench_all.py --quick    # fewer repeats and epochs (a smoke run)

Prints one table (measure, figure, goal) and ends with one JSON line of the headline figures,
with the load average at the start and the end: take figures only on a quiet machine (< 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _timed(cmd: list[str], cwd: Path, repeats: int) -> float:
    """Median wall time of a whole process (start-up included), in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _last_json(cmd: list[str]) -> dict:
    """Runs a benchmark script; its progress shows as it goes, its last line is the figures."""
    proc = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    print(proc.stdout, end="", flush=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _first_run(tmp: Path) -> dict:
    """``effbench`` with no argument, the quickstart's command: whole process, and its accuracy
    and phase times from the summary it wrote."""
    start = time.perf_counter()
    subprocess.run([str(BIN / "effbench"), "trainer.enable_progress_bar=false"], cwd=tmp,
                   check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    [path] = (tmp / "outputs").rglob("summary.json")
    summary = json.loads(path.read_text())
    return {"first_run_s": round(wall, 2), "first_run_acc": summary["metrics"].get("test/acc"),
            "first_run_phases_s": {k: round(v, 2) for k, v in summary["time_s"].items()},
            "first_run_epochs": summary["epochs"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and epochs")
    args = p.parse_args()
    load_start = os.getloadavg()[0]
    repeats = 1 if args.quick else 3
    figures: dict = {}
    py = sys.executable
    # First, while the machine is as quiet as it will be: the other benchmarks leave load behind
    # (1.8 after the sweep), which stretched this one's wall minima by +15 %. Five repeats: on a
    # shared VM one method's repeats spread ±15 %, three say little.
    overhead = _last_json([py, "scripts/bench_overhead.py", "--epochs", "2" if args.quick else "5",
                           "--repeats", "1" if args.quick else "5"])
    with tempfile.TemporaryDirectory() as tmp:
        cli = [str(BIN / "effbench")]
        figures["help_s"] = round(_timed([*cli, "--help"], Path(tmp), repeats), 2)
        figures["cfg_job_s"] = round(_timed([*cli, "--cfg", "job"], Path(tmp), repeats), 2)
        figures.update(_first_run(Path(tmp)))
    sweep = _last_json([py, "scripts/bench_precomputed.py", *(
        ["--epochs", "3", "--k", "3", "--sweep-epochs", "3"] if args.quick else [])])
    paths = _last_json([py, "scripts/bench_data_paths.py", *(
        ["--images", "48", "--min-time", "0.3"] if args.quick else [])])["paths"]
    figures["data_paths_img_s"] = {
        name: {path: fig["img_s"] for path, fig in found.items() if "img_s" in fig}
        for name, found in paths.items()}
    figures.update({"overhead_pct": overhead["overhead_pct"],
                    "overhead_min_pct": overhead["overhead_min_pct"],
                    "overhead_paired_pct": overhead["overhead_paired_pct"],
                    "overhead_as_run_pct": overhead["overhead_as_run_pct"],
                    "overhead_cpu_pct": overhead["overhead_cpu_pct"],
                    "overhead_cpu_min_pct": overhead["overhead_cpu_min_pct"],
                    "overhead_threads": overhead["threads"],
                    "sweep_speedup": sweep["sweep_speedup"],
                    "sweep_speedup_whole": sweep["sweep_speedup_whole"],
                    "batched_speedup": sweep["batched_speedup"],
                    "precomputed_time_reduction_pct": sweep["time_reduction_pct"]})
    from effbench.summary import cpu_model  # the model name a run's summary records

    figures["cpu"] = cpu_model() or platform.machine()
    figures["load_avg_start"] = round(load_start, 2)
    figures["load_avg_end"] = round(os.getloadavg()[0], 2)
    rows = [("effbench --help, whole process", f"{figures['help_s']:.2f} s", "<= 1 s"),
            ("effbench --cfg job, whole process", f"{figures['cfg_job_s']:.2f} s", ""),
            ("default run (effbench), whole process", f"{figures['first_run_s']:.1f} s, test acc "
             f"{figures['first_run_acc']:.4f}", "<= 10 s, acc >= 0.95"),
            ("Lightning vs plain loop (training)", f"{figures['overhead_pct']:+.1f} % of the "
             f"medians, {figures['overhead_min_pct']:+.1f} % of the minima (per repeat "
             f"{figures['overhead_paired_pct'][0]:+.1f} … {figures['overhead_paired_pct'][1]:+.1f}"
             " %)", "<= 5 %"),
            (f"  in CPU time ({figures['overhead_threads']} threads)",
             f"{figures['overhead_cpu_pct']:+.1f} % of the medians, "
             f"{figures['overhead_cpu_min_pct']:+.1f} % of the minima", "<= 5 %"),
            ("  as a run (checkpoints, loggers)", f"{figures['overhead_as_run_pct']:+.1f} %", ""),
            ("cached-feature sweep vs fine-tuning", f"{figures['sweep_speedup']:.1f}x", ">= 50x"),
            ("  whole `effbench -m` processes", f"{figures['sweep_speedup_whole']:.1f}x", ""),
            ("  batched heads vs sequential hits", f"{figures['batched_speedup']:.2f}x", "")]
    for name, rates in figures["data_paths_img_s"].items():
        if "cached_ram" in rates:  # a file format: decoded per image vs the pre-resized cache
            rows.append((f"data path {name}, img/s at 224 px", f"{rates['streamed_0w']:.0f} "
                         f"streamed, {rates['cached_ram']:.0f} cached "
                         f"({rates['cached_ram'] / rates['streamed_0w']:.1f}x)", ""))
        else:
            rows.append((f"data path {name}, img/s at 224 px",
                         f"{rates['resident']:.0f} resident", ""))
    print(f"\n{date.today()}  {figures['cpu']}, {os.cpu_count()} "
          f"cores, load average {load_start:.2f} at the start, {figures['load_avg_end']:.2f} at "
          "the end (its own jobs)" + ("" if load_start < 1 else "  (NOT a quiet machine)"))
    width = max(len(r[0]) for r in rows)
    for name, value, goal in rows:
        print(f"  {name:<{width}}  {value:<28} {goal}")
    print(f"  phases of the default run (s): {figures['first_run_phases_s']}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
