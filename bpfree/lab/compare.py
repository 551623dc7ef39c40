"""Train several methods × seeds with the same settings, one run folder each, in this process, one after another.

Resumable: a finished run is skipped, an unfinished one resumed from its checkpoint (the trainer's `--resume`), a
diverged one is recorded in `failed.json` and not retried with the same settings (it would diverge again at the
same step: training is deterministic); a failed run whose settings changed is trained afresh. Before any run
trains, every method's setup is built and takes one step on a few examples, so a model / method / option
combination that cannot work stops the comparison at once (UsageError) instead of after hours of other runs.
A run failing later never stops the others.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from bpfree import methods, models
from bpfree.core.errors import DivergedError, UsageError
from bpfree.lab.results import NOT_SETTINGS
from bpfree.training import lrfind
from bpfree.training.checkpoint import CHECKPOINT, CONFIG, FAILED, METRICS, record_failure, with_defaults
from bpfree.training.runfolder import FolderInUse, read_json, read_metrics
from bpfree.training.train import TrainConfig, load_data, lr_multipliers_by_id, make_optimizer, train


def run_folder(out: Path, method: str, seed: int) -> Path:
    return out / method / f"seed-{seed}"


def _plain(cfg: TrainConfig) -> dict[str, Any]:
    """The config as it reads back from JSON (tuples become lists), for comparisons with saved configs."""
    return with_defaults(json.loads(json.dumps(asdict(cfg))))


def check_compatible(cfg: TrainConfig) -> None:
    """Refuse to resume or skip a run folder that was trained with other settings: its numbers would be mislabelled.

    More epochs than before are fine with a constant schedule (the run is extended exactly as if it had been
    started with the new budget); a cosine schedule depends on the total, so there it is refused too.
    """
    out = Path(cfg.out)
    saved_path = out / CONFIG
    if not saved_path.exists():
        return
    saved, new = with_defaults(read_json(saved_path)), _plain(cfg)
    changed = [k for k in new if k not in (*NOT_SETTINGS, "epochs") and k in saved and saved[k] != new[k]]
    if changed:
        what = ", ".join(f"{k}={saved[k]!r} (now {new[k]!r})" for k in changed)
        raise UsageError(f"{out} holds a run with {what}; choose another --out or delete that folder")
    old = saved.get("epochs", cfg.epochs)
    if cfg.epochs < old or (cfg.epochs > old and cfg.schedule != "constant" and len(read_metrics(out / METRICS))):
        raise UsageError(f"{out} holds a run of {old} epochs (now {cfg.epochs}, schedule {cfg.schedule}); "
                         "choose another --out or delete that folder")


def settings(config: dict[str, Any]) -> dict[str, Any]:
    """What decides a run's numbers, but for its epoch budget."""
    return {k: v for k, v in config.items() if k not in (*NOT_SETTINGS, "epochs")}


def read_failure(cfg: TrainConfig) -> dict[str, Any] | None:
    path = Path(cfg.out) / FAILED
    return read_json(path) if path.exists() else None


def reset_peak_memory(device: torch.device) -> None:
    """Make the trainer's peak-memory figure this run's own, not the process's so far (runs share one process)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the peak RSS (which getrusage reports) to the current RSS.
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def dry_run(cfg: TrainConfig, data: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Build `cfg`'s model, estimator and optimizer on the CPU and take one step on `batch`.

    A UsageError (a model the method cannot take, options that do not fit, a step the method refuses) is raised
    naming the method; any other error is left for the real run, which records it in the method's row.
    """
    state = torch.get_rng_state()  # library callers may rely on the global generator; `train` reseeds anyway
    try:
        model = models.build(cfg.model, num_classes=data.num_classes, input_shape=data.input_shape,
                             **cfg.model_options)
        estimator = methods.build(cfg.method, model, seed=cfg.seed, blocks=cfg.blocks, **cfg.method_options)
        optimizer = make_optimizer(cfg, estimator.trainable(), lr_multipliers_by_id(estimator))
        model.train()
        optimizer.zero_grad(set_to_none=True)
        estimator.step(*batch)
    except UsageError as e:
        raise UsageError(f"{cfg.method} cannot run this setup: {e} (nothing was trained)") from None
    except Exception:  # not a setup the user can fix by changing options: the run itself will report it
        pass
    finally:
        torch.set_rng_state(state)


