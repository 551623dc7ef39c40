"""Why fg-a's best Adam rate moves between models: size measures and a backprop-free signal-to-noise reading at
initialisation, per model, set beside each model's validation-oracle rate (docs/tuning.md, "fg-a's prior").

    PYTHONPATH=. python benchmarks/lr_auto_fga.py --out benchmarks/results/lr_auto/fg-a

For the six models of examples/lr_suite.py (the digits suite: batch 32) and the issue's residual CNN
(examples/residual_cnn.py: batch 128), at the seed-0 initialisation, on training batches of digits:
- perturbed: activations fg-a perturbs per example (every tangent it draws, summed over the perturbed maps);
- fan_in: the widest fan-in of a perturbed map (a Linear's in_features, a convolution's in_channels/groups x kernel);
- cos_fg: the cosine between two fg-a estimates of the same batch with independent tangents (backprop-free: its
  expectation is |g|^2 / (|g|^2 + noise) for the estimator's noise on one batch), mean over BATCHES batches;
- cos_bp: for reference only (it uses backprop), the cosine between one fg-a estimate and the batch's gradient.
The readout (trained on its exact gradient) is left out of both cosines: only the perturbed maps' parameters count.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
from torch import nn

from bpfree import methods, models

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from bpfree.training.train import TrainConfig, load_data

SUITE = ("ResBNCNN", "DepthwiseCNN", "TinyTransformer", "TinyMixer", "LayerNormMLP", "Conv1DNet")
MODELS = {**{m: (f"examples/lr_suite.py:{m}", 32) for m in SUITE},
          "ResidualCNN": ("examples/residual_cnn.py:ResidualCNN", 128)}
BATCHES = 8


def fan_in(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features
    if isinstance(m, nn.modules.conv._ConvNd):
        return m.in_channels // m.groups * math.prod(m.kernel_size)
    if isinstance(m, nn.MultiheadAttention):
        return m.embed_dim
    return 0


def flat_grad(params: list[nn.Parameter]) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def measure(name: str, spec: str, batch: int) -> dict:
    cfg = TrainConfig(method="fg-a", model=spec, data="digits", val_split=239)
    data = load_data(cfg)
    torch.manual_seed(0)
    model = models.build(spec, num_classes=data.num_classes, input_shape=data.input_shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    readout = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    perturbed_params = [p for m in model.modules() if m is not readout
                        for p in m.parameters(recurse=False) if p.requires_grad]
    fans = [fan_in(m) for m in model.modules() if m is not readout]
    sizes: list[int] = []
    est1 = methods.build("fg-a", model, seed=1)
    est2 = methods.build("fg-a", model, seed=2)
    sample = est1._sample_

    def counting(out: torch.Tensor, copies: int = 0) -> torch.Tensor:
        if copies:
            sizes.append(out.numel() // out.shape[0])
        return sample(out, copies)

    est1._sample_ = counting  # type: ignore[method-assign]
    g = torch.Generator().manual_seed(0)
    cos_fg, cos_bp, ratio = [], [], []
    for i, (x, y) in enumerate(data.train_batches(batch, g)):
        if i == BATCHES:
            break
        model.load_state_dict(state)  # the initialisation, running statistics included, for every reading
        model.train()
        est1.step(x, y)
        g1 = flat_grad(perturbed_params)
        model.load_state_dict(state)
        est2.step(x, y)
        g2 = flat_grad(perturbed_params)
        model.load_state_dict(state)
        model.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        gb = flat_grad(perturbed_params)
        cos_fg.append(float(torch.nn.functional.cosine_similarity(g1, g2, 0)))
        cos_bp.append(float(torch.nn.functional.cosine_similarity(g1, gb, 0)))
        ratio.append(float(g1.norm() / gb.norm()))
        if i == 0:
            perturbed = sum(sizes)
    return {"model": name, "batch": batch, "perturbed": perturbed, "fan_in": max(fans),
            "params": sum(p.numel() for p in model.parameters()),
            "cos_fg": sum(cos_fg) / len(cos_fg), "cos_bp": sum(cos_bp) / len(cos_bp),
            "norm_ratio": sum(ratio) / len(ratio)}


GRID = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
BATCH_NORM = {"ResBNCNN", "DepthwiseCNN", "ResidualCNN"}


def grid_rows(suite: Path, sweep: Path) -> dict[str, list[float]]:
    """fg-a's validation error (%) per grid rate and model: the digits suite's oracle runs (seed 0), and the issue
    model's sweep (mean over its seeds). Validation errors only."""
    rows = {}
    for line in suite.read_text().splitlines():
        r = json.loads(line)
        if r["rule"] == "fg-a":
            rows[r["model"]] = r["grid_val"]
    issue = []
    for lr in GRID:
        runs = sorted(sweep.glob(f"fg-a/lr={lr:g},*/seed-*/metrics.jsonl"))
        vals = [json.loads(f.read_text().splitlines()[-1])["val_error"] for f in runs]
        issue.append(sum(vals) / len(vals))
    rows["ResidualCNN"] = issue
    return rows


