"""The `cpl` command: `cpl inject` (the knowledge-injection experiment) and `cpl analyze`."""
from __future__ import annotations

import argparse
import os
import sys

# Before torch loads its OpenMP runtime: idle OpenMP threads otherwise spin, and on a shared
# 2-core machine a 2-thread step of the tiny model took 3.3 s instead of 0.07 s (measured).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from .config import METHOD_HELP, METHODS, OPTIMIZERS, LabConfig, demo_config  # noqa: E402

# flag -> (config field, type, help). Defaults shown in --help are the LabConfig defaults.
_D = LabConfig()
DATA = [
    ("--data", "data", str, "JSONL file: {\"question\",\"label\"} (multiple choice, the paper's) or "
     "{\"question\",\"answer\"} (generative); optional \"paraphrase\" for cross-prompt tests. "
     "Default: the embedded synthetic facts"),
    ("--entities", "n_entities", int, f"synthetic facts: made-up entities (default {_D.n_entities})"),
    ("--relations", "relations", int, f"synthetic facts: relations per entity, 1-6 (default {_D.relations})"),
    ("--train-templates", "train_templates", int, "synthetic facts: question templates used in "
     f"training, 1-3; one more per relation is held out (default {_D.train_templates})"),
    ("--data-seed", "data_seed", int, f"seed of the facts, the lab model's init and the split (default {_D.data_seed})"),
]
MODEL = [
    ("--model", "model", str, "local Hugging Face causal-LM folder (offline; chat template used "
     "when the tokenizer has one). Default: the lab's tiny Llama, pre-trained here and cached"),
    ("--hidden", "hidden", int, f"tiny Llama hidden size (default {_D.hidden})"),
    ("--layers", "layers", int, f"tiny Llama layers (default {_D.layers})"),
    ("--heads", "heads", int, f"tiny Llama attention heads (default {_D.heads})"),
    ("--intermediate", "intermediate", int, f"tiny Llama MLP size (default {_D.intermediate})"),
    ("--pretrain-lr", "pretrain_lr", float, f"pre-training AdamW lr (default {_D.pretrain_lr:g})"),
    ("--pretrain-batch", "pretrain_batch", int, f"pre-training batch size (default {_D.pretrain_batch})"),
    ("--pretrain-max-epochs", "pretrain_max_epochs", int, f"pre-training epoch cap (default {_D.pretrain_max_epochs})"),
    ("--pretrain-target", "pretrain_target", float, "stop pre-training once this fraction of its "
     f"facts is answered correctly (default {_D.pretrain_target:g})"),
    ("--n-mastered", "n_mastered", int, "cap on mastered questions (halved into in-set/out-of-set); default all"),
    ("--n-inject", "n_inject", int, "cap on injection questions; default all"),
]
INJECT = [
    ("--methods", "methods", str, "comma list of " + ", ".join(METHODS) + f" (default {','.join(_D.methods)})"),
    ("--lrs", "lrs", str, "comma list of learning rates; the budgeted metric picks the best (lr, "
     f"epoch) point of each method (default {','.join(f'{x:g}' for x in _D.lrs)})"),
    ("--seeds", "seeds", str, "comma list of seeds (batch order, sampled batches, masks; default 0)"),
    ("--optimizer", "optimizer", str, f"one of {', '.join(OPTIMIZERS)} (default {_D.optimizer}); "
     "momentum = SGD with --momentum; adamw8bit = AdamW with 8-bit blockwise m, v (cpl_kernels.CPLAdamW8bit)"),
    ("--epochs", "epochs", int, f"injection epochs (default {_D.epochs})"),
    ("--batch-size", "batch_size", int, f"injection batch size (default {_D.batch_size})"),
    ("--weight-decay", "weight_decay", float, f"AdamW weight decay (default {_D.weight_decay:g})"),
    ("--momentum", "momentum", float, f"SGD momentum for --optimizer momentum (default {_D.momentum:g})"),
    ("--reference", "reference", str, "CPL reference schedule: 'step' (fresh mastered in-set batch "
     "every step) or 'epoch' (whole mastered in-set at each epoch start, the paper's) "
     f"(default {_D.reference})"),
    ("--criterion", "criterion", str, "CPL test: 'gradient' (g*r >= 0, before the state update) or "
     f"'update' (u*r >= 0, the paper's table) (default {_D.criterion})"),
    ("--ref-batch", "ref_batch", int, "rows per mastered batch (per-step reference, A-GEM, replay, "
     f"surgery) (default {_D.ref_batch})"),
    ("--ref-every", "ref_every", int, "CPL with --reference step: rebuild the reference every N "
     f"steps, keeping the last one in between (default {_D.ref_every})"),
    ("--random-frac", "random_frac", float, "frozen fraction of the 'random' method; default: CPL's, "
     "epoch by epoch, from the same lr and seed"),
    ("--lora-r", "lora_r", int, f"LoRA rank (default {_D.lora_r})"),
    ("--lora-alpha", "lora_alpha", int, f"LoRA alpha (default {_D.lora_alpha})"),
    ("--lora-lr-scale", "lora_lr_scale", float, "LoRA trains at lr x this (adapters start at zero "
     f"and want a larger rate; default {_D.lora_lr_scale:g}, from a sweep in docs/lab.md)"),
    ("--ewc-lambda", "ewc_lambda", float, "EWC penalty strength lambda in lambda/2 * sum F "
     f"(theta - theta0)^2 (default {_D.ewc_lambda:g}, from a sweep in docs/lab.md)"),
    ("--mofo-alpha", "mofo_alpha", float, "fraction of each tensor mofo and cpl-mofo update per step, "
     f"by largest |momentum| (default {_D.mofo_alpha:g}, the MoFO authors'; norms and biases: all)"),
    ("--eval-every", "eval_every", int, f"measure every N epochs (default {_D.eval_every}); the last always"),
    ("--xp-every", "xp_every", int, "measure the held-out templates (xp columns) every N "
     f"measurements; 0: at the last epoch only (default {_D.xp_every}); they cost half as much again"),
    ("--forget-budget", "forget_budget", float, "budgeted metric: most facts learned while forgetting "
     f"at most this fraction of the mastered facts (default {_D.forget_budget:g}; 0 and 0.05 are "
     "always reported too)"),
    ("--device", "device", str, f"torch device (default {_D.device})"),
    ("--threads", "threads", int, f"torch CPU threads (default {_D.threads})"),
]
_LISTS = {"methods": str, "lrs": float, "seeds": int}


