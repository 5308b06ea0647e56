"""The short human summary printed at the end of a run."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from effbench.task import is_multilabel


def _fmt(v: Any, spec: str = ".4f") -> str:
    return "n/a" if v is None else format(v, spec)


def _energy_note(e: dict[str, Any]) -> str:
    """Says how the energy figure was obtained: an estimate from TDP restates time."""
    modes = e.get("mode") or {}
    if not modes:
        return ""
    parts = ", ".join(f"{k} {v}" for k, v in modes.items() if v)
    return f" ({'ESTIMATED' if e.get('estimated') else 'measured'}: {parts})"


def print_report(s: dict[str, Any], stream: Any = None) -> None:
    out = stream or sys.stdout
    c = s["choices"]
    what = f"{c['strategy']} / {c['backbone']} / {c['dataset']} (seed {c['seed']})"
    if s["status"] != "completed":
        print(f"effbench: error: {s['error']}", file=sys.stderr)
        print(f"effbench: {what} failed; details in {s['run_dir']}/summary.json", file=out)
        return
    m, t, e = s["metrics"], s["time_s"], s["energy"]
    headline = "auroc_macro" if is_multilabel(s["data"].get("task")) else "acc"
    phases = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "total")
    lines = [
        f"effbench: {what} completed in {t['total']:.1f} s",
        f"  test {headline} {_fmt(m.get('test/' + headline))}   f1_macro "
        f"{_fmt(m.get('test/f1_macro'))}   auroc_macro {_fmt(m.get('test/auroc_macro'))}",
        f"  time s: {phases}   throughput {_fmt(s['throughput_img_s'], '.0f')} img/s   "
        f"epochs {s['epochs']}",
        f"  energy {_fmt(e.get('kwh'), '.3g')} kWh   CO2 {_fmt(e.get('co2_kg'), '.3g')} kg"
        f"{_energy_note(e)}   params {s['model']['params_total']:,} "
        f"({s['model']['params_trainable']:,} trainable)",
    ]
    if s.get("headline"):
        lines.append(f"  {s['headline']}")
    obj = s.get("objective") or {}
    if obj.get("metric"):
        lines.append(f"  objective {obj['metric']} = {_fmt(obj.get('value'))}")
    lines.append(f"  outputs: {s['run_dir']} (summary.json, csv/metrics.csv, tb/)")
    saved = s["model"].get("saved")
    if saved:
        lines.append(_saved_line(saved))
    print("\n".join(lines), file=out)


def _saved_line(saved: dict[str, Any]) -> str:
    """Where the kept model is and how to evaluate it (or why there is none)."""
    if saved.get("error"):
        return f"  model NOT saved: {saved['error']}"
    form = saved.get("kind", "?") + (", sparse: pruned" if saved.get("sparse") else "")
    return (f"  model: {saved['path']} ({form}, {saved.get('bytes', 0) / 2**20:.2f} MB)   "
            f"evaluate: effbench-eval {Path(saved['path']).parent}")