def seed_table(sweep: Path) -> list[str]:
    """The issue model's fg-a validation error (%) per grid rate and seed, with the mean and each seed's best."""
    per: dict[float, dict[int, tuple[float, float]]] = {}
    for lr in GRID:
        for f in sorted(sweep.glob(f"fg-a/lr={lr:g},*/seed-*/metrics.jsonl")):
            last = json.loads(f.read_text().splitlines()[-1])
            per.setdefault(lr, {})[int(f.parent.name.split("-")[1])] = (last["val_error"], last["val_loss"])
    seeds = sorted({s for v in per.values() for s in v})
    lines = ["| lr | " + " | ".join(f"seed {s}: val error (%) / loss" for s in seeds) + " | mean val error (%) |",
             "|---:|" + "---:|" * (len(seeds) + 1)]
    best = {s: min(per, key=lambda lr: per[lr][s][0]) for s in seeds}
    for lr in GRID:
        cells = [f"{'**' if best[s] == lr else ''}{per[lr][s][0]:.2f}{'**' if best[s] == lr else ''} / "
                 f"{per[lr][s][1]:.3f}" for s in seeds]
        mean = sum(per[lr][s][0] for s in seeds) / len(seeds)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + f" | {mean:.2f} |")
    return lines


def meets(value: float, best: float) -> bool:
    return value <= best + max(2.0, 0.1 * best)


def snap(lr: float) -> float:
    return min(GRID, key=lambda g: (abs(math.log(g / lr)), g))


def rule_rate(c: float, alpha: float, factor: int, size: dict, measure: str, model: str) -> float:
    """c x (size / 1000)^-alpha, x factor on a batch-norm model, to the nearest grid rate."""
    return snap(c * (size[model][measure] / 1000) ** -alpha * (factor if model in BATCH_NORM else 1))


CS = tuple(10 ** (k / 20) * 1e-5 for k in range(0, 101))  # 1e-5 .. 1, a twentieth of a decade apart


def fit(rows: dict, size: dict, measure: str, alpha: float, factors: tuple[int, ...], train: list[str]):
    """c and the batch-norm factor meeting the goal on most of `train`, ties by the summed gap, then the smaller
    factor; c: the geometric middle of the values that tie (a grid rate covers a range of c)."""
    def cost(c: float, f: int) -> tuple[int, float]:
        vals = [rows[m][GRID.index(rule_rate(c, alpha, f, size, measure, m))] for m in train]
        return (-sum(meets(v, min(rows[m])) for v, m in zip(vals, train)),
                round(sum(v - min(rows[m]) for v, m in zip(vals, train)), 6))
    best = min((cost(c, f), f) for c in CS for f in factors)
    tied = [c for c in CS if (cost(c, best[1]), best[1]) == best]
    return math.sqrt(tied[0] * tied[-1]), best[1]


