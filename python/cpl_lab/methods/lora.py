"""LoRA (peft) on every linear layer of the model: the parameter-efficient baseline."""
from __future__ import annotations

from .. import optimizers
from .base import Context, Method, trainable


class LoRA(Method):
    """Adapters start at B = 0 and learn from a small gradient, so LoRA is usually trained at a
    larger rate than full fine-tuning: it trains at lr x --lora-lr-scale (the cell keeps the grid's
    lr as its name, so the budgeted metric still picks over the same grid)."""
    name = "lora"

    def __init__(self, model, ctx: Context):
        from peft import LoraConfig, get_peft_model
        config = LoraConfig(r=ctx.cfg.lora_r, lora_alpha=ctx.cfg.lora_alpha, lora_dropout=0.0,
                            target_modules="all-linear", task_type="CAUSAL_LM")
        super().__init__(get_peft_model(model, config), ctx)
        self.opt = optimizers.plain(trainable(self.model), ctx.lr * ctx.cfg.lora_lr_scale, ctx.cfg)

    def step(self, batch):
        loss = self.backward(batch)
        self.opt.step()
        return loss
