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


class Unlabelled(Tokens):
    """Causal-LM data as it usually comes: input ids only, the collator adds the labels."""

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


class LabellingCollator:
    """A Trainer data collator that adds labels (as DataCollatorForLanguageModeling(mlm=False) does)."""

    def __init__(self):
        self.keys_seen = []

    def __call__(self, features):
        batch = transformers.default_data_collator(features)
        batch["labels"] = batch["input_ids"].clone()
        self.keys_seen.append(sorted(batch))
        return batch


class LogRecorder(transformers.TrainerCallback):
    """Stands where the Trainer's reporters (TensorBoard, W&B) stand: before user callbacks."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def trainer_for(model, opt, callback, tmp_path, epochs=2, train_dataset=None, callbacks=(), **overrides):
    settings = dict(output_dir=str(tmp_path), num_train_epochs=epochs, per_device_train_batch_size=4,
                    use_cpu=True, report_to="none", save_strategy="no", logging_strategy="no",
                    disable_tqdm=True, dataloader_num_workers=0, max_grad_norm=0.0)
    collator = overrides.pop("data_collator", None)
    args = transformers.TrainingArguments(**{**settings, **overrides})
    return transformers.Trainer(model=model, args=args, train_dataset=train_dataset or Tokens(8, seed=1),
                                data_collator=collator, optimizers=(opt, None),
                                callbacks=[*callbacks, callback])


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


def test_default_collator_is_the_trainers(tmp_path):
    model = tiny_llama()
    opt = CPLAdamW(model.parameters(), lr=1e-3)
    collator = LabellingCollator()
    callback = CPLReferenceCallback(Unlabelled(4, seed=2), batch_size=2)
    trainer_for(model, opt, callback, tmp_path, epochs=1, train_dataset=Unlabelled(8, seed=1),
                data_collator=collator).train()
    assert [step for step, _ in callback.rebuilds] == [0] and opt.has_reference
    # 2 mastered batches, then 2 training batches: all collated by the Trainer's collator.
    assert collator.keys_seen == [["input_ids", "labels"]] * 4


def test_unlabelled_batches_outside_a_trainer_say_what_collated_them():
    model = tiny_llama()
    opt = CPLAdamW(model.parameters(), lr=1e-3)
    callback = CPLReferenceCallback(Unlabelled(2, seed=2))
    with pytest.raises(TypeError, match=r"loss is None: the mastered batches \(keys \['input_ids'\], "
                                        r"collated by default_data_collator\) carry no labels"):
        callback.rebuild(model, opt)
    assert not opt.has_reference and all(p.grad is None for p in model.parameters())


def test_frozen_fraction_and_reference_time_reach_the_reporters(tmp_path):
    model = tiny_llama()
    opt = CPLAdamW(model.parameters(), lr=1e-3, criterion="gradient")
    recorder = LogRecorder()
    callback = CPLReferenceCallback(Tokens(8, seed=2), every_n_steps=1, sample_batches=1, batch_size=2)
    trainer = trainer_for(model, opt, callback, tmp_path, epochs=1, callbacks=[recorder],
                          logging_strategy="steps", logging_steps=1)
    trainer.train()
    step_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert len(step_logs) == 2
    for logs, fraction in zip(step_logs, callback.frozen_fractions):
        assert logs["cpl/frozen_fraction"] == fraction and 0 < fraction < 1
        assert logs["cpl/reference_s"] > 0
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["cpl/frozen_fraction"] for entry in history] == callback.frozen_fractions


def test_sample_batches_draws_a_fresh_seeded_sample_each_rebuild(tmp_path):
    mastered = Tokens(16, seed=2)
    rows = {tuple(r.tolist()): i for i, r in enumerate(mastered.ids)}

    def run(seed):
        seen = []

        def loss_fn(m, batch):
            seen.append([rows[tuple(r.tolist())] for r in batch["input_ids"]])
            return m(**batch).loss

        model = tiny_llama()
        opt = CPLAdamW(model.parameters(), lr=1e-3)
        callback = CPLReferenceCallback(mastered, loss_fn=loss_fn, every_n_steps=1, sample_batches=1,
                                        batch_size=3, seed=seed)
        trainer_for(model, opt, callback, tmp_path, epochs=2).train()
        assert [step for step, _ in callback.rebuilds] == [0, 1, 2, 3]
        return seen

    first = run(seed=5)
    assert len(first) == 4 and all(len(set(sample)) == 3 for sample in first)  # 1 batch of 3 distinct rows
    assert len({tuple(sample) for sample in first}) == 4  # a fresh sample at every rebuild
    assert run(seed=5) == first and run(seed=6) != first


def test_sample_batches_from_a_dataloader_takes_the_next_batches():
    model = tiny_llama()
    opt = CPLAdamW(model.parameters(), lr=1e-3)
    seen = []

    def loss_fn(m, batch):
        seen.append(batch["input_ids"][:, 0].tolist())
        return m(**batch).loss

    loader = torch.utils.data.DataLoader(Tokens(3, seed=2), batch_size=1,
                                         collate_fn=transformers.default_data_collator)
    callback = CPLReferenceCallback(loader, loss_fn=loss_fn, sample_batches=2)
    for _ in range(3):
        callback.rebuild(model, opt)
    firsts = [row for batch in seen for row in batch]
    assert firsts == [loader.dataset.ids[i % 3, 0].item() for i in range(6)]  # cycled over passes


@pytest.mark.parametrize("kwargs, message", [
    (dict(sample_batches=0), "sample_batches must be an integer >= 1"),
    (dict(every_n_steps=0), "every_n_steps must be an integer >= 1"),
])
def test_constructor_checks(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CPLReferenceCallback(Tokens(2, seed=2), **kwargs)
    loader = torch.utils.data.DataLoader(Tokens(2, seed=2))
    with pytest.raises(ValueError, match="apply to a dataset"):
        CPLReferenceCallback(loader, batch_size=2)
