"""A run's settings, each declared once: its default, its --help line and bounds (a `bpfree.core.registry.Option`),
whether a recipe may fill it, whether `--resume` may change it, and whether it is a command-line flag.

The flags of `train` / `compare` / `sweep` / `lr-find`, their --help, the checks of `TrainConfig.check`, config.json
(`dataclasses.asdict`) and the resume check (`RESUME_FREE`) are all derived from these fields; method and model
options are declared the same way where their rule or model is registered.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from bpfree.core.registry import Option

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
PIPELINE_SCHEDULES = ("gpipe", "1f1b")  # bp / fa on --stages (training/pipeline_bp.py)
# --stage-mode: synchronous (every stage waits for this step's error: the one-process run) or pipelined (stage s
# applies the error of the batch it ran d = S-1-s steps before, keeping those batches' activations).
STAGE_MODES = ("synchronous", "pipelined")
DATA_HELP = ("digits, mnist, fashion-mnist, cifar10 or imagefolder:PATH (PATH/train/CLASS/* and PATH/val/CLASS/*, "
             "the same class folders in both, each with images; an image that cannot be decoded stops the run "
             "with its file name, exit code 2)")


def setting(default: Any, help: str, *, recipe: bool = False, resume_free: bool = False, flag: bool = True,
            unset: bool = False, staged: bool = False, **option: Any) -> Any:
    """A TrainConfig field declared once. `recipe`: filled from bpfree/training/recipes.py when not given;
    `resume_free`: may differ on --resume; `flag`: a command-line flag (else set by the program); `unset`: the
    flag reads None when not given (a command may choose it; the default applies otherwise); `staged`: only for
    commands that run --stages; `option`: the Option's type, choices and bounds."""
    declared = Option(default, help, **option)
    return field(default=default, metadata={"option": declared, "recipe": recipe, "resume_free": resume_free,
                                            "flag": flag, "unset": unset or recipe or default is None,
                                            "staged": staged})


