"""Scalable Forward-Forward vs backprop on CIFAR-10 (ResNet18, MobileNetV3-small), and a transfer experiment.

    compare   bp, sff, sff-block on each model at equal epochs and hyper-parameters: test error, training
              seconds per epoch and peak training memory, each also as a ratio to bp measured in the same run.
    transfer  pre-train on CIFAR-10 classes 0-4, fine-tune on classes 5-9 with N examples per class starting
              from the pre-trained backbone (new heads), against the same fine-tuning from scratch.

Every configuration runs in its own process, one after the other, so that peak memory is that run's alone:
on CPU it is the growth of resident memory during training (peak RSS is reset after data and model are
loaded, via /proc/self/clear_refs), on CUDA torch.cuda.max_memory_allocated. A second, allocator-independent
figure is the peak size of the activations autograd holds for backward (saved-tensor hooks). Wall time on a
shared machine varies with the other load; the ratios compare runs made back to back.

Full-size numbers need a GPU (e.g. `--resnet-width 64 --mobilenet-width 1 --epochs 50`, all data). The defaults
are a small configuration that finishes on a laptop CPU in minutes; always quote the budget with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------
# one configuration, in a child process


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: torch.device) -> float:
    """Forget the peak memory so far; returns the baseline the peak is measured from (MiB)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (peak RSS) to the current RSS
    except OSError:
        return float("nan")
    return rss_mb("VmRSS")


def peak(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return rss_mb("VmHWM")


class SavedTensorPeak:
    """Peak bytes of the tensors autograd keeps for the backward pass (activations), parameters excluded.

    Independent of the memory allocator, so it isolates what block-local training is meant to save: a unit's
    graph is freed before the next unit runs, where backprop holds the whole network's graph.
    """

    def __init__(self, model: torch.nn.Module, extra: list[torch.nn.Parameter]):
        self.skip = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *extra]}
        self.live: dict[int, list[int]] = {}
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor) -> Any:
        key = t.untyped_storage().data_ptr()
        if key in self.skip:
            return t
        entry = self.live.get(key)
        if entry is None:
            size = t.untyped_storage().nbytes()
            self.live[key] = [1, size]
            self.now += size
            self.peak = max(self.peak, self.now)
        else:
            entry[0] += 1
        return _Held(self, key, t)

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        return held.t if isinstance(held, _Held) else held

    def release(self, key: int) -> None:
        entry = self.live[key]
        entry[0] -= 1
        if entry[0] == 0:
            self.now -= entry[1]
            del self.live[key]


class _Held:
    __slots__ = ("owner", "key", "t")

    def __init__(self, owner: SavedTensorPeak, key: int, t: torch.Tensor):
        self.owner, self.key, self.t = owner, key, t

    def __del__(self) -> None:
        self.owner.release(self.key)


def load_data(spec: dict[str, Any]):
    from bpfree import data as datasets
    from bpfree.training.transfer import per_class

    data = datasets.load("cifar10", spec["data_root"], None, spec["augment"])
    if spec.get("classes"):
        data = datasets.select_classes(data, spec["classes"])
    if spec.get("per_class"):
        data = per_class(data, spec["per_class"])
    if spec.get("train_size"):
        data = data.subset(spec["train_size"])
    if spec.get("test_size"):
        n = spec["test_size"]
        data = type(data)(data.name, data.train_x, data.train_y, data.test_x[:n], data.test_y[:n],
                          data.num_classes, data.augment)
    return data


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one (model, method) with the library's trainer and measure it."""
    from bpfree.training.train import Run, TrainConfig
    from bpfree.training.transfer import load_backbone

    torch.set_num_threads(spec["threads"])
    data = load_data(spec)
    width = spec["resnet_width"] if spec["model"] == "resnet18" else spec["mobilenet_width"]
    cfg = TrainConfig(
        method=spec["method"], model=spec["model"], data="cifar10", epochs=spec["epochs"],
        batch_size=spec["batch_size"], optimizer=spec["optimizer"], lr=spec["lr"], momentum=spec["momentum"],
        weight_decay=spec["weight_decay"], schedule=spec["schedule"], seed=spec["seed"], device=spec["device"],
        out=spec["out"], model_options={"width": width}, eval_batch_size=spec.get("eval_batch_size", 1000),
    )
    run = Run(cfg, data=data, show_progress=False)
    loaded = len(load_backbone(run.model, spec["init_from"])) if spec.get("init_from") else 0
    device = torch.device(spec["device"])
    saved = SavedTensorPeak(run.model, run.estimator.trainable())
    base = reset_peak(device)
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        records = run.train()
    total = time.perf_counter() - start
    last = records[-1]
    units = unit_errors(run.estimator, data, spec.get("eval_batch_size", 1000), device)
    return {
        "model": spec["model"], "method": spec["method"], "width": width, "epochs": last["epoch"],
        "train_examples": data.num_train, "test_examples": len(data.test_y),
        "test_error": last["test_error"], "best_test_error": min(r["test_error"] for r in records),
        "train_error": last["train_error"],
        "seconds_per_epoch": sum(r["seconds"] for r in records) / len(records),
        "wall_seconds": total, "peak_memory_mb": peak(device) - base,
        "activation_peak_mb": saved.peak / 2**20, "backbone_tensors_loaded": loaded,
        "checkpoint": str(Path(spec["out"]) / "checkpoint.pt"),
        # SFF only: test error of each unit's goodness alone (does averaging the blocks help or hurt?)
        "unit_test_errors": units,
    }


