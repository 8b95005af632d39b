"""Pre-training the lab's tiny model on the group="pretrain" facts until it masters them.

This plays the part of the knowledge a real model brings: what it answers correctly afterwards is
the mastered set. Training stops as soon as `pretrain_target` of the facts are answered correctly
under every training phrasing (checked every few epochs), or after `pretrain_max_epochs`.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import LabConfig
from .data import encode
from .evaluate import batch_loss, item_correct, score
from .items import Item

CHECK_EVERY = 5  # epochs between accuracy checks (a check costs about one epoch of forwards)


def pretrain(model, codec, items: list[Item], cfg: LabConfig, progress: bool = True) -> dict:
    idx = [i for i, it in enumerate(items) if it.group == "pretrain"]
    if not idx:
        raise ValueError("no items to pre-train on (none has group='pretrain')")
    enc = encode(items, idx, codec, "train")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.pretrain_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(cfg.data_seed)
    model.train()
    acc, epoch = 0.0, 0
    bar = tqdm(total=cfg.pretrain_max_epochs, desc="pre-train", disable=not progress, leave=False)
    for epoch in range(1, cfg.pretrain_max_epochs + 1):
        total = 0.0
        for batch in enc.batches(cfg.pretrain_batch, gen):
            loss = batch_loss(model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(batch)
        bar.update(1)
        if epoch % CHECK_EVERY == 0 or epoch == cfg.pretrain_max_epochs:
            correct, _ = score(model, enc)
            acc = float(item_correct(enc, correct, len(items))[idx].float().mean())
            bar.set_postfix(loss=f"{total / len(enc):.3f}", mastered=f"{acc:.1%}")
            if acc >= cfg.pretrain_target:
                break
    bar.close()
    model.eval()
    return {"pretrain_epochs": epoch, "pretrain_accuracy": acc}
