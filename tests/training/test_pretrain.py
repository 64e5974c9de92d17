"""Packing invariants, document-isolated attention on BLOOM, and ``kaika pretrain`` end to end."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from helpers import build_model
from kaika.cli import main
from kaika.config import PretrainConfig
from kaika.data.packing import PackedCollator, block_causal_mask, enable_packed_attention, pack_documents
from kaika.data.tokenize import IGNORE_INDEX
from kaika.errors import KaikaError

EOS, PAD = 2, 3


def random_docs(seed: int, n: int, max_len: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(4, 100) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def segments(row):
    """Split a row into its segments by the restarts of position_ids."""
    out, cur = [], []
    for i, p in enumerate(row["position_ids"]):
        if p == 0 and cur:
            out.append(cur)
            cur = []
        cur.append(i)
    return [*out, cur]


@pytest.mark.parametrize("mode", ["document", "stream"])
@pytest.mark.parametrize(("seed", "cutoff"), [(0, 8), (1, 16), (2, 5), (3, 64)])
def test_packing_keeps_every_token_in_order_in_full_rows(seed, cutoff, mode):
    docs = random_docs(seed, 30, 25)
    rows = pack_documents(docs, cutoff, EOS, PAD, mode)
    stream = [t for d in docs for t in (*d, EOS)]
    assert all(len(r[k]) == cutoff for r in rows for k in ("input_ids", "labels", "position_ids"))
    flat = [t for r in rows for t in r["input_ids"]]
    assert flat[: len(stream)] == stream  # nothing lost, nothing reordered, EOS after every document
    assert flat[len(stream) :] == [PAD] * (len(flat) - len(stream))  # only the last row is filled
    assert len(rows) == -(-len(stream) // cutoff)


@pytest.mark.parametrize(("seed", "cutoff"), [(0, 8), (1, 16), (2, 5)])
def test_document_packing_marks_every_boundary(seed, cutoff):
    docs = random_docs(seed, 30, 25)
    rows = pack_documents(docs, cutoff, EOS, PAD, "document")
    pieces = []  # every segment of every row, as token lists
    for row in rows:
        for seg in segments(row):
            ids = [row["input_ids"][i] for i in seg]
            pos = [row["position_ids"][i] for i in seg]
            labels = [row["labels"][i] for i in seg]
            assert pos == list(range(len(seg)))
            # A segment holds at most one document: an EOS can only be its last token.
            assert EOS not in ids[:-1]
            # No target for a segment's first token (nothing of its own precedes it); all others are.
            assert labels[0] == IGNORE_INDEX
            if ids[0] != PAD:
                assert labels[1:] == ids[1:]
            else:
                assert set(labels) == {IGNORE_INDEX}
            pieces.append(ids)
    # Gluing the pieces back together at the row ends gives the documents: a document that
    # crosses a row boundary continues as the first segment of the next row.
    text = [t for p in pieces for t in p if t != PAD]
    assert text == [t for d in docs for t in (*d, EOS)]


def test_stream_packing_trains_on_every_token_across_documents():
    docs = random_docs(4, 10, 12)
    rows = pack_documents(docs, 16, EOS, PAD, "stream")
    for row in rows:
        real = [i for i, t in enumerate(row["input_ids"]) if t != PAD]
        assert [row["labels"][i] for i in real] == [row["input_ids"][i] for i in real]
    batch = PackedCollator("stream")(rows[:2])
    assert set(batch) == {"input_ids", "labels"}  # no positions: causal over the whole row


def test_block_causal_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    allowed = block_causal_mask(pos, torch.float32)[0, 0] == 0
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 1, 0, 0],
            [0, 0, 0, 1, 1, 0],
            [0, 0, 0, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(allowed, expected)


def packed_vs_alone(model, docs: list[list[int]]):
    """Logits and summed loss of ``docs`` packed in one row, and of each document run alone."""
    length = sum(len(d) + 1 for d in docs)
    (row,) = pack_documents(docs, length, EOS, PAD, "document")
    batch = PackedCollator("document")([row])
    packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0]
    alone, start = [], 0
    for d in docs:
        ids = torch.tensor([[*d, EOS]])
        alone.append((packed[start : start + ids.shape[1]], model(input_ids=ids).logits[0]))
        start += ids.shape[1]
    return batch, alone


@pytest.mark.parametrize("arch", ["bloom", "llama"])
@torch.no_grad()
def test_packed_forward_equals_each_document_alone(tmp_path, ja_tokenizer, arch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_model(arch, ja_tokenizer, tmp_path / arch)).eval()
    docs = [
        ja_tokenizer.encode(t)
        for t in (
            "吾輩は猫である。名前はまだ無い。",
            "親譲りの無鉄砲で小供の時から損ばかりしている。",
            "こんな夢を見た。",
        )
    ]
    enable_packed_attention(model)
    batch, alone = packed_vs_alone(model, docs)
    for got, want in alone:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The packed loss is the documents' losses together: boundaries carry no target.
    labels = batch["labels"]
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=labels)
    n_targets = int((labels[:, 1:] != IGNORE_INDEX).sum())
    summed = sum(
        model(input_ids=torch.tensor([[*d, EOS]]), labels=torch.tensor([[*d, EOS]])).loss * (len(d))
        for d in docs
    )
    torch.testing.assert_close(out.loss * n_targets, summed, rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_bloom_without_the_hooks_leaks_across_documents(tmp_path, ja_tokenizer):
    """Why the hooks exist: BLOOM ignores position_ids, so packing by positions alone mixes documents."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_model("bloom", ja_tokenizer, tmp_path / "b")).eval()
    docs = [ja_tokenizer.encode("吾輩は猫である。"), ja_tokenizer.encode("こんな夢を見た。")]
    _, alone = packed_vs_alone(model, docs)
    got, want = alone[1]
    assert (got - want).abs().max() > 1e-3


