"""Token ids from the converted GGUF equal the HF `tokenizers` ids; specials, stops and template survive."""
from __future__ import annotations

import gguf
import llama_cpp
import pytest
from tiny_checkpoint import CHATML_TEMPLATE, LABEL_WORDS, SPECIAL_TOKENS, TinySpec, build_tiny_checkpoint
from tokenizers import Tokenizer

from edge.convert.pipeline import ConvertRequest, run_conversion

TEXTS = [
    "Hello! How are you today?",
    "The service was terrible and the food was cold.",
    "我今天很开心，因为天气很好。",
    "这部电影还可以，没什么特别的。",
    "Mixed 中英文 text: 产品 great, 100% 喜欢!",
    "  spaces   and\ttabs\n\nnew lines\r\n",
    "Don't you'll we've I'M",
    "数字 2024年3月14日 3.14159",
    "emoji 🙂 and ünïcödé",
    "Positive Negative Neutral 正面 负面 中性",
]


@pytest.fixture(scope="module")
def vocab_llm(tiny_gguf):
    llm = llama_cpp.Llama(str(tiny_gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_hf_dir):
    return Tokenizer.from_file(str(tiny_hf_dir / "tokenizer.json"))


@pytest.mark.parametrize("text", TEXTS)
def test_token_ids_match_hf_tokenizer(vocab_llm, hf_tokenizer, text):
    want = hf_tokenizer.encode(text, add_special_tokens=False).ids
    assert vocab_llm.tokenize(text.encode(), add_bos=False, special=False) == want
    assert vocab_llm.detokenize(want).decode() == text


def test_chatml_specials_are_single_control_tokens(vocab_llm, hf_tokenizer):
    text = "<|im_start|>system\nYou are a helpful assistant<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
    ids = vocab_llm.tokenize(text.encode(), add_bos=False, special=True)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False).ids
    for token in SPECIAL_TOKENS:
        assert ids.count(hf_tokenizer.token_to_id(token)) == text.count(token)
    # without special parsing the same text is plain text
    assert hf_tokenizer.token_to_id("<|im_start|>") not in vocab_llm.tokenize(text.encode(), add_bos=False, special=False)


def test_label_words_are_whole_tokens(vocab_llm):
    for word in LABEL_WORDS:
        assert len(vocab_llm.tokenize(word.encode(), add_bos=False, special=False)) == 1, word


def test_metadata_stop_tokens_and_template(tiny_gguf, vocab_llm, hf_tokenizer):
    fields = gguf.GGUFReader(tiny_gguf).fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert value("tokenizer.ggml.model") == "gpt2"
    assert value("tokenizer.ggml.pre") == "qwen2"
    assert value("tokenizer.chat_template") == CHATML_TEMPLATE
    ids = {t: hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS}
    assert value("tokenizer.ggml.eos_token_id") == ids["<|im_end|>"]
    assert value("tokenizer.ggml.eot_token_id") == ids["<|im_end|>"]
    assert value("tokenizer.ggml.padding_token_id") == ids["<|endoftext|>"]
    assert value("tokenizer.ggml.add_bos_token") is False
    types = value("tokenizer.ggml.token_type")
    assert all(types[i] == gguf.TokenType.CONTROL for i in ids.values())
    assert types[-1] == gguf.TokenType.UNUSED  # padding rows past the tokenizer
    assert value("qwen2.context_length") >= 4096
    vocab = vocab_llm._model.vocab
    for token in ("<|endoftext|>", "<|im_end|>"):
        assert llama_cpp.llama_vocab_is_eog(vocab, ids[token]), token
    assert not llama_cpp.llama_vocab_is_eog(vocab, ids["<|im_start|>"])


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<|im_end|>"])
def test_both_qwen15_eos_choices_end_generation(tmp_path, eos):
    ck = build_tiny_checkpoint(tmp_path / "hf", TinySpec(eos_token=eos, tokenizer_files="vocab_merges"))
    run_conversion(ConvertRequest(out_dir=tmp_path / "out", from_dir=ck.path, name="e", types=("f32",)))
    path = tmp_path / "out" / "e-f32.gguf"
    hf = Tokenizer.from_file(str(build_tiny_checkpoint(tmp_path / "hf_json", TinySpec()).path / "tokenizer.json"))
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    try:
        assert gguf.GGUFReader(path).fields["tokenizer.ggml.eos_token_id"].contents() == hf.token_to_id(eos)
        for token in ("<|endoftext|>", "<|im_end|>"):
            assert llama_cpp.llama_vocab_is_eog(llm._model.vocab, hf.token_to_id(token))
        for text in TEXTS[:5]:  # vocab.json + merges.txt give the same ids as tokenizer.json
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == hf.encode(text).ids
    finally:
        llm.close()
