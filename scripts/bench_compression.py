"""Compression benchmark: what ``prune`` and ``qat`` buy on resnet18 / resnet50 / densenet121.

First, what each prune structure buys in CPU latency (``--structured-arch``, default resnet18, at
``--structured-size`` 224 px, batches ``--structured-batches`` 1 4 16): the dense model, the same
with 50 % of its conv weights zeroed (unstructured: masks made permanent) and with 50 % of its conv
output channels removed (``structure=channel``, torch-pruning), timed side by side, with
parameters and MACs.

Then, for each backbone (random init, small inputs, CPU), measured side by side in one run:
- prune: conv weights to 50 % and 70 % and the study's adaptive per-layer targets (the schedule's
  final step applied at once: sizes do not depend on training), achieved sparsity, dense and
  zipped state-dict sizes and their ratio;
- qat: export → fake-quant (``qat_scope``) → a few training steps → int8 conversion → oneDNN
  lowering; fp32 vs int8 state-dict size, fp32 vs int8 size of the quantized weights, CPU latency
  fp32 vs int8, and agreement of int8 with fake-quant predictions.

    .venv/bin/python scripts/bench_compression.py [--archs resnet18 resnet50 densenet121]
        [--size 64] [--batch 8] [--qat-scope conv] [--steps 2] [--skip-qat] [--skip-sizes]
        [--structured-arch resnet18] [--structured-size 224] [--structured-batches 1 4 16]
        [--sparsity 0.5] [--skip-structured]

The last line printed is one JSON object of headline figures (speed-ups: dense ms / pruned ms).

Costs a few minutes on 2 CPU cores, most of it torchao's conversion (it traces ~100 Conv-BN
folding patterns per model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import prune

from effbench.backbones import build_backbone
from effbench.model import cpu_latency_ms, module_bytes, zipped_state_dict_bytes
from effbench.summary import state_dict_bytes
from effbench.techniques.prune.channel import build_channel_pruner, count_macs
from effbench.techniques.prune.technique import ADAPTIVE_PRESETS, GradualPruning, layer_sparsity
from effbench.techniques.qat.technique import (
    agreement,
    convert_int8,
    lower_x86,
    prepare_qat,
    quantized_weight_bytes,
)

NUM_LABELS = 14  # ChestX-ray14


def build(arch: str, size: int) -> nn.Sequential:
    backbone = build_backbone(arch, weights=None, image_size=size)
    return nn.Sequential(backbone, nn.Linear(backbone.feature_dim, NUM_LABELS))


def prune_once(arch: str, size: int, variant: str) -> dict:
    model = build(arch, size)
    convs = {n: m for n, m in model[0].named_modules() if isinstance(m, nn.Conv2d)}
    if variant == "adaptive":
        preset = next(p for p in ADAPTIVE_PRESETS if p in arch)
        targets = {n: ADAPTIVE_PRESETS[preset][m.out_channels] for n, m in convs.items()
                   if m.out_channels in ADAPTIVE_PRESETS[preset]}
    else:
        targets = dict.fromkeys(convs, float(variant))
    for n in targets:
        prune.identity(convs[n], "weight")
    pruner = GradualPruning({n: convs[n] for n in targets}, targets, 0.1, 4.0, 0, 1, "step", 1,
                            "layer")
    pruner.resolve(1)
    pruner.apply(pruner.end_step)
    for n in targets:
        prune.remove(convs[n], "weight")
    sizes = {n: convs[n].weight.numel() for n in targets}
    sparsity = sum(layer_sparsity(convs[n]) * sizes[n] for n in sizes) / sum(sizes.values())
    params = list(model.parameters())
    dense, zipped = state_dict_bytes(model), zipped_state_dict_bytes(model)
    return {"variant": variant, "layers": len(targets), "sparsity_pruned": sparsity,
            "sparsity_params": sum(int((p == 0).sum()) for p in params)
            / sum(p.numel() for p in params),
            "dense_mb": dense / 2**20, "zipped_mb": zipped / 2**20, "ratio": dense / zipped}


def zeroed(model: nn.Sequential, sparsity: float) -> nn.Sequential:
    """Unstructured: the smallest ``sparsity`` of each conv's weights set to zero for good."""
    for m in model[0].modules():
        if isinstance(m, nn.Conv2d):
            prune.l1_unstructured(m, "weight", amount=sparsity)
            prune.remove(m, "weight")
    return model