def unit_errors(estimator: Any, data: Any, batch: int, device: torch.device) -> list[float] | None:
    if not hasattr(estimator, "unit_goodness"):
        return None
    estimator.model.eval()
    wrong: torch.Tensor | None = None
    for x, y in data.test_batches(batch):
        x, y = x.to(device), y.to(device)
        hits = torch.stack([(g.argmax(1) != y).sum() for g in estimator.unit_goodness(x)])
        wrong = hits if wrong is None else wrong + hits
    assert wrong is not None
    return [round(100 * w.item() / len(data.test_y), 2) for w in wrong]


def spawn(spec: dict[str, Any]) -> dict[str, Any]:
    # Large blocks straight from mmap and back to the system on free: resident memory then follows the live
    # tensors instead of glibc's grown heap, so the peak compares runs rather than allocator histories.
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "MALLOC_MMAP_THRESHOLD_": "65536"}
    cmd = [sys.executable, __file__, "_one", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"configuration failed: {spec['model']} {spec['method']}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {result['model']:>18} {result['method']:>9}: test error {result['test_error']:6.2f} %, "
          f"{result['seconds_per_epoch']:7.1f} s/epoch, peak +{result['peak_memory_mb']:7.1f} MiB, "
          f"activations {result['activation_peak_mb']:6.1f} MiB", flush=True)
    return result


# ---------------------------------------------------------------------------------------------------------------
# experiments


