"""Compression benchmark: what ``prune`` and ``qat`` buy on resnet18 / resnet50 / densenet121.

For each backbone (random init, small inputs, CPU), measured side by side in one run:
- prune: conv weights to 50 % and 70 % and the study's adaptive per-layer targets (the schedule's
  final step applied at once: sizes do not depend on training), achieved sparsity, dense and
  zipped state-dict sizes and their ratio;
- qat: export → fake-quant (``qat_scope``) → a few training steps → int8 conversion → oneDNN
  lowering; fp32 vs int8 state-dict size, fp32 vs int8 size of the quantized weights, CPU latency
  fp32 vs int8, and agreement of int8 with fake-quant predictions.

    .venv/bin/python scripts/bench_compression.py [--archs resnet18 resnet50 densenet121]
        [--size 64] [--batch 8] [--qat-scope conv] [--steps 2] [--skip-qat]

Costs a few minutes on 2 CPU cores, most of it torchao's conversion (it traces ~100 Conv-BN
folding patterns per model).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch import nn
from torch.nn.utils import prune

from effbench.backbones import build_backbone
from effbench.compression import cpu_latency_ms, module_bytes, zipped_state_dict_bytes
from effbench.strategies.prune import ADAPTIVE_PRESETS, GradualPruning, layer_sparsity
from effbench.strategies.qat import (
    agreement,
    convert_int8,
    lower_x86,
    prepare_qat,
    quantized_weight_bytes,
)
from effbench.summary import state_dict_bytes

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
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    results: dict = {"size": args.size, "batch": args.batch, "threads": torch.get_num_threads(),
                     "qat_scope": args.qat_scope, "prune": {}, "qat": {}}
    print(f"inputs {args.size}px, batch {args.batch}, {torch.get_num_threads()} CPU threads")
    print(f"{'arch':12} {'prune':>8} {'layers':>6} {'sparsity':>8} {'of params':>9} "
          f"{'dense MB':>9} {'zip MB':>8} {'dense/zip':>9}")
    for arch in args.archs:
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
