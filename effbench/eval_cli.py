"""``effbench-eval RUN_DIR``: load the model a run saved and evaluate it on the run's test split.

Kept light like ``effbench``: torch loads only after the arguments are parsed, so ``--help``
answers at once. Bad input (no such folder, no saved model, a file whose sha256 does not match
the manifest) is one ``effbench-eval: error: …`` line and exit status 1.

RUN_DIR may come from anyone: its files are read as data and nothing they name is called
(``effbench.received``, docs/reliability.md "Received folders"); what they say reaches the
terminal with control characters escaped.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from effbench.errors import exit_with_one_line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="effbench-eval",
        description="Load the model a run saved (<RUN_DIR>/model/: manifest.json + safetensors) "
                    "and evaluate it on the run's test split, rebuilt from "
                    "<RUN_DIR>/resolved_config.yaml; prints its metrics next to the ones the run "
                    "recorded. In Python: from effbench.model.saved import load; "
                    "model = load(RUN_DIR); logits = model(uint8_images).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a completed run's folder (or its model/)")
    p.add_argument("--data-root", metavar="DIR", default=None,
                   help="where the run's images are, when not at the dataset.root the run used "
                        "(a relative root is taken from the folder the run was started in)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (metrics, recorded, model) instead of the table")
    return p


def table(result: dict[str, Any], manifest: dict[str, Any], where: str) -> str:
    from effbench.received import printable  # strings from the manifest: no terminal escapes

    made = manifest.get("produced_by")  # "default": no technique chose another form
    made = "backbone + head as trained" if made == "default" else f"the form {made} keeps"
    lines = [printable(f"effbench-eval: {where} ({manifest['kind']}: {made}, strategy="
                       f"{','.join(manifest.get('techniques', []))}), {result['images']} test "
                       f"images of {result['dataset']}"),
             f"  {'metric':<24}{'now':>10}{'run':>10}{'diff':>11}"]
    for name, value in result["metrics"].items():
        run = result["recorded"].get(name)
        diff = f"{value - run:+.2e}" if run is not None else "n/a"
        run_text = f"{run:.6f}" if run is not None else "n/a"
        lines.append(f"  {printable(name):<24}{value:>10.6f}{run_text:>10}{diff:>11}")
    preds = result.get("predictions") or {}
    lines.append(f"  predictions: {printable(preds['error'])}" if "error" in preds else
                 f"  predictions: max |Δ probability| {preds['max_abs_prob_diff']:.2e} vs the "
                 f"run's predictions.npz ({preds['array']}, {preds['rows']} rows)")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from effbench.model.saved import evaluate, load  # torch, after --help

    model = load(args.run_dir)
    result = evaluate(model, data_root=args.data_root)
    if args.json:
        print(json.dumps({**result, "model": str(model.model_dir),
                          "kind": model.manifest["kind"]}))
    else:
        print(table(result, model.manifest, str(model.model_dir)))
    return 0


def main(argv: list[str] | None = None) -> None:
    exit_with_one_line("effbench-eval", run, argv, 1)


if __name__ == "__main__":
    main()
