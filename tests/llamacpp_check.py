"""llama.cpp (llama-cpp-python) against transformers on an exported GGUF file: same prompt ids, same
greedy tokens. Used by tests/inference/test_llamacpp.py and tests/modeling/test_real_models.py."""

from __future__ import annotations

import importlib.util

import torch

from kaika.data.segments import prompt_ids


def llama(path):
    assert importlib.util.find_spec("llama_cpp"), (
        "llama-cpp-python is not installed: run scripts/test-llamacpp.sh"
    )
    from llama_cpp import Llama

    return Llama(model_path=str(path), n_ctx=512, n_threads=2, seed=0, verbose=False)


def llamacpp_greedy(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
        if llm.token_eos() == token or len(out) == n:
            break
        out.append(token)
    return out


@torch.no_grad()
def transformers_greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n, eos_token_id=eos)[0]
    return [t for t in out[len(ids) :].tolist() if t != eos]


def check_in_llamacpp(gguf_file, template, tokenizer, model, question: str, n: int) -> list[int]:
    """llama.cpp's ids of kaika's prompt text are kaika's ids, and its greedy tokens are ``model``'s."""
    llm = llama(gguf_file)
    want = prompt_ids(template, tokenizer, [{"role": "user", "content": question}])
    text = tokenizer.decode(want, skip_special_tokens=True)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == want
    expected = transformers_greedy(model, want, n, tokenizer.eos_token_id)
    assert llamacpp_greedy(llm, want, n) == expected
    return expected
