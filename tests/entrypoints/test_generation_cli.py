"""Generation through the CLI (`hyprec generate`, `hyprec chat`) and the chat template, on a tiny random Llama
with a real word-level tokenizer and a Jinja chat template (the ``tiny_dir`` fixture, tests/conftest.py)."""

from __future__ import annotations

import io

import pytest
import torch

from hyprec import LLM, SamplingParams
from hyprec.entrypoints.cli import main
from tests.helpers import CHAT_WORDS as WORDS

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir, dtype="float32", max_model_len=64, num_kv_blocks=16)


def test_prompts_are_tokenized_with_bos(llm):
    tok = llm.engine.tokenizer
    assert tok.encode("w1 w2") == [1, WORDS.index("w1"), WORDS.index("w2")]
    assert tok.eos_token_ids >= {2, WORDS.index("<|end|>")}  # EOS and the end-of-turn token stop generation


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "w3 w4"}]
    rendered = llm.engine.tokenizer.apply_chat_template(messages)
    assert rendered == "<s><|user|> w3 w4 <|end|> <|assistant|> "
    chat = llm.chat(messages, SamplingParams(temperature=0, max_tokens=6))[0]
    plain = llm.generate(
        {"prompt_token_ids": llm.engine.tokenizer.encode_chat(messages)}, SamplingParams(temperature=0, max_tokens=6)
    )[0]
    assert chat.prompt_token_ids[:2] == [1, WORDS.index("<|user|>")]  # one BOS, from the template
    assert chat.outputs[0].token_ids == plain.outputs[0].token_ids


def test_cli_generate_prints_the_completion(llm, tiny_dir, capsys):
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = llm.generate("w5 w6 w7", params)[0].outputs[0].text
    assert (
        main(
            [
                "-q",
                "generate",
                "w5 w6 w7",
                "--model",
                str(tiny_dir),
                "--dtype",
                "float32",
                "--max-tokens",
                "8",
                "--max-model-len",
                "64",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == expected + "\n"


def test_cli_chat_reads_turns_from_stdin(llm, tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("w8 w9\n\nw10\n/exit\nw11\n"))
    assert (
        main(
            ["-q", "chat", "--model", str(tiny_dir), "--dtype", "float32", "--max-tokens", "4", "--max-model-len", "64"]
        )
        == 0
    )
    replies = capsys.readouterr().out.splitlines()
    assert len(replies) == 2  # two user turns before /exit; the blank line is skipped
    params = SamplingParams(temperature=0, max_tokens=4)
    first = llm.chat([{"role": "user", "content": "w8 w9"}], params)[0].outputs[0].text.strip()
    assert replies[0] == first


def test_cli_generate_on_an_embedding_model_is_a_clear_error(capsys):
    assert main(["-q", "generate", "hi", "--model", "minilm"]) == 2
    assert "embedding model" in capsys.readouterr().err


def test_decoder_embed_is_last_token_pooling(llm, tiny_dir):
    from transformers import LlamaModel

    ref_model = LlamaModel.from_pretrained(tiny_dir).eval()
    texts = ["w1 w2 w3", "w4"]
    ours = llm.embed(texts)
    with torch.inference_mode():
        ref = [ref_model(torch.tensor([llm.engine.tokenizer.encode(t)])).last_hidden_state[0, -1] for t in texts]
    ref = torch.nn.functional.normalize(torch.stack(ref), dim=1).numpy()
    # Unit vectors from two float32 implementations that differ only in summation order: n u per sum of n <= 64
    # terms (u = 2^-24), for each of the 2 layers plus the embeddings, x4 for the RMS norms' rescaling.
    assert abs(ours - ref).max() <= 4 * (2 + 1) * 64 * 2**-24