def base_spec(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return {
        "data_root": args.data_root, "augment": args.augment, "test_size": args.test_size,
        "epochs": args.epochs, "batch_size": args.batch_size, "optimizer": args.optimizer, "lr": args.lr,
        "momentum": args.momentum, "weight_decay": args.weight_decay, "schedule": args.schedule, "seed": args.seed,
        "device": args.device, "threads": args.threads, "resnet_width": args.resnet_width,
        "mobilenet_width": args.mobilenet_width, "out": str(out), "eval_batch_size": args.eval_batch_size,
    }


def with_ratios(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each run's error, time and memory as ratios to bp on the same model."""
    for r in results:
        ref = next((b for b in results if b["model"] == r["model"] and b["method"] == "bp"), None)
        if ref is None:
            continue
        for key in ("test_error", "seconds_per_epoch", "peak_memory_mb", "activation_peak_mb"):
            r[key + "_vs_bp"] = r[key] / ref[key] if ref[key] else float("nan")
    return results


def table(results: list[dict[str, Any]]) -> str:
    nan = float("nan")
    lines = ["| model | method | test error % | x bp | s/epoch | x bp | peak RSS MiB | x bp | activations MiB | x bp |",
             "|---" * 10 + "|"]
    for r in results:
        lines.append(
            f"| {r['model']} (w {r['width']}) | {r['method']} | {r['test_error']:.2f} | "
            f"{r.get('test_error_vs_bp', nan):.2f} | {r['seconds_per_epoch']:.1f} | "
            f"{r.get('seconds_per_epoch_vs_bp', nan):.2f} | {r['peak_memory_mb']:.0f} | "
            f"{r.get('peak_memory_mb_vs_bp', nan):.2f} | {r['activation_peak_mb']:.1f} | "
            f"{r.get('activation_peak_mb_vs_bp', nan):.2f} |"
        )
    return "\n".join(lines)


def compare(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            spec = {**base_spec(args, work / f"{model}-{method}"), "model": model, "method": method,
                    "train_size": args.train_size}
            results.append(spawn(spec))
    return {"results": with_ratios(results), "table": table(results)}


def transfer(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Pre-train on classes 0-4, fine-tune on 5-9 (`--per-class` each) from that backbone or from scratch."""
    results = []
    for model in args.models.split(","):
        for method in args.methods.split(","):
            pre = {**base_spec(args, work / f"pre-{model}-{method}"), "model": model, "method": method,
                   "classes": [0, 1, 2, 3, 4], "per_class": args.pretrain_per_class,
                   "epochs": args.pretrain_epochs}
            pretrained = spawn(pre)
            for init in ("pretrained", "scratch"):
                spec = {**base_spec(args, work / f"ft-{model}-{method}-{init}"), "model": model, "method": method,
                        "classes": [5, 6, 7, 8, 9], "per_class": args.per_class,
                        "init_from": pretrained["checkpoint"] if init == "pretrained" else None}
                result = spawn(spec)
                result.update(init=init, pretrain_test_error=pretrained["test_error"])
                results.append(result)
    lines = ["| model | method | fine-tune start | test error % (classes 5-9) |", "|---|---|---|---|"]
    lines += [f"| {r['model']} (w {r['width']}) | {r['method']} | {r['init']} | {r['test_error']:.2f} |"
              for r in results]
    return {"results": results, "table": "\n".join(lines)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_one":
        print(json.dumps(run_one(json.loads(argv[1]))))
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=("compare", "transfer"))
    p.add_argument("--models", default="resnet18,mobilenetv3-small")
    p.add_argument("--methods", default=None, help="default bp,sff,sff-block (compare), bp,sff-block (transfer)")
    p.add_argument("--data-root", default=os.environ.get("BPFREE_DATA", "data"))
    p.add_argument("--train-size", type=int, default=2000, help="training examples (0 = all 50000)")
    p.add_argument("--test-size", type=int, default=2000, help="test examples (0 = all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--schedule", default="constant", choices=("constant", "cosine"))
    p.add_argument("--augment", action="store_true", help="random crop + flip")
    p.add_argument("--eval-batch-size", type=int, default=1000, help="evaluation batch; the peak RSS includes "
                   "evaluation, so a batch near --batch-size keeps it a training figure")
    p.add_argument("--resnet-width", type=int, default=8, help="ResNet18 first-stage channels (64 = standard)")
    p.add_argument("--mobilenet-width", type=float, default=0.5, help="MobileNetV3 width multiplier (1 = standard)")
    p.add_argument("--per-class", type=int, default=500, help="transfer: fine-tuning examples per class")
    p.add_argument("--pretrain-per-class", type=int, default=0, help="transfer: pre-training examples per class "
                   "(0 = all 5000)")
    p.add_argument("--pretrain-epochs", type=int, default=None, help="transfer: default --epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--name", default=None, help="results file name (default forward_forward_EXPERIMENT)")
    args = p.parse_args(argv)
    args.methods = args.methods or ("bp,sff,sff-block" if args.experiment == "compare" else "bp,sff-block")
    args.train_size = args.train_size or None
    args.test_size = args.test_size or None
    args.pretrain_per_class = args.pretrain_per_class or None
    args.pretrain_epochs = args.pretrain_epochs or args.epochs
    print(f"{args.experiment}: {' '.join(argv)}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bpfree-ff-") as tmp:
        out = (compare if args.experiment == "compare" else transfer)(args, Path(tmp))
    out = {"experiment": args.experiment, "argv": argv, "settings": vars(args), **out}
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{args.name or 'forward_forward_' + args.experiment}.json"
    path.write_text(json.dumps(out, indent=2))
    print(out["table"])
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