def channel_pruned(model: nn.Sequential, sparsity: float, x: torch.Tensor) -> nn.Sequential:
    """structure=channel: ``sparsity`` of every conv group's output channels removed at once
    (what the schedule reaches at its end), the head left whole."""
    pruner = build_channel_pruner(model, x[:1], [model[1]], sparsity,
                                  lambda call, final: final if call else 0.0, False)
    pruner.step()
    return model


def structured_once(arch: str, size: int, batches: list[int], sparsity: float,
                    rounds_n: int = 3, min_run_time: float = 0.5) -> dict:
    torch.manual_seed(0)
    x = torch.randn(max(batches), 3, size, size)
    models = {"dense": build(arch, size), "unstructured": zeroed(build(arch, size), sparsity),
              "channel": channel_pruned(build(arch, size), sparsity, x)}
    out: dict = {"params": {}, "macs": {}, "ms": {}}
    for name, model in models.items():
        model.eval()
        out["params"][name] = sum(p.numel() for p in model.parameters())
        out["macs"][name] = count_macs(model, x[:1])
    # Rounds of the three models in turn, speed-ups paired within a round: a burst of load on a
    # shared machine hits one round of all three, not one model's whole measurement.
    rounds: list[dict[str, dict[int, float]]] = []
    for _ in range(rounds_n):
        rounds.append({name: {b: cpu_latency_ms(model, x[:b].contiguous(), min_run_time)
                              for b in batches} for name, model in models.items()})
    out["ms"] = {name: {b: statistics.median(r[name][b] for r in rounds) for b in batches}
                 for name in models}
    out["speedup"] = {name: {b: statistics.median(r["dense"][b] / r[name][b] for r in rounds)
                             for b in batches} for name in ("unstructured", "channel")}
    return out


