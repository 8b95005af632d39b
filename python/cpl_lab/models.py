"""Models: the lab's own tiny Llama (random init, pre-trained on the facts, cached on disk by
config hash) or any local Hugging Face causal-LM checkpoint. Nothing is ever downloaded."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .codec import HFCodec, WordCodec, WordTokenizer
from .config import LabConfig
from .items import Item

# Set before transformers is imported anywhere in the lab: a model path must never reach out.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class ModelError(ValueError):
    """A --model folder that cannot be loaded; the message names the folder or the file."""


@dataclass
class Loaded:
    model: torch.nn.Module
    codec: object
    info: dict  # what to report: parameter count, where it came from, pre-training stats


def default_cache_dir() -> Path:
    return Path(os.environ.get("CPL_LAB_CACHE", Path.home() / ".cache" / "cpl_lab"))


def _quiet_transformers() -> None:
    # transformers draws its own bars for loading/saving a 1-file checkpoint: noise next to ours.
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def tiny_llama(cfg: LabConfig, vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, num_key_value_heads=cfg.heads,
        max_position_embeddings=128, tie_word_embeddings=True, pad_token_id=0, bos_token_id=1,
        eos_token_id=1)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def load_hf(path: str, device: str) -> Loaded:
    """A local checkpoint folder (config.json + weights + tokenizer), strictly offline."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _quiet_transformers()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--model {path}: not a local folder (the lab never downloads)")
    _check_config(Path(path))
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError) as e:  # missing weights or tokenizer, unknown model type, ...
        raise ModelError(f"--model {path}: cannot load it: {' '.join(str(e).split())}") from None
    model.to(device)
    model.config.use_cache = False
    n = sum(p.numel() for p in model.parameters())
    return Loaded(model, HFCodec(tok), {"source": path, "params": n, "pretrained_by_lab": False})


def _check_config(path: Path) -> None:
    """config.json read here first: transformers reports a truncated one (an interrupted copy) as
    an OSError without where it breaks."""
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"--model {path}: no config.json, not a Hugging Face model folder")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ModelError(f"{config}: not UTF-8 text (--model {path})") from None
    except json.JSONDecodeError as e:
        raise ModelError(f"{config}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno}); "
                         f"truncated? (--model {path})") from None


def _items_digest(items: list[Item]) -> str:
    h = hashlib.sha256()
    for it in items:
        h.update(json.dumps([it.key, it.prompts, it.answer, it.options, it.heldout, it.group]).encode())
    return h.hexdigest()


def load_or_pretrain(cfg: LabConfig, items: list[Item], cache_dir: Path | None = None,
                     progress: bool = True, log=print) -> Loaded:
    """The lab's tiny Llama after pre-training on the group="pretrain" items.

    Cached under cache_dir/<hash of everything that decides the weights>; a second run with the
    same configuration loads it in a second instead of training again."""
    from transformers import LlamaForCausalLM
    from .pretrain import pretrain
    _quiet_transformers()
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cfg.digest(LabConfig.PRETRAIN_KEYS, _items_digest(items))
    entry = cache_dir / f"tiny-llama-{key}"
    if (entry / "meta.json").is_file():
        tok = WordTokenizer.load(entry / "vocab.json")
        model = LlamaForCausalLM.from_pretrained(entry, local_files_only=True)
        model.to(cfg.device)
        model.config.use_cache = False
        meta = json.loads((entry / "meta.json").read_text())
        log(f"model: cached tiny Llama {entry} ({meta['params']:,} params)")
        return Loaded(model, WordCodec(tok), dict(meta, cached=True))

    texts = [t for it in items for t in it.prompts + it.heldout + (it.answer,) + (it.options or ())]
    tok = WordTokenizer.from_texts(texts)
    model = tiny_llama(cfg, len(tok), seed=cfg.data_seed).to(cfg.device)
    n = sum(p.numel() for p in model.parameters())
    log(f"model: pre-training a tiny Llama ({n:,} params, vocab {len(tok)}) on "
        f"{sum(it.group == 'pretrain' for it in items)} facts (cached afterwards in {cache_dir})")
    t0 = time.perf_counter()
    stats = pretrain(model, WordCodec(tok), items, cfg, progress=progress)
    meta = {"source": "tiny-llama", "params": n, "vocab": len(tok), "pretrained_by_lab": True,
            "pretrain_seconds": round(time.perf_counter() - t0, 1), **stats}
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Written to a temporary folder and renamed: a crash never leaves a half-written entry that a
    # later run would trust.
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cache_dir))
    model.save_pretrained(tmp)
    tok.save(tmp / "vocab.json")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.replace(tmp, entry)
    except OSError:  # another process cached the same model meanwhile: theirs is as good
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"model: pre-trained in {meta['pretrain_seconds']} s, {stats['pretrain_epochs']} epochs, "
        f"{stats['pretrain_accuracy']:.1%} of its facts mastered")
    return Loaded(model, WordCodec(tok), dict(meta, cached=False))


def load_model(cfg: LabConfig, items: list[Item], cache_dir=None, progress=True, log=print) -> Loaded:
    if cfg.model:
        return load_hf(cfg.model, cfg.device)
    return load_or_pretrain(cfg, items, cache_dir, progress, log)
