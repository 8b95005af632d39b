"""CPLReferenceCallback inside a real transformers Trainer (tiny random Llama, CPU, no network)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from cpl_kernels import CPLAdamW  # noqa: E402
from cpl_kernels.integrations.hf_trainer import CPLReferenceCallback  # noqa: E402


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, 64, (n, 8), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(config)


def trainer_for(model, opt, callback, tmp_path, epochs=2):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=4, use_cpu=True,
        report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, max_grad_norm=0.0)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(8, seed=1),
                                optimizers=(opt, None), callbacks=[callback])


def test_reference_rebuilt_each_epoch(tmp_path):
    model = tiny_llama()
    opt = CPLAdamW(model.parameters(), lr=1e-3)
    callback = CPLReferenceCallback(Tokens(4, seed=2), batch_size=2)
    before = [p.detach().clone() for p in model.parameters()]
    trainer_for(model, opt, callback, tmp_path).train()
    assert [step for step, _ in callback.rebuilds] == [0, 2]  # epoch begins: 8 examples / batch 4 = 2 steps
    assert opt.has_reference
    assert len(callback.frozen_fractions) == 4 and all(f > 0 for f in callback.frozen_fractions)
    assert opt.frozen_fraction > 0
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert all(p.grad is None for p in model.parameters())


def test_reference_every_n_steps_with_custom_loss(tmp_path):
    model = tiny_llama()
    opt = CPLAdamW(model.parameters(), lr=1e-3)
    calls = []

    def loss_fn(m, batch):
        calls.append(batch["input_ids"].shape)
        return m(**batch).loss

    mastered = torch.utils.data.DataLoader(Tokens(2, seed=3), batch_size=2, collate_fn=transformers.default_data_collator)
    callback = CPLReferenceCallback(mastered, loss_fn=loss_fn, every_n_steps=1)
    trainer_for(model, opt, callback, tmp_path, epochs=1).train()
    assert [step for step, _ in callback.rebuilds] == [0, 1] and len(calls) == 2


def test_callback_refuses_a_plain_optimizer(tmp_path):
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="needs a CPL optimizer"):
        trainer_for(model, opt, CPLReferenceCallback(Tokens(2, seed=2)), tmp_path, epochs=1).train()