def qat_once(arch: str, size: int, batch: int, scope: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = build(arch, size)
    reference = build(arch, size).eval()
    x = torch.randn(batch, 3, size, size)
    t0 = time.perf_counter()
    prepared = prepare_qat(model, x, scope)
    t_prepare = time.perf_counter() - t0
    opt = torch.optim.Adam(prepared.parameters(), 1e-3)
    y = (torch.rand(batch, NUM_LABELS) < 0.3).float()
    for _ in range(steps):  # training in the loop: observers and BN statistics move
        loss = nn.functional.binary_cross_entropy_with_logits(prepared(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    prepared.eval()
    t0 = time.perf_counter()
    converted = convert_int8(prepared)
    t_convert = time.perf_counter() - t0
    t0 = time.perf_counter()
    lowered = lower_x86(converted, x)
    t_lower = time.perf_counter() - t0
    probe = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        agree = agreement(prepared(probe), lowered(probe), "multilabel")
    fp32_ms, int8_ms = cpu_latency_ms(reference, x), cpu_latency_ms(lowered, x)
    q_fp32 = quantized_weight_bytes(reference, scope)
    q_int8 = module_bytes(converted).get("int8", 0)
    return {"fp32_mb": state_dict_bytes(reference) / 2**20,
            "int8_mb": state_dict_bytes(converted) / 2**20,
            "qweights_ratio": q_fp32 / q_int8, "agreement": agree,
            "fp32_ms": fp32_ms, "int8_ms": int8_ms, "speedup": fp32_ms / int8_ms,
            "prepare_s": t_prepare, "convert_s": t_convert, "lower_s": t_lower}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "densenet121"])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--qat-scope", default="conv", choices=["conv", "all"])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--skip-qat", action="store_true")
    ap.add_argument("--skip-sizes", action="store_true", help="skip the unstructured size table")
    ap.add_argument("--structured-arch", default="resnet18")
    ap.add_argument("--structured-size", type=int, default=224)
    ap.add_argument("--structured-batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--skip-structured", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    results: dict = {"size": args.size, "batch": args.batch, "threads": torch.get_num_threads(),
                     "qat_scope": args.qat_scope, "prune": {}, "qat": {}, "structured": {}}
    headline: dict = {"threads": torch.get_num_threads()}
    if not args.skip_structured:
        arch, batches = args.structured_arch, args.structured_batches
        r = structured_once(arch, args.structured_size, batches, args.sparsity)
        results["structured"] = r
        print(f"{arch} at {args.structured_size}px, {args.sparsity:.0%} sparsity, "
              f"{torch.get_num_threads()} CPU threads (median ms of single calls over 3 rounds; "
              "x = dense / this, paired per round)")
        print(f"{'prune':13} {'params':>11} {'MMACs':>8} "
              + " ".join(f"{'b' + str(b) + ' ms':>9} {'x':>5}" for b in batches))
        for name in ("dense", "unstructured", "channel"):
            x = r["speedup"].get(name, dict.fromkeys(batches, 1.0))
            cells = " ".join(f"{r['ms'][name][b]:9.1f} {x[b]:5.2f}" for b in batches)
            print(f"{name:13} {r['params'][name]:11,d} {r['macs'][name] / 1e6:8.1f} {cells}",
                  flush=True)
        headline.update({
            "arch": arch, "size": args.structured_size, "sparsity": args.sparsity,
            "structured_speedup": {str(b): round(v, 3) for b, v in r["speedup"]["channel"].items()},
            "unstructured_speedup": {str(b): round(v, 3)
                                     for b, v in r["speedup"]["unstructured"].items()},
            "structured_speedup_min": round(min(r["speedup"]["channel"].values()), 3),
            "params_ratio": round(r["params"]["dense"] / r["params"]["channel"], 3),
            "macs_ratio": round(r["macs"]["dense"] / r["macs"]["channel"], 3)})
    if not (args.skip_sizes and args.skip_qat):
        print(f"\ninputs {args.size}px, batch {args.batch}, {torch.get_num_threads()} CPU "
              "threads")
    if not args.skip_sizes:
        print(f"{'arch':12} {'prune':>8} {'layers':>6} {'sparsity':>8} {'of params':>9} "
              f"{'dense MB':>9} {'zip MB':>8} {'dense/zip':>9}")
    for arch in [] if args.skip_sizes else args.archs:
        rows = [prune_once(arch, args.size, v) for v in ("0.5", "0.7", "adaptive")]
        results["prune"][arch] = rows
        for r in rows:
            print(f"{arch:12} {r['variant']:>8} {r['layers']:6d} {r['sparsity_pruned']:8.3f} "
                  f"{r['sparsity_params']:9.3f} {r['dense_mb']:9.2f} {r['zipped_mb']:8.2f} "
                  f"{r['ratio']:9.2f}")
    if not args.skip_qat:
        print(f"\n{'arch':12} {'fp32 MB':>8} {'int8 MB':>8} {'qW x':>5} {'agree':>6} "
              f"{'fp32 ms':>8} {'int8 ms':>8} {'speedup':>7} {'convert s':>9}")
        for arch in args.archs:
            r = qat_once(arch, args.size, args.batch, args.qat_scope, args.steps)
            results["qat"][arch] = r
            print(f"{arch:12} {r['fp32_mb']:8.2f} {r['int8_mb']:8.2f} {r['qweights_ratio']:5.2f} "
                  f"{r['agreement']:6.2f} {r['fp32_ms']:8.1f} {r['int8_ms']:8.1f} "
                  f"{r['speedup']:7.2f} {r['convert_s'] + r['lower_s']:9.1f}", flush=True)
        headline["qat_int8_speedup"] = {a: round(r["speedup"], 3)
                                        for a, r in results["qat"].items()}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
