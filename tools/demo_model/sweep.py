"""Run train_demo_model.py over several configurations at once, for the
architecture sweep of issue #5 (written down in experiments.md).

Each configuration gets the number of steps that fits its measured ~50 min
on 2 CPU cores (steps = 3000 s / its CPU seconds per 32 x 512 step), so that
the sweep compares what the CPU budget allows even when it runs on a GPU.
  python tools/demo_model/sweep.py --data DIR --out DIR [--device cuda] [--jobs N]
Writes DIR/<name>/{model,log}, DIR/<name>.json and DIR/sweep.json."""
import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# name: (vocab, hidden, layers, CPU seconds per 32x512 step measured on 2 cores, extra args)
CONFIGS = {
    "v4096_h128_l6": (4096, 128, 6, 2.0, []),
    "v4096_h128_l8": (4096, 128, 8, 3.0, []),
    "v4096_h160_l4": (4096, 160, 4, 2.0, []),
    "v3072_h160_l5": (3072, 160, 5, 2.2, []),
    "v2048_h128_l10": (2048, 128, 10, 3.0, []),
    "v2048_h144_l8": (2048, 144, 8, 2.8, []),
    "v2048_h160_l6": (2048, 160, 6, 2.35, []),
    "v2048_h192_l4": (2048, 192, 4, 1.9, []),
    "v2048_h160_l6_lr1.5e-3": (2048, 160, 6, 2.35, ["--lr", "1.5e-3"]),
    "v2048_h160_l6_wd0.3": (2048, 160, 6, 2.35, ["--weight-decay", "0.3"]),
    "v2048_h160_l6_b16": (2048, 160, 6, 2.35 / 2, ["--batch", "16"]),
    "v4096_h128_l6_lr1.5e-3": (4096, 128, 6, 2.0, ["--lr", "1.5e-3"]),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=len(CONFIGS))
    ap.add_argument("--budget-s", type=float, default=3000.0)
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    script = Path(__file__).resolve().parents[1] / "train_demo_model.py"
    names = args.only or list(CONFIGS)

    def run(name: str) -> dict:
        v, h, l, step_s, extra = CONFIGS[name]
        d = args.out / name
        cmd = [sys.executable, str(script), "--data", str(args.data), "--out", str(d / "model"),
               "--log-dir", str(d), "--vocab", str(v), "--hidden", str(h), "--layers", str(l),
               "--steps", str(int(args.budget_s / step_s)), "--device", args.device,
               "--threads", "1", "--summary", str(args.out / f"{name}.json"), *extra]
        d.mkdir(parents=True, exist_ok=True)
        with open(d / "stdout.txt", "w") as f:
            rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
        res = json.loads((args.out / f"{name}.json").read_text()) if rc == 0 else {"rc": rc}
        print(name, res.get("heldout_bpb"), res.get("heldout_ppl"), flush=True)
        return {"name": name, **res}

    with ThreadPoolExecutor(args.jobs) as ex:
        results = list(ex.map(run, names))
    (args.out / "sweep.json").write_text(json.dumps(results, indent=1) + "\n")
    for r in sorted(results, key=lambda r: r.get("heldout_bpb", 99)):
        print(f"{r['name']:26s} bpb {r.get('heldout_bpb', float('nan')):.4f} "
              f"ppl {r.get('heldout_ppl', float('nan')):8.2f} val {r.get('val_curve', [[0, 0]])[-1][1]:.4f} "
              f"(best {min((v, s) for s, v in r.get('val_curve', [[0, 0]]))}) "
              f"train {r.get('final_train_loss', float('nan')):.4f} {r.get('train_s', 0):.0f} s")


if __name__ == "__main__":
    main()
