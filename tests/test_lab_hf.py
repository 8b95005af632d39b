"""A local Hugging Face checkpoint (model folder + fast tokenizer) goes through the lab's HF path
offline: loading, prompt/answer encoding with and without a chat template, scoring."""
import re

import pytest

from cpl_lab.codec import HFCodec
from cpl_lab.config import LabConfig
from cpl_lab.data import encode
from cpl_lab.evaluate import batch_loss, score
from cpl_lab.items import Item
from cpl_lab.models import ModelError, load_hf, tiny_llama

WORDS = ["[PAD]", "[UNK]", "<s>", "</s>", "question:", "answer:", "where", "does", "bob", "live",
         "?", "paris", "lima", "a", "b", "c", "d", "user", "assistant"]


def make_checkpoint(path, chat: bool):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   bos_token="<s>", eos_token="</s>")
    if chat:
        fast.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                              "{% if add_generation_prompt %}assistant {% endif %}")
    fast.save_pretrained(path)
    cfg = LabConfig(hidden=16, layers=1, heads=2, intermediate=32)
    tiny_llama(cfg, len(WORDS), seed=0).save_pretrained(path)
    return path


@pytest.mark.parametrize("chat", [False, True])
def test_local_checkpoint(tmp_path, chat):
    loaded = load_hf(str(make_checkpoint(tmp_path / "ckpt", chat)), "cpu")
    codec = loaded.codec
    assert isinstance(codec, HFCodec) and codec.chat == chat
    prompt_ids, answer_ids = codec.encode("where does bob live ?", "paris")
    assert answer_ids == [WORDS.index("paris")]
    assert len(prompt_ids) >= 5
    items = [Item("gen", ("where does bob live ?",), "paris"),
             Item("mc", ("where does bob live ? a paris b lima",), "B", ("A", "B"))]
    gen = encode(items, [0], codec)
    mc = encode(items, [1], codec)
    assert mc.options.tolist() == [[WORDS.index("a"), WORDS.index("b")]]
    for enc in (gen, mc):
        correct, loss = score(loaded.model, enc)
        assert correct.shape == (1,) and loss.item() > 0
        assert batch_loss(loaded.model, enc).requires_grad


def test_missing_checkpoint_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        load_hf(str(tmp_path / "nope"), "cpu")


def test_truncated_config_names_the_file(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", chat=False)
    config = ckpt / "config.json"
    config.write_text(config.read_text()[:40])  # an interrupted copy
    with pytest.raises(ModelError) as err:
        load_hf(str(ckpt), "cpu")
    assert str(err.value).startswith(f"{config}: not valid JSON"), err.value


def test_missing_weights_is_a_model_error(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", chat=False)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ModelError, match=re.escape(f"--model {ckpt}: cannot load it")):
        load_hf(str(ckpt), "cpu")