def run_all(
    configs: list[TrainConfig], data: Any = None, show_progress: bool | None = None,
    describe: Callable[[TrainConfig], str] = lambda cfg: f"{cfg.method} seed {cfg.seed}", show_test: bool = True,
    staged: Callable[[TrainConfig], list[dict[str, Any]] | None] = lambda cfg: None,
) -> None:
    """Train (or resume, or skip) every config in order. Settings clashes, and every method's setup (`dry_run`),
    are checked for all runs first. `describe` says which run a progress line is about (`sweep` adds the grid
    point); show_test=False keeps test errors out of the progress lines (`sweep` chooses on validation error).
    `staged(cfg)` trains a run on stages (`compare --stages`) and returns its records, or None: one process."""
    fresh = set()
    data = lrfind.resolve_all(configs, data)  # --lr auto: choose (or reuse) each run's rate before the checks
    for cfg in configs:
        cfg.check()
        failure = read_failure(cfg)
        if failure is not None and settings(with_defaults(failure.get("config", {}))) != settings(_plain(cfg)):
            fresh.add(cfg.out)  # a failed run, now with other settings (say a lower lr): nothing to keep
        else:
            check_compatible(cfg)
    todo = []
    for cfg in configs:
        out = Path(cfg.out)
        if cfg.out in fresh:
            for name in (FAILED, CHECKPOINT, METRICS, CONFIG):
                (out / name).unlink(missing_ok=True)
        failure = read_failure(cfg)
        if failure is not None and failure.get("kind") == "diverged":
            log(f"{describe(cfg)}: {failure['error']} before (not retried: it would again; "
                f"change its settings or delete {out})")
            continue
        if failure is not None:
            (out / FAILED).unlink()  # an error (perhaps fixed since): try again, resuming what was saved
        if (out / CHECKPOINT).exists() and len(read_metrics(out / METRICS)) >= cfg.epochs:
            log(f"{describe(cfg)}: finished before, skipped")
        else:
            todo.append(cfg)
    if todo and data is None:
        first = todo[0]
        data = load_data(first)  # every run shares the data settings (compare and sweep set them alike)
    if todo:
        batches = data.train_batches(min(8, data.num_train), torch.Generator().manual_seed(0))
        x, y = next(batches)
        batches.close()  # an image folder's loader workers stop now, not when garbage-collected
        checked = set()
        for cfg in todo:  # seeds of one method share its setup
            key = json.dumps(settings(_plain(cfg)), sort_keys=True)
            if key not in checked:
                checked.add(key)
                dry_run(cfg, data, (x, y))
    for i, cfg in enumerate(todo):
        out = Path(cfg.out)
        started = (out / CHECKPOINT).exists()
        # A folder killed before its first checkpoint holds config.json only: the trainer starts it afresh (and
        # clears it) under the folder's lock, so a folder another process is training in is never touched.
        cfg.resume = started or (out / CONFIG).exists()
        start = len(read_metrics(out / METRICS)) if started else 0
        log(f"[{i + 1}/{len(todo)}] {describe(cfg)}: "
            + (f"resuming after epoch {start}" if started else "training") + f" -> {out}")
        reset_peak_memory(torch.device(cfg.device))
        try:
            records = staged(cfg)
            if records is None:
                records = train(cfg, data=data, show_progress=show_progress)
        except DivergedError as e:  # the trainer wrote failed.json
            epoch = len(read_metrics(out / METRICS)) + 1
            log(f"  {describe(cfg)}: diverged at epoch {epoch}: {e}")
            continue
        except FolderInUse:
            raise  # another process is training in that folder: stop, and write nothing into it
        except UsageError as e:
            record_failure(out, _plain(cfg), "error", str(e))
            log(f"  {describe(cfg)}: error: {e}")
            continue
        except Exception as e:  # a broken method must not take the whole comparison down
            line = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            record_failure(out, _plain(cfg), "error", line, traceback.format_exc())
            log(f"  {describe(cfg)}: failed: {line} (traceback in {out / FAILED})")
            continue
        last = records[-1]
        shown = [f"val error {last['val_error']:.2f} %"] if "val_error" in last else []
        shown += [f"test error {last['test_error']:.2f} %"] if show_test else []
        shown += [f"train error {last['train_error']:.2f} %"]
        log(f"  {', '.join(shown)} "
            f"after {last['epoch']} epochs ({sum(r['seconds'] for r in records) / len(records):.2f} s/epoch)")
