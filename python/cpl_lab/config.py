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
    "random": "random mask re-drawn every step, frozen fraction matched to CPL's",
    "random-once": "random static mask with cpl-once's per-tensor sparsity, MaskedAdamW",
    "agem": "A-GEM: project the gradient when it conflicts with a mastered batch's",
    "replay": "each step also trains on a random batch of mastered in-set questions",
    "lora": "LoRA (peft) on every linear layer",
}
METHODS = tuple(METHOD_HELP)
OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclass
class LabConfig:
    # data: the embedded synthetic facts, or a JSONL file
    data: str | None = None
    n_entities: int = 100
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
    methods: list[str] = field(default_factory=lambda: ["ft", "cpl", "random", "replay"])
    lrs: list[float] = field(default_factory=lambda: [1e-3])
    seeds: list[int] = field(default_factory=lambda: [0])
    optimizer: str = "adamw"
    epochs: int = 20
    batch_size: int = 32
    weight_decay: float = 0.01
    momentum: float = 0.9
    reference: str = "step"       # "step": a fresh mastered batch per step; "epoch": whole in-set
    criterion: str = "gradient"
    strict: bool = True
    ref_batch: int = 32
    random_frac: float | None = None  # None: match the CPL cell of the same lr and seed
    lora_r: int = 8
    lora_alpha: int = 16
    eval_every: int = 1
    device: str = "cpu"
    threads: int = 2

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
        for name in ("epochs", "batch_size", "ref_batch", "eval_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        return self

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LabConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    # What decides the pre-trained model (and so its cache entry), nothing else.
    PRETRAIN_KEYS = ("data", "n_entities", "relations", "train_templates", "data_seed", "hidden",
                     "layers", "heads", "intermediate", "pretrain_lr", "pretrain_batch",
                     "pretrain_max_epochs", "pretrain_target")

    # What decides the results of a cell apart from (method, lr, seed): a resume must match these.
    RESULT_KEYS = PRETRAIN_KEYS + ("model", "n_mastered", "n_inject", "optimizer", "epochs",
                                   "batch_size", "weight_decay", "momentum", "reference",
                                   "criterion", "strict", "ref_batch", "random_frac", "lora_r",
                                   "lora_alpha", "eval_every")

    def digest(self, keys, extra: str = "") -> str:
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True) + extra
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def demo_config() -> LabConfig:
    """`cpl inject --demo`: the embedded default, sized to finish in minutes on 2 CPU cores.

    60 entities x 6 relations = 360 facts, half pre-trained: about 180 mastered and 170 to inject
    (the prototype had 300 + 300), 20 epochs of AdamW lr 1e-3, batch 32, as the prototype."""
    return LabConfig(n_entities=60)