def test_bloom_alibi_restarts_per_document(tmp_path, ja_tokenizer):
    """The ALiBi tensor built for a packed row equals the one of each document alone, per segment."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_model("bloom", ja_tokenizer, tmp_path / "b"))
    enable_packed_attention(model)
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    heads = model.config.n_head
    packed = model.transformer.build_alibi_tensor(block_causal_mask(pos, torch.float32), heads, torch.float32)
    first = model.transformer.build_alibi_tensor(torch.ones(1, 4), heads, torch.float32)
    second = model.transformer.build_alibi_tensor(torch.ones(1, 3), heads, torch.float32)
    torch.testing.assert_close(packed, torch.cat([first, second], dim=-1))


# --------------------------------------------------------------------------- end to end

ARCH = {"n_layer": 2, "hidden_size": 64, "n_head": 4}


def corpus(tmp_path):
    from helpers import SEED_TASKS

    docs = [json.loads(line)["output"] for line in SEED_TASKS.read_text(encoding="utf-8").splitlines()]
    (tmp_path / "texts").mkdir()
    for i, d in enumerate(docs[:20]):  # .txt files in a directory: one document each
        (tmp_path / "texts" / f"{i:02d}.txt").write_text(d, encoding="utf-8")
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}, ensure_ascii=False) + "\n" for d in docs[20:60]))
    return tmp_path / "texts", jsonl


def pretrain_config(tmp_path, **kw) -> PretrainConfig:
    texts, jsonl = corpus(tmp_path)
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(ARCH))
    cfg = PretrainConfig()
    cfg.pretrain.data = [str(texts), str(jsonl)]
    cfg.pretrain.text_field = "body"
    cfg.pretrain.val_set_size = 6
    cfg.pretrain.cutoff_len = 64
    cfg.pretrain.from_scratch = str(arch)
    cfg.pretrain.vocab_size = 600
    cfg.train.output_dir = str(tmp_path / "run")
    cfg.train.batch_size, cfg.train.micro_batch_size = 8, 8
    cfg.train.lr, cfg.train.max_steps, cfg.train.logging_steps = 3e-3, 30, 5
    cfg.train.save_steps = cfg.train.eval_steps = 15
    for k, v in kw.items():
        setattr(cfg.pretrain, k, v)
    return cfg


@pytest.mark.slow
def test_pretrain_from_scratch_saves_verifies_and_reloads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kaika.training.pretrain import pretrain

    cfg = pretrain_config(tmp_path, save_dtype="float16")
    result = pretrain(cfg)
    out = result.output_dir
    for name in (
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "kaika_pretrain.yaml",
        "loss_curve.png",
    ):
        assert (out / name).is_file(), name
    report = json.loads((out / "pretrain_report.json").read_text())
    assert report["train"]["documents"] == 60 - 6
    assert result.global_step == 30 and result.tokens_seen > 0
    # Learned something: held-out perplexity well below the uniform guess over the vocabulary.
    assert result.heldout["perplexity"] < 0.5 * 600, result.heldout
    # Saved in fp16, and the reloaded model (plain transformers) is the trained one.
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 600 and tok.eos_token_id == 2
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("吾輩は猫である")])
    torch.testing.assert_close(reloaded(ids).logits, result.model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_pretrain_lora_on_a_base_then_resume(tmp_path, ja_tokenizer):
    from kaika.training.pretrain import pretrain

    base = build_model("bloom", ja_tokenizer, tmp_path / "base")
    cfg = pretrain_config(tmp_path, from_scratch=None)
    cfg.model.base_model = str(base)
    cfg.train.max_steps = 15
    first = pretrain(cfg)
    assert (first.output_dir / "adapter_model.safetensors").is_file()  # verified inside pretrain()
    cfg.train.max_steps, cfg.train.resume = 30, True
    second = pretrain(cfg)
    assert second.global_step == 30


def test_pretrain_cli_errors(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    assert main(["pretrain", "--data", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl, line 2: field 'text'" in err
    with pytest.raises(SystemExit) as exit_:  # a choice: refused by the option parser itself
        main(["pretrain", "--data", str(bad), "--packing", "mixed"])
    assert exit_.value.code == 2
    assert "invalid choice: 'mixed' (choose from 'document', 'stream')" in capsys.readouterr().err
    with pytest.raises(KaikaError, match="no training text"):
        from kaika.training.pretrain import pretrain

        pretrain(PretrainConfig())


# --------------------------------------------------------------------------- the shipped bloom-ja-tiny

# The opening of 『文鳥』 (Sōseki, 1908, public domain): one of the works held out of bloom-ja-tiny's training.
HELDOUT_SOSEKI = (
    "十月早稲田に移る。伽藍のような書斎にただ一人、片づけた顔を頬杖で支えていると、三重吉が来て、"
    "鳥を御飼いなさいと云う。飼ってもいいと答えた。しかし念のためだから、何を飼うのかねと聞いたら、"
    "文鳥ですと云う返事であった。"
)


@torch.no_grad()
def test_bloom_ja_tiny_is_shipped_in_git_and_pretrained():
    from safetensors import safe_open

    from kaika.config import ModelArgs
    from kaika.modeling.builtin import builtin_model_path
    from kaika.modeling.load import load_model, load_tokenizer, resolve_source

    path = builtin_model_path("bloom-ja-tiny")
    weights = path / "model.safetensors"
    assert weights.stat().st_size <= 25 * 2**20
    assert not weights.read_bytes()[:8].startswith(b"version ")  # real weights, not a Git LFS pointer
    with safe_open(weights, "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}  # noqa: SIM118
    card = (path / "README.md").read_text(encoding="utf-8")
    assert "kaika pretrain" in card and "perplexity" in card

    args = ModelArgs(base_model="bloom-ja-tiny")
    source = resolve_source(args)
    model, tok = load_model(args, source), load_tokenizer(args, source)

    def nll(text: str) -> tuple[float, float]:
        """Total negative log-likelihood (nats) of ``text``, and its per-token perplexity."""
        ids = torch.tensor([tok.encode(text)])
        loss = model(input_ids=ids, labels=ids).loss.item()
        return loss * (ids.shape[1] - 1), math.exp(loss)

    # Pretrained, not random: on prose it never saw it beats a uniform guess over its vocabulary
    # several times over, and it finds the real passage far likelier than the same characters
    # shuffled (total likelihood, so the different token counts do not matter).
    real_total, real_ppl = nll(HELDOUT_SOSEKI)
    chars = list(HELDOUT_SOSEKI)
    random.Random(0).shuffle(chars)
    shuffled_total, _ = nll("".join(chars))
    assert real_ppl < len(tok) / 4, real_ppl
    assert real_total < 0.8 * shuffled_total, (real_total, shuffled_total)