def _add(parser, title, specs):
    group = parser.add_argument_group(title)
    for flag, dest, typ, text in specs:
        metavar = "A,B,..." if dest in _LISTS else {int: "N", float: "X"}.get(typ, dest.upper())
        group.add_argument(flag, dest=dest, type=str if dest in _LISTS else typ, default=None,
                           metavar=metavar, help=text)


def _common(p):
    _add(p, "data", DATA)
    _add(p, "model and split", MODEL)
    p.add_argument("--cache-dir", help="where the pre-trained tiny model is cached, by config hash "
                   "(default $CPL_LAB_CACHE or ~/.cache/cpl_lab)")
    p.add_argument("--out", help="run folder (default runs/<command>-<time>); never overwritten")
    p.add_argument("--resume", action="store_true", help="continue the run in --out: completed "
                   "(method, lr, seed) cells are skipped; its configuration must match")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--demo", action="store_true", help="the embedded default sized for under 5 "
                   "minutes on 2 CPU cores: ft, cpl and replay at 3 lrs, 60 entities, one thread; "
                   "other options override it")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpl", description="Collaborative Parameter Learning lab: "
                                "inject knowledge into a language model and measure what it forgets.")
    sub = p.add_subparsers(dest="command", required=True)
    inj = sub.add_parser("inject", help="run methods x learning rates x seeds, write JSON/CSV/PNG",
                         description="Pre-injection test splits the questions into mastered (answered "
                         "right: halved into in-set, seen by the reference, and out-of-set) and "
                         "injection (answered wrong). Every method trains on the injection set with "
                         "the same batches and budget; learned/forgotten are measured per epoch, also "
                         "on held-out question templates (xp = cross-prompt).",
                         epilog="methods:\n" + "\n".join(f"  {k:<12} {v}" for k, v in METHOD_HELP.items())
                         + "\n\nexample: cpl inject --demo --methods ft,cpl,replay,agem,lora,random,ewc,surgery "
                         "--seeds 0,1,2",
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(inj)
    _add(inj, "injection", INJECT)
    inj.add_argument("--soft", action="store_true", help="criterion 'gradient' with strict=False: "
                     "elements frozen this step may still move by momentum")
    inj.add_argument("--in-backward", action="store_true", help="ft and cpl step each parameter inside "
                     "backward as its gradient completes and free it (cpl_kernels.in_backward): the same "
                     "results, lower peak memory")
    ana = sub.add_parser("analyze", help="gradient similarity vs forgetting, per-layer conflict",
                         description="Per mastered question: cosine similarity of its gradient to the "
                         "mean injection gradient, against whether plain fine-tuning (same injection "
                         "options) then forgets it; and per layer, the fraction of elements whose "
                         "injection and mastered gradients conflict.")
    _common(ana)
    _add(ana, "injection (the fine-tuning run that decides what is forgotten)", INJECT)
    return p


def config_from(args) -> LabConfig:
    cfg = demo_config() if args.demo else LabConfig()
    for dest, cast in _LISTS.items():
        value = getattr(args, dest, None)
        if value is not None:
            setattr(args, dest, [cast(v) for v in value.split(",") if v.strip()])
    for key, value in vars(args).items():
        if value is not None and hasattr(cfg, key):
            setattr(cfg, key, value)
    if getattr(args, "soft", False):
        cfg.strict = False
    if getattr(args, "in_backward", False):
        cfg.in_backward = True
    return cfg.validate()


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        cfg = config_from(args)
    except ValueError as e:
        print(f"cpl: error: {e}", file=sys.stderr)
        return 2
    from .commands import analyze_command, inject_command
    from .formats import DataError
    from .runs import RunError
    try:
        if args.command == "inject":
            return inject_command(cfg, args)
        return analyze_command(cfg, args)
    except (DataError, RunError, FileNotFoundError, ValueError) as e:
        print(f"cpl: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
