"""Every knob of a lab run in one dataclass, so a run folder can store it and a resume can check it."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

METHOD_HELP = {
    "ft": "plain fine-tuning on the injection set (torch.optim)",
    "cpl": "CPL optimizer, reference per step or per epoch (--reference), --criterion",
    "cpl-once": "CPL mask computed once at the start, MaskedAdamW (compact state)",
    "cpl-masked-epoch": "CPL mask recomputed at every epoch start, MaskedAdamW.update_masks (compact state)",
    "random": "random mask re-drawn every step, frozen fraction matched to CPL's",
    "random-once": "random static mask with cpl-once's per-tensor sparsity, MaskedAdamW",
    "agem": "A-GEM: project the gradient when it conflicts with a mastered batch's",
    "replay": "each step also trains on a random batch of mastered in-set questions",
    "lora": "LoRA (peft) on every linear layer, lr x --lora-lr-scale",
    "ewc": "EWC: penalty --ewc-lambda/2 * sum F (theta - theta0)^2, F = diagonal Fisher of the in-set",
    "surgery": "gradient surgery (PCGrad), per tensor: drop the component conflicting with a mastered batch's",
    "mofo": "MoFO (MoFOAdamW): per tensor, only the top --mofo-alpha of |momentum| is updated; no mastered data",
    "cpl-mofo": "MoFO with CPL's reference (as cpl): an element moves iff in the top momentum and collaborative",
}
METHODS = tuple(METHOD_HELP)
# A decade around the rate where fine-tuning learns every fact within the epochs; the budgeted
# metric picks, per method, the best (lr, epoch) point of this grid.
DEFAULT_LRS = (1e-4, 3e-4, 1e-3)
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "adamw8bit")
# Methods whose step needs no more than one parameter's gradient at a time (--in-backward).
IN_BACKWARD_METHODS = ("ft", "cpl")
# Methods on MoFOAdamW (cpl_kernels): AdamW or Adam only.
MOFO_METHODS = ("mofo", "cpl-mofo")


@dataclass
class LabConfig:
    # data: the embedded synthetic facts, or a JSONL file
    data: str | None = None
    n_entities: int = 60
    relations: int = 6
    train_templates: int = 2
    data_seed: int = 0
    # model: the lab's own tiny Llama (pre-trained and cached), or a local HF checkpoint
    model: str | None = None
    hidden: int = 128
    layers: int = 2
    heads: int = 4
    intermediate: int = 256
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    pretrain_max_epochs: int = 300
    pretrain_target: float = 0.98
    # split
    n_mastered: int | None = None
    n_inject: int | None = None
    # injection
    methods: list[str] = field(default_factory=lambda: ["ft", "cpl", "replay"])
    lrs: list[float] = field(default_factory=lambda: list(DEFAULT_LRS))
    seeds: list[int] = field(default_factory=lambda: [0])
    optimizer: str = "adamw"
    epochs: int = 10
    batch_size: int = 32
    weight_decay: float = 0.01
    momentum: float = 0.9
    reference: str = "step"       # "step": a fresh mastered batch per step; "epoch": whole in-set
    criterion: str = "gradient"
    strict: bool = True
    ref_batch: int = 32
    ref_every: int = 1            # reference="step": rebuild the reference every N steps
    in_backward: bool = False     # ft and cpl step inside backward (cpl_kernels.in_backward)
    random_frac: float | None = None  # None: match the CPL cell of the same lr and seed
    lora_r: int = 8
    lora_alpha: int = 16
    lora_lr_scale: float = 3.0    # sweep in docs/lab.md: LoRA's best lr is 3x fine-tuning's
    ewc_lambda: float = 1e5       # sweep in docs/lab.md (1e2 .. 1e6)
    mofo_alpha: float = 0.15      # MoFO's updated fraction per tensor (the authors' 15%)
    eval_every: int = 1
    xp_every: int = 0             # held-out templates every N evaluations; 0: the last epoch only
    forget_budget: float = 0.01   # reporting only: the budgeted metric's budget, of the mastered facts
    device: str = "cpu"
    threads: int = 1              # the tiny model: one thread is as fast as two (docs/lab.md)

    def validate(self) -> "LabConfig":
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if self.reference not in ("step", "epoch"):
            raise ValueError("reference must be 'step' or 'epoch'")
        if self.criterion not in ("update", "gradient"):
            raise ValueError("criterion must be 'update' or 'gradient'")
        if self.random_frac is not None and not 0.0 <= self.random_frac <= 1.0:
            raise ValueError("random_frac must be in [0, 1]")
        for name in ("epochs", "batch_size", "ref_batch", "ref_every", "eval_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not self.lrs or any(not lr > 0 for lr in self.lrs):
            raise ValueError("lrs must be positive learning rates")
        if self.xp_every < 0:
            raise ValueError("xp_every must be 0 (last epoch only) or more")
        if not 0.0 <= self.forget_budget <= 1.0:
            raise ValueError("forget_budget is a fraction of the mastered facts, in [0, 1]")
        if not self.lora_lr_scale > 0:
            raise ValueError("lora_lr_scale must be positive")
        if self.ewc_lambda < 0:
            raise ValueError("ewc_lambda must be >= 0")
        if not 0.0 < self.mofo_alpha <= 1.0:
            raise ValueError("mofo_alpha is the fraction of each tensor MoFO updates, in (0, 1]")
        mofo = [m for m in self.methods if m in MOFO_METHODS]
        if mofo and self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"{', '.join(mofo)} run on MoFOAdamW and need --optimizer adam or adamw, "
                             f"not {self.optimizer!r}")
        unsupported = [m for m in self.methods if m not in IN_BACKWARD_METHODS]
        if self.in_backward and unsupported:
            raise ValueError(f"--in-backward steps {' and '.join(IN_BACKWARD_METHODS)} inside backward, "
                             f"not {', '.join(unsupported)} (docs/lab.md): run them without --in-backward")
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LabConfig":
        """A stored config.json. Keys it lacks were added later: they take the value that
        reproduces what the lab did before they existed, so a resume compares like with like."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{**cls.LEGACY, **{k: v for k, v in d.items() if k in names}})

    # Before --lora-lr-scale, --ref-every and --xp-every: LoRA at the grid's lr, the reference
    # rebuilt every step, the held-out templates measured at every evaluation.
    LEGACY = {"lora_lr_scale": 1.0, "ref_every": 1, "xp_every": 1, "mofo_alpha": 0.15}

    # What decides the pre-trained model (and so its cache entry), nothing else.
    PRETRAIN_KEYS = ("data", "n_entities", "relations", "train_templates", "data_seed", "hidden",
                     "layers", "heads", "intermediate", "pretrain_lr", "pretrain_batch",
                     "pretrain_max_epochs", "pretrain_target")

    # What decides the results of a cell apart from (method, lr, seed): a resume must match these.
    RESULT_KEYS = PRETRAIN_KEYS + ("model", "n_mastered", "n_inject", "optimizer", "epochs",
                                   "batch_size", "weight_decay", "momentum", "reference",
                                   "criterion", "strict", "ref_batch", "ref_every", "random_frac",
                                   "lora_r", "lora_alpha", "lora_lr_scale", "ewc_lambda", "mofo_alpha",
                                   "eval_every", "xp_every", "in_backward")

    def digest(self, keys, extra: str = "") -> str:
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True) + extra
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def demo_config() -> LabConfig:
    """`cpl inject --demo`: the embedded default, sized to finish within 5 minutes on 2 shared CPU
    cores (docs/lab.md has the measured times).

    60 entities x 6 relations = 360 facts, half pre-trained: about 180 mastered and 170 to inject
    (the prototype had 300 + 300); AdamW at lrs 1e-4, 3e-4, 1e-3 for 10 epochs, batch 32; ft, cpl
    and replay (the strongest baseline); the held-out templates measured at the last epoch only;
    one thread (as fast as two for this model, and the machine is shared)."""
    return LabConfig(n_entities=60, methods=["ft", "cpl", "replay"], lrs=list(DEFAULT_LRS),
                     epochs=10, threads=1, xp_every=0)