def state(default: Any = None, help: str = "", *, factory: Any = None, resume_free: bool = False) -> Any:
    """A TrainConfig field the program fills, not a flag: options resolved by a registry, the recipe's record."""
    meta = {"option": None, "recipe": False, "resume_free": resume_free, "flag": False, "help": help}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    method: str = setting("bp", "learning rule (see `bpfree methods`)")
    model: str = setting("mlp", "model (see `bpfree models`), or your own: path/to/file.py:Name or "
                         "package.module:name (a class or function called with num_classes and input_shape)")
    data: str = setting("digits", DATA_HELP)
    epochs: int = setting(10, "training epochs", minimum=1, resume_free=True)
    optimizer: str = setting("sgd", "torch.optim optimizer", choices=OPTIMIZERS, recipe=True)
    lr: float = setting(0.05, "learning rate, or auto: found on validation data first (bpfree lr-find; the default "
                        "where the recipe for the method and model is not validated)", above=0, recipe=True)
    momentum: float = setting(0.9, "SGD momentum", minimum=0, below=1, recipe=True)
    weight_decay: float = setting(0.0, "weight decay, weights only", minimum=0, recipe=True)
    schedule: str = setting("constant", "learning-rate schedule", choices=SCHEDULES, recipe=True)
    warmup_epochs: float = setting(0.0, "linear warm-up epochs (at most --epochs)", minimum=0, recipe=True)
    # A share of the run, not epochs: a recipe's default must mean the same for a run of any length.
    warmup_fraction: float = setting(0.0, "linear warm-up over this fraction of the run's steps (added "
                                     "to --warmup-epochs)", minimum=0, below=1, recipe=True)
    batch_size: int = setting(128, "examples per step", minimum=1, recipe=True)
    seed: int = setting(0, "random seed", minimum=0, maximum=2**32 - 1)
    device: str = setting("cpu", "cpu or cuda (cuda:N)", resume_free=True)
    out: str = setting("runs/latest", "run folder (default runs/METHOD-MODEL-DATA)", resume_free=True,
                       unset=True)
    resume: bool = setting(False, "continue the run in --out from its last checkpoint (an error if --out holds no "
                           "run; a run stopped before its first checkpoint starts again). --epochs may change only "
                           "with --schedule constant, and not below the epochs already trained", resume_free=True)
    train_size: int | None = setting(None, "use only the first N training examples (after --classes and "
                                     "--val-split)", type=int, minimum=1)
    val_split: int = setting(0, unset=True, minimum=0, help="hold out N training examples for validation "
                             "(val_error, val_loss in the metrics): the same N for every seed and method, drawn after "
                             "--classes and before --train-size (0: none)")
    classes: tuple[int, ...] | None = setting(
        None, "use only these labels, at least two (relabelled 0..k-1 in the order given; for imagefolder: indices "
        "of the sorted class-folder names)", type=tuple, min_items=2, minimum=0)
    init_from: str | None = setting(None, "start from the backbone of a trained run's checkpoint.pt (new "
                                    "classifier heads)", type=str)
    data_root: str | None = setting(None, "folder holding the data sets (default $BPFREE_DATA, else ./data)",
                                    type=str, resume_free=True)
    augment: bool = setting(False, "pad-4 random crop + horizontal flip (cifar10)")
    eval_batch_size: int = setting(1000, "examples per evaluation batch", minimum=1, flag=False)
    dist_timeout: float = setting(60.0, "data-parallel runs: seconds a rank waits for a silent peer before stopping "
                                  "with an error", above=0, resume_free=True)
    stages: int = setting(1, "block-parallel: split the model's blocks into S contiguous stages, one process each, "
                          "all training at once (bp and fa through PyTorch's pipeline; in compare, a rule that "
                          "cannot be staged trains in one process and a line says so; docs/parallel.md)", minimum=1,
                          staged=True)
    stage_split: str | None = setting(None, "with --stages S: the blocks that begin stages 2..S, as NAME,NAME,... "
                                      "(default: balanced from a short profile of each block's step time; "
                                      "config.json records the split used, and a resumed run keeps it)",
                                      type=str, staged=True, resume_free=True)
    stage_mode: str = setting("synchronous", "with --stages and dfa / fdfa / fg-a / fg-w: synchronous (every stage "
                              "waits for the step's output error: the one-process run) or pipelined (stage s "
                              "updates from the error of the batch it ran S-1-s steps before; no stage waits)",
                              choices=STAGE_MODES, staged=True)
    microbatches: int | None = setting(
        None, "bp / fa with --stages: micro-batches per batch in PyTorch's pipeline (default 4; 1 gives the "
        "one-process numbers; batch norm sees each micro-batch's statistics)", type=int, minimum=1, staged=True)
    pipeline_schedule: str | None = setting(None, "bp / fa with --stages: torch.distributed.pipelining schedule "
                                            "(default 1f1b)", type=str, choices=PIPELINE_SCHEDULES,
                                            staged=True)
    method_options: dict[str, Any] = state(help="the method's options, resolved by its registry entry", factory=dict)
    model_options: dict[str, Any] = state(help="the model's options, resolved by its registry entry", factory=dict)
    blocks: tuple[str, ...] | None = state(help="the model's submodules whose outputs are the block boundaries")
    recipe: dict[str, Any] | None = state(help="which recipes.py entry filled the settings not given",
                                          resume_free=True)
    lr_auto: bool = state(False, "--lr auto: the lr finder (training/lrfind.py) sets lr before training; lr is its "
                          "prior")
    lr_probe: dict[str, Any] | None = state(help="what the lr finder probed and chose (--resume reuses it)")

    def check(self) -> None:
        """Reject bad values with one line each: every declared setting against its declaration, then the
        combinations no single declaration states."""
        from bpfree import methods, models
        from bpfree.core.errors import UsageError
        from bpfree.training.checks import check_device

        for f in fields(self):
            declared = f.metadata.get("option")
            value = getattr(self, f.name)
            if declared is not None and value is not None:
                declared.parse(f.name, value)
        if not self.warmup_epochs <= self.epochs:
            raise UsageError(f"--warmup-epochs must be at most --epochs ({self.epochs}), got {self.warmup_epochs}")
        if self.warmup_epochs / self.epochs + self.warmup_fraction > 1:
            raise UsageError(f"--warmup-epochs {self.warmup_epochs:g} and --warmup-fraction {self.warmup_fraction:g} "
                             f"together are longer than the run ({self.epochs} epochs)")
        check_device(self.device)
        methods.METHODS.get(self.method)
        models.check(self.model)


def settings() -> dict[str, Option]:
    """The flags of a run, by field name, as declared."""
    return {f.name: f.metadata["option"] for f in fields(TrainConfig) if f.metadata.get("flag")}


RECIPE_FIELDS = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("recipe"))
#: Settings that may differ on --resume: the epoch budget (checked apart) and where and how the run is kept.
RESUME_FREE = tuple(f.name for f in fields(TrainConfig) if f.metadata.get("resume_free"))