def analyse(rows: dict, size: dict) -> list[str]:
    names = list(rows)
    lines = ["| measure | alpha | bn factors | c, factor | in sample: met / gap | leave one out: met / gap | "
             "held-out rates |", "|---|---:|---|---|---:|---:|---|"]
    for measure in ("perturbed", "fan_in", "params"):
        for alpha in (0.0, 0.5, 1.0, 1.5):
            if alpha == 0 and measure != "perturbed":
                continue
            for factors in ((1,), (1, 3, 10)):
                c, f = fit(rows, size, measure, alpha, factors, names)
                ins = [rows[m][GRID.index(rule_rate(c, alpha, f, size, measure, m))] for m in names]
                met_in = sum(meets(v, min(rows[m])) for v, m in zip(ins, names))
                gap_in = sum(v - min(rows[m]) for v, m in zip(ins, names))
                met, gap, chosen = 0, 0.0, []
                for held in names:
                    c1, f1 = fit(rows, size, measure, alpha, factors, [m for m in names if m != held])
                    lr = rule_rate(c1, alpha, f1, size, measure, held)
                    v = rows[held][GRID.index(lr)]
                    met += meets(v, min(rows[held]))
                    gap += v - min(rows[held])
                    chosen.append(f"{held} {lr:g}{'' if meets(v, min(rows[held])) else ' (miss)'}")
                lines.append(f"| {measure} | {alpha:g} | {','.join(map(str, factors))} | {c:.3g} x{f} | "
                             f"{met_in} / {gap_in:.1f} | "
                             f"{met} / {gap:.1f} | {'; '.join(chosen)} |")
    return lines


def sweep_row(folder: Path) -> list[float]:
    """Validation error (%) per grid rate of a one-method sweep folder (mean over its seeds)."""
    row = []
    for lr in GRID:
        runs = sorted(folder.glob(f"fg-a/lr={lr:g},*/seed-*/metrics.jsonl"))
        vals = [json.loads(f.read_text().splitlines()[-1])["val_error"] for f in runs]
        row.append(sum(vals) / len(vals) if vals else math.nan)
    return row


def out_of_sample(folders: list[Path], scale: float) -> list[str]:
    """Each sweep folder's model (examples/fga_sizes.py:NAME, from the folder's name): the size-scaled prior and the
    fixed prior with the batch-norm factor (3e-3, x3 with batch norm), each scored against the grid's best."""
    import fga_sizes

    lines = ["| model | budget | parameters | size-scaled prior | fixed prior (x3 batch norm) | validation error (%) "
             "at 1e-4 .. 3e-2 | best |", "|---|---|---:|---|---|---|---:|"]
    for folder in folders:
        name = folder.name.split("-")[0]
        built = getattr(fga_sizes, name)(10, (1, 8, 8))
        n = sum(p.numel() for p in built.parameters())
        bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in built.modules())
        row = sweep_row(folder)
        best = min(v for v in row if not math.isnan(v))
        cells = []
        for lr in (snap(scale / math.sqrt(n)), snap(3e-3 * (3 if bn else 1))):
            v = row[GRID.index(lr)]
            cells.append(f"{lr:g}: {v:.1f}{'' if meets(v, best) else ' **miss**'}")
        config = json.loads(next(folder.glob("fg-a/*/seed-0/config.json")).read_text())
        budget = f"{config['epochs']} epochs, batch {config['batch_size']}"
        lines.append(f"| {name} | {budget} | {n:,} | {cells[0]} | {cells[1]} | "
                     f"{', '.join(f'{v:.1f}' for v in row)} | {best:.1f} |")
    return lines


