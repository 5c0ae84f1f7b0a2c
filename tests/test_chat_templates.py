"""tokenizer.json folders in Llama 3's and Qwen2's style (byte-level BPE,
their special tokens, BOS added or not, their chat templates) against
transformers' own tokenizer on the same files: the same ids for text, the
same rendered chat and the same chat ids."""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import SHARED

pytest.importorskip("tokenizers")
transformers = pytest.importorskip("transformers")

from pcasurgery import LlamaModel  # noqa: E402
from pcasurgery.config import LlamaConfig  # noqa: E402
from pcasurgery.tokenizers import HFTokenizer, load_hf_tokenizer, render_chat  # noqa: E402

# Meta-Llama-3-8B-Instruct's template; Qwen2's ChatML (with its default
# system prompt); Mistral-7B-Instruct-v0.1's, which refuses a system turn
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim "
    "+ '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
    "(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
    "user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant "
    "roles are supported!') }}{% endif %}{% endfor %}")

STYLES = {
    # special tokens, bos_token, eos_token, BOS by post-processor, template
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>", "<|eot_id|>", True,
               LLAMA3_TEMPLATE),
    "qwen2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None, "<|im_end|>", False,
              CHATML_TEMPLATE),
}
TEXTS = ["Hello world", "It is a truth universally acknowledged, that a single man",
         "Zoë's café — 東京 🎉!", "  two spaces\tand a tab\n\nnewlines",
         "<|im_start|>user\nhi<|im_end|>"]


def write_tokenizer(folder, style: str):
    """A byte-level BPE tokenizer.json trained on Austen, with the style's
    special tokens, and its tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials, bos, eos, adds_bos, template = STYLES[style]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    text = (SHARED / "data" / "austen" / "persuasion.txt").read_text()[:200_000]
    tk.train_from_iterator([text], trainer)
    if adds_bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tk.token_to_id(bos))])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "chat_template": template, "model_max_length": 256}))
    return tk


@pytest.mark.parametrize("style", list(STYLES))
def test_ids_and_chat_match_transformers(tmp_path, style):
    from transformers import AutoTokenizer

    tk = write_tokenizer(tmp_path, style)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    ours = load_hf_tokenizer(tmp_path, bos_id=tk.token_to_id("<|endoftext|>") or 0, eos_id=0)
    assert isinstance(ours, HFTokenizer)
    assert ours.add_bos == STYLES[style][3]
    assert ours.eos_id == tk.token_to_id(STYLES[style][2])
    for text in TEXTS:
        assert ours.encode(text, bos=True) == ref(text)["input_ids"], text
        assert ours.encode(text, bos=False) == ref(text, add_special_tokens=False)["input_ids"]
    msgs = [{"role": "user", "content": "What is the weather like?"}]
    want_text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert render_chat(ours.chat_template, msgs, bos_token=ref.bos_token or "",
                       eos_token=ref.eos_token) == want_text
    # the model's chat prompt: the rendered text tokenized as transformers does
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, vocab_size=ours.vocab_size,
                      max_position_embeddings=64)
    from pcasurgery.config import expected_shapes

    rng = np.random.default_rng(0)
    m = LlamaModel(cfg, {n: rng.standard_normal(s).astype(np.float32)
                         for n, s in expected_shapes(cfg).items()}, ours)
    want_ids = ref(want_text, add_special_tokens=not want_text.startswith(ref.bos_token or "\0"))
    assert m._chat_ids("What is the weather like?") == want_ids["input_ids"]


def test_mistral_template_errors_are_one_line():
    with pytest.raises(ValueError, match="the chat template failed: Conversation roles must alternate"):
        render_chat(MISTRAL_TEMPLATE, [{"role": "system", "content": "x"}], bos_token="<s>")
    out = render_chat(MISTRAL_TEMPLATE, [{"role": "user", "content": "hi"}], bos_token="<s>")
    assert out == "<s>[INST] hi [/INST]"


def test_tokenizer_config_errors_name_the_file(tmp_path):
    write_tokenizer(tmp_path, "qwen2")
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, eos_token="<nope>")))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: eos_token '<nope>' is not in"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, chat_template=3)))
    with pytest.raises(ValueError, match="chat_template must be a string"):
        load_hf_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(dict(cfg, add_bos_token="yes")))
    with pytest.raises(ValueError, match="add_bos_token must be true or false"):
        load_hf_tokenizer(tmp_path)
    # a chat_template.jinja file wins over the config's template, as in transformers
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert load_hf_tokenizer(tmp_path).chat_template == "{{ messages[0]['content'] }}!"
