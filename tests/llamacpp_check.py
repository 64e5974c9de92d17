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
def gaps_to_argmax(model, prefix: list[int], tokens: list[int]) -> list[float]:
    """For each of ``tokens``, how far its logit lies below ``model``'s largest, given the same prefix."""
    ids = prefix + tokens
    logits = model(torch.tensor([ids])).logits[0, len(prefix) - 1 : len(ids) - 1].float()
    return (logits.max(-1).values - logits[torch.arange(len(tokens)), tokens]).tolist()


def check_in_llamacpp(
    gguf_file, template, tokenizer, model, question: str, n: int, tolerance: float
) -> list[int]:
    """llama.cpp's ids of kaika's prompt text are kaika's ids, and each of its greedy tokens (and its
    EOS, if it stops) is ``model``'s argmax given the same prefix, or within ``tolerance`` of it:
    where the two best logits are closer than the file's rounding moves them (measured by the export),
    a near-tie may go either way, and from there the continuations part. Returns llama.cpp's tokens."""
    llm = llama(gguf_file)
    want = prompt_ids(template, tokenizer, [{"role": "user", "content": question}])
    text = tokenizer.decode(want, skip_special_tokens=True)
    assert llm.tokenize(text.encode(), add_bos=True, special=True) == want
    got = llamacpp_greedy(llm, want, n)
    stopped = [tokenizer.eos_token_id] if len(got) < n else []
    gaps = gaps_to_argmax(model, want, got + stopped)
    assert max(gaps) <= tolerance, f"llama.cpp's tokens {got + stopped} lie {gaps} below the argmax"
    return got
