"""Equivalence on the training curve: the same run with each kernel path, curves in one PNG.

    python bench/train_curves.py --out runs/curves                       # micro_gpt_4, seq 1024
    python bench/train_curves.py --kernels reference,pallas --max-steps 300 --out runs/curves
    python bench/train_curves.py --preset gpt2_small --model-d 768 --heads 12 --vocab 50257 \
        --batch-size 16 --out runs/curves_gpt2

Each path trains with the same seed, data and config through `microgpt.train.train` (the real job);
the per-step training losses and the validation losses are compared against the first path
(reference by default): the largest relative per-step difference and the final validation loss
ratio are printed, written to curves.json, and the curves drawn into curves.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import add_full_arg, device_description, format_table, smoke_size
from microgpt import files
from microgpt.gpt import KERNELS
from microgpt.train import TrainConfig, train


def compare(cfg: TrainConfig, kernels: list[str], out: Path) -> dict:
    """Train `cfg` once per kernel path into out/<kernels>; -> the summary written to curves.json."""
    results = {k: train(dataclasses.replace(cfg, kernels=k), out=str(out / k), sample=False)
               for k in kernels}
    base = results[kernels[0]]
    summary = {"config": dataclasses.asdict(cfg), "device": device_description(), "paths": {}}
    for k, r in results.items():
        steps = sorted(set(r.losses) & set(base.losses))
        rel = [abs(r.losses[s] - base.losses[s]) / abs(base.losses[s]) for s in steps]
        last_val = max(r.val_losses)
        summary["paths"][k] = {
            "losses": r.losses, "val_losses": r.val_losses, "stopped": r.stopped,
            "max_rel_step_diff": max(rel) if rel else None,
            "final_val_loss": r.val_losses[last_val],
            "final_val_ratio": r.val_losses[last_val] / base.val_losses[last_val]}
    files.write_text(out / "curves.json", json.dumps(summary, indent=1) + "\n")
    plot(summary, out / "curves.png")
    return summary


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, p in summary["paths"].items():
        steps = sorted(p["losses"])
        ax.plot(steps, [p["losses"][s] for s in steps], label=f"{k} train", lw=1)
        val_steps = sorted(p["val_losses"])
        ax.plot(val_steps, [p["val_losses"][s] for s in val_steps], "o--", label=f"{k} val")
    cfg = summary["config"]
    ax.set(xlabel="step", ylabel="loss",
           title=f"{cfg['preset']} d={cfg['model_d']} seq={cfg['seq_len']} batch={cfg['batch_size']}"
                 f" — {summary['device']}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with files.replaced_on_success(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kernels", default="reference,pallas", help="paths; the first is the baseline")
    p.add_argument("--preset", default="micro_gpt_4")
    p.add_argument("--model-d", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=9000, help="the BPE's size (fewer if the corpus is small)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-steps", type=int, default=300)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--data", help="corpus (default: the embedded Shakespeare)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the runs, curves.json and curves.png")
    add_full_arg(p)
    args = p.parse_args(argv)
    if smoke_size(args.full):   # micro_gpt_1 at width 128, 64 tokens, batch 8, 20 steps
        args.preset, args.model_d, args.heads = "micro_gpt_1", min(args.model_d, 128), 2
        args.seq_len, args.batch_size = min(args.seq_len, 64), min(args.batch_size, 8)
        args.max_steps, args.eval_every = min(args.max_steps, 20), min(args.eval_every, 10)
    kernels = args.kernels.split(",")
    if unknown := sorted(set(kernels) - set(KERNELS)):
        p.error(f"unknown --kernels {unknown}; choose from {KERNELS}")
    cfg = TrainConfig(preset=args.preset, model_d=args.model_d, heads=args.heads,
                      vocab=args.vocab, seq_len=args.seq_len, batch_size=args.batch_size, max_steps=args.max_steps,
                      eval_every=args.eval_every, data=args.data, seed=args.seed)
    summary = compare(cfg, kernels, Path(args.out))
    rows = [{"kernels": k, "max_rel": v["max_rel_step_diff"], "val": v["final_val_loss"],
             "ratio": v["final_val_ratio"]} for k, v in summary["paths"].items()]
    print(format_table(rows, [("kernels", "kernels", "s"), ("max_rel", "max |Δloss|/loss", ".2e"),
                              ("val", "final val loss", ".4f"), ("ratio", "÷ baseline", ".4f")]))
    print(f"curves: {Path(args.out) / 'curves.png'}")
    return summary


if __name__ == "__main__":
    main()
