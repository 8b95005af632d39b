"""Loss and correctness of encoded questions.

Correct, generative: every answer token is the argmax given the gold prefix (identical to greedy
decoding producing the answer). Correct, multiple choice: the right letter has the highest logit
among the option letters at the answer position. An item is correct when all its rows (all its
phrasings of one kind) are.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import Encoded


def answer_logits(model, batch: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits predicting the last K tokens [B, K, V], their labels [B, K]) with K = answer width.

    Left padding puts every answer at the end, so only K + 1 positions need the LM head."""
    k = batch.answer_width
    device = next(model.parameters()).device  # encoded sets live on the CPU
    mask = batch.attention_mask.to(device)
    # Left padding: positions count real tokens only, as if the row were unpadded.
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(input_ids=batch.input_ids.to(device), attention_mask=mask,
                position_ids=position_ids, logits_to_keep=k + 1)
    return out.logits[:, :-1].float(), batch.labels[:, -k:].to(device)


def per_row_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy on each row's answer tokens, [B]."""
    per_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=-100, reduction="none").view(labels.shape)
    valid = (labels != -100).float()
    return (per_tok * valid).sum(1) / valid.sum(1).clamp(min=1)


def batch_loss(model, batch: Encoded) -> torch.Tensor:
    """Mean over rows of the mean cross-entropy on each row's answer tokens."""
    return per_row_loss(*answer_logits(model, batch)).mean()


def _row_correct(logits, labels, batch: Encoded) -> torch.Tensor:
    if batch.options is not None:
        first = (labels != -100).float().argmax(1)  # first answer token of each row
        at = logits[torch.arange(len(batch), device=logits.device), first]  # [B, V]
        options, target = batch.options.to(logits.device), batch.target.to(logits.device)
        return at.gather(1, options).argmax(1) == target
    valid = labels != -100
    return ((logits.argmax(-1) == labels) | ~valid).all(1)


@torch.no_grad()
def score(model, enc: Encoded, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct [N] bool, loss [N]) for every row of enc."""
    was_training = model.training
    model.eval()
    correct, losses = [], []
    for batch in enc.batches(chunk):
        logits, labels = answer_logits(model, batch)
        correct.append(_row_correct(logits, labels, batch).cpu())
        losses.append(per_row_loss(logits, labels).cpu())
    model.train(was_training)
    if not correct:
        return torch.zeros(0, dtype=torch.bool), torch.zeros(0)
    return torch.cat(correct), torch.cat(losses)


def item_correct(enc: Encoded, row_correct: torch.Tensor, n_items: int) -> torch.Tensor:
    """[n_items] bool: True for items all of whose rows in enc are correct (and items absent)."""
    wrong = torch.zeros(n_items, dtype=torch.long)
    wrong.index_add_(0, enc.item, (~row_correct).long())
    return wrong == 0