def auto_table(roots: dict[str, Path], folders: list[Path]) -> list[str]:
    """`bpfree train` runs with no rate given (`--lr auto`), one folder per model under each root (the size-scaled
    prior's code, the old prior's), beside the grid's best: validation error (%) at the last epoch, the rate chosen,
    the prior the probe started from and the rates it probed."""
    lines = ["| model (budget) | " + " | ".join(f"{k}: prior -> chosen, val error" for k in roots) + " | grid's best |",
             "|---|" + "---|" * len(roots) + "---:|"]
    for folder in folders:
        row = sweep_row(folder)
        best = min(v for v in row if not math.isnan(v))
        config = json.loads(next(folder.glob("fg-a/*/seed-0/config.json")).read_text())
        cells = []
        for root in roots.values():
            run = root / folder.name
            c = json.loads((run / "config.json").read_text())
            val = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_error"]
            probe = c["lr_probe"]
            probed = f" (probed {', '.join(f'{g:g}' for g in probe['grid'])})" if probe["grid"] else " (no probe)"
            cells.append(f"{probe['prior']['lr']:g} -> {c['lr']:g}{probed}, "
                         f"{val:.1f}{'' if meets(val, best) else ' **miss**'}")
        lines.append(f"| {folder.name} ({config['epochs']} epochs, batch {config['batch_size']}) | "
                     + " | ".join(cells) + f" | {best:.1f} |")
    return lines


SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def other_data(results: list[Path], scale: float) -> list[str]:
    """fg-a's rows of earlier benchmarks/lr_auto.py runs (recorded grids, no new runs): the rate each prior gives on
    the model as built for that data set, scored against the grid's best validation error."""
    import lr_suite

    lines = ["| data | model | parameters | size-scaled prior | fixed prior (x3 batch norm) | grid's best |",
             "|---|---|---:|---|---|---|"]
    for path in results:
        for r in map(json.loads, path.read_text().splitlines()):
            if r["rule"] != "fg-a":
                continue
            data = r["command_auto"].split("--data ")[1].split()[0]
            built = getattr(lr_suite, r["model"])(10, SHAPES[data])
            n = sum(p.numel() for p in built.parameters())
            bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in built.modules())
            row, best = r["grid_val"], min(r["grid_val"])
            cells = []
            for lr in (snap(scale / math.sqrt(n)), snap(3e-3 * (3 if bn else 1))):
                v = row[GRID.index(lr)]
                cells.append(f"{lr:g}: {v:.1f}{'' if meets(v, best) else ' **miss**'}")
            lines.append(f"| {data} | {r['model']} | {n:,} | {cells[0]} | {cells[1]} | "
                         f"{GRID[row.index(best)]:g}: {best:.1f} |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="benchmarks/results/lr_auto/fg-a")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--suite", default="benchmarks/results/lr_auto/digits/results.jsonl")
    p.add_argument("--sweep", default="runs/lr_auto/fg-a-seeds", help="the issue model's fg-a sweep (seeds 0,1,2)")
    p.add_argument("--oos", default="", help="sweep folders of examples/fga_sizes.py models, comma-separated")
    p.add_argument("--auto", default="", metavar="NAME=DIR,...",
                   help="roots of --lr auto runs of the --oos models (a folder per model, named as its sweep folder)")
    p.add_argument("--other", default="", metavar="JSONL,...",
                   help="results.jsonl files of benchmarks/lr_auto.py on other data: fg-a's rows scored offline")
    p.add_argument("--scale", type=float, default=0.2, help="the size-scaled prior's scale checked out of sample")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "size.jsonl").exists():
        rows = []
        for name in args.models.split(","):
            row = measure(name, *MODELS[name])
            rows.append(row)
            print(json.dumps(row), flush=True)
        (out / "size.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    seeds = seed_table(Path(args.sweep))
    (out / "seeds.md").write_text("\n".join(seeds) + "\n")
    print("\n".join(seeds))
    size = {r["model"]: r for r in map(json.loads, (out / "size.jsonl").read_text().splitlines())}
    lines = analyse(grid_rows(Path(args.suite), Path(args.sweep)), size)
    (out / "rules.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.oos:
        lines = out_of_sample([Path(f) for f in args.oos.split(",")], args.scale)
        (out / "out-of-sample.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    if args.other:
        lines = other_data([Path(f) for f in args.other.split(",")], args.scale)
        (out / "other-data.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
    if args.auto:
        roots = {k: Path(v) for k, v in (item.split("=", 1) for item in args.auto.split(","))}
        folders = [Path(f) for f in args.oos.split(",") if all((r / Path(f).name).exists() for r in roots.values())]
        lines = auto_table(roots, folders)
        (out / "out-of-sample-auto.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
