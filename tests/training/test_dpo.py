"""``kaika dpo`` on the builtin tiny BLOOM (fp32): the loss is DPO's formula of the four
log-probabilities, the reference is what it should be, a synthetic preference is learned by each
loss, and the saved adapter is one every other command takes.

The log-probabilities are computed here by hand (one sequence at a time, log-softmax of the
model's own logits), not with TRL's code, so the comparison checks TRL's wiring into kaika, not
TRL against itself. Tolerance 1e-4 relative: the same fp32 forward in a batch of 4 with padding
and alone differ by float rounding only (measured ~1e-6).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import run_kaika, seed_records, train_dtype, write_jsonl
from kaika.config import DpoConfig, TrainConfig
from kaika.data.preference import encode_pairs, load_pairs
from kaika.data.tokenize import resolve_pad_token
from kaika.modeling.load import load_model, load_tokenizer, resolve_source
from kaika.training import preference
from kaika.training.sft import train

CHOSEN, REJECTED = "はい、喜んでお手伝いします。", "No, I will not help."  # Japanese over English


def synthetic_pairs(n: int = 40) -> list[dict]:
    """Every prompt a seed task; the same Japanese answer preferred to the same English one."""
    return [
        {"instruction": r["instruction"], "chosen": CHOSEN, "rejected": REJECTED}
        for r in seed_records(n, 120)
    ]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", synthetic_pairs())


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A short SFT run (q and v slices of BLOOM's fused projection) whose adapter DPO continues."""
    out = tmp_path_factory.mktemp("sft") / "run"
    cfg = TrainConfig()
    cfg.model.dtype = "float32"
    cfg.data.data, cfg.data.cutoff_len = (
        [str(write_jsonl(out.parent / "sft.jsonl", seed_records(16, 120)))],
        128,
    )
    cfg.lora.qkv = ["q", "v"]
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.micro_batch_size, t.lr = str(out), 4, 8, 4, 1e-2
    train(cfg)
    return out


def dpo_config(data: Path, out: Path, **dpo) -> DpoConfig:
    cfg = DpoConfig()
    cfg.model.dtype = "float32"
    cfg.data.data, cfg.data.cutoff_len = [str(data)], 128
    t = cfg.train
    t.output_dir, t.batch_size, t.micro_batch_size, t.lr, t.logging_steps = str(out), 8, 4, 1e-3, 1
    cfg.dpo = replace(cfg.dpo, **dpo)
    return cfg


def built(cfg: DpoConfig):
    """The trainer ``kaika dpo`` builds, before it trains, and its encoded pairs."""
    out, run = preference.check_config(cfg)
    if run is not None:
        cfg = replace(cfg, model=preference.start_model_args(cfg.model, run))
    pairs, _ = preference.load_data(cfg)
    source = resolve_source(cfg.model)
    tokenizer = load_tokenizer(cfg.model, run.tokenizer_source if run else source)
    resolve_pad_token(tokenizer)
    template = preference.choose_template(cfg, run, tokenizer, pairs)
    rows, _ = encode_pairs(pairs, template, tokenizer, cfg.data.cutoff_len)
    model = preference.build_model(cfg, run, source)
    return preference.build_trainer(cfg, run, model, tokenizer, rows, []), rows, cfg


@torch.no_grad()
def answer_logps(model, rows: list[dict], side: str) -> torch.Tensor:
    """Sum of log p(answer token | everything before it), one unpadded sequence at a time."""
    out = []
    for row in rows:
        ids = torch.tensor([row["prompt_ids"] + row[f"{side}_ids"]])
        logp = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        start = len(row["prompt_ids"])
        targets = ids[0, start:]
        out.append(logp[start - 1 :].gather(1, targets[:, None]).sum())
    return torch.stack(out)


def test_dpo_loss_is_the_formula_and_the_reference_is_the_frozen_sft_adapter(sft_run, pairs_file, tmp_path):
    from peft import PeftModel

    trainer, rows, cfg = built(dpo_config(pairs_file, tmp_path / "dpo", from_run=str(sft_run)))
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"}  # one base, two adapters
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)  # the reference copy is frozen
    with torch.no_grad():  # move the policy away from the reference, as training would
        torch.manual_seed(0)
        for name, p in model.named_parameters():
            if ".default." in name and "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p) * (p != 0))  # inside the q/v slices only
    model.eval()
    batch = trainer.data_collator(rows[:4])
    loss = trainer.compute_loss(model, batch)

    policy = {s: answer_logps(model, rows[:4], s) for s in ("chosen", "rejected")}
    sft = PeftModel.from_pretrained(load_model(cfg.model, resolve_source(cfg.model)), sft_run).eval()
    ref = {s: answer_logps(sft, rows[:4], s) for s in ("chosen", "rejected")}
    beta = cfg.beta
    margin = (policy["chosen"] - ref["chosen"]) - (policy["rejected"] - ref["rejected"])
    expected = -F.logsigmoid(beta * margin).mean()
    assert policy["chosen"].sub(ref["chosen"]).abs().max() > 1e-2  # the policy did move
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    # What TRL uses as the reference is the SFT adapter as it was saved, not the policy.
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(model, batch)
    torch.testing.assert_close(ref_chosen, ref["chosen"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref_rejected, ref["rejected"], rtol=1e-4, atol=1e-4)


def test_a_fresh_adapter_has_the_base_itself_as_reference(pairs_file, tmp_path):
    trainer, rows, cfg = built(dpo_config(pairs_file, tmp_path / "dpo"))
    assert set(trainer.model.peft_config) == {"default"}  # no second adapter: the base, adapter off
    base = load_model(cfg.model, resolve_source(cfg.model)).eval()
    batch = trainer.data_collator(rows[:4])
    trainer.model.eval()
    ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    torch.testing.assert_close(ref_chosen, answer_logps(base, rows[:4], "chosen"), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref_rejected, answer_logps(base, rows[:4], "rejected"), rtol=1e-4, atol=1e-4)


def held_out_margin(model, tokenizer, template, prompts: list[dict]) -> torch.Tensor:
    rows, _ = encode_pairs(prompts, template, tokenizer, 128)
    return answer_logps(model, rows, "chosen") - answer_logps(model, rows, "rejected")


def assert_unseen_margin_rises(cfg: DpoConfig, out: Path, sft_run: Path) -> None:
    """On 20 prompts never trained on, the Japanese answer's log-probability minus the English one's
    rises over the SFT adapter's for more than 90% of them."""
    from peft import PeftModel

    from kaika.rundir import RunDir

    run = RunDir.open(out)
    tokenizer = load_tokenizer(cfg.model, resolve_source(cfg.model))
    unseen = [{"instruction": r["instruction"], "input": "", "chosen": CHOSEN, "rejected": REJECTED,
               "where": "unseen"} for r in seed_records(60, 120)[40:]]  # fmt: skip
    base = lambda: load_model(run.model_args, run.source)  # noqa: E731
    before = held_out_margin(
        PeftModel.from_pretrained(base(), sft_run).eval(), tokenizer, run.template, unseen
    )
    after = held_out_margin(
        PeftModel.from_pretrained(base(), run.path).eval(), tokenizer, run.template, unseen
    )
    assert (after > before).float().mean() > 0.9, (before, after)


@pytest.mark.parametrize("loss", ["dpo", "ipo", "orpo", "simpo"])
def test_each_loss_learns_a_synthetic_preference_and_saves_a_verified_adapter(loss, sft_run, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", synthetic_pairs(40))
    cfg = dpo_config(pairs, tmp_path / loss, from_run=str(sft_run), loss=loss)
    cfg.data.val_set_size = 8
    cfg.train.max_steps, cfg.train.eval_steps, cfg.train.lr = 12, 12, 3e-3
    result = preference.dpo(cfg)
    rows = [
        json.loads(line) for line in (Path(result.output_dir) / "trainer_log.jsonl").read_text().splitlines()
    ]
    evals = [r for r in rows if "eval_reward_accuracy" in r]
    assert evals and evals[-1]["eval_reward_accuracy"] > 0.9, evals  # held-out pairs: chosen wins
    assert evals[-1]["eval_reward_margin"] > 0
    assert all({"loss", "reward_margin", "reward_accuracy", "logp_chosen", "logp_rejected"} <= set(r)
               for r in rows if "loss" in r)  # fmt: skip
    assert (Path(result.output_dir) / "kaika_dpo.yaml").is_file()
    assert not (Path(result.output_dir) / "ref").exists()  # the reference copy is not saved

    # Generation moves the measured way: on prompts it never saw, the Japanese answer now more
    # likely than the English one, by more than the SFT adapter had it.
    assert_unseen_margin_rises(cfg, result.output_dir, sft_run)


def test_kto_learns_from_single_labelled_answers(sft_run, tmp_path):
    """KTO on answers without pairs: each prompt has either the Japanese answer (label true) or the
    English one (label false), never both. Trained from the SFT run (its frozen copy the reference),
    the held-out prompts then prefer the Japanese answer by more than the SFT adapter did; the log
    carries KL and both classes' rewards."""
    records = [
        {"instruction": r["instruction"], "completion": CHOSEN if i % 2 else REJECTED, "label": bool(i % 2)}
        for i, r in enumerate(seed_records(40, 120))
    ]
    data = write_jsonl(tmp_path / "kto.jsonl", records)
    cfg = dpo_config(data, tmp_path / "kto", from_run=str(sft_run), loss="kto")
    cfg.train.max_steps, cfg.train.lr = 12, 3e-3
    result = preference.dpo(cfg)
    rows = [json.loads(line) for line in (result.output_dir / "trainer_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 12 and all("kl" in r and r["kl"] >= 0 for r in steps)
    assert result.kl is not None and isinstance(result.data_report.desirable, int)
    assert result.data_report.desirable == result.data_report.undesirable == 20
    late = [r for r in steps[-4:] if "reward_chosen" in r and "reward_rejected" in r]
    assert late and all(r["reward_chosen"] > r["reward_rejected"] for r in late), late
    assert_unseen_margin_rises(cfg, result.output_dir, sft_run)


def test_kto_validation_keeps_both_halves_of_a_pair_on_one_side(pairs_file, tmp_path):
    cfg = dpo_config(pairs_file, tmp_path / "kto", loss="kto")
    cfg.data.val_set_size = 8
    train_records, val_records = preference.load_data(cfg)
    assert len(val_records) == 16 and len(train_records) == 2 * 40 - 16  # 8 pairs, each as two answers
    assert not {r["where"] for r in train_records} & {r["where"] for r in val_records}


def test_kto_data_is_checked_with_file_line_and_field(tmp_path):
    from kaika.data.problems import DataError
    from kaika.data.unpaired import load_unpaired
    from kaika.errors import KaikaError

    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "a", "completion": "b", "label": True},
        {"prompt": "a", "completion": "b"},
        {"prompt": "a", "completion": "b", "label": "false"},
        {"completion": "b", "label": False},
        {"prompt": "a", "chosen": "x", "rejected": "y"},
    ])  # fmt: skip
    with pytest.raises(DataError) as e:
        load_unpaired([str(bad)])
    text = str(e.value)
    assert "line 2" in text and "label" in text and "missing" in text
    assert "line 3" in text and "expected true or false" in text
    assert "line 4" in text and "no prompt" in text
    assert "line 5" not in text  # a pair is two records, chosen true and rejected false
    good = write_jsonl(tmp_path / "good.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "y"}])
    records = load_unpaired([str(good)])
    assert [(r["completion"], r["label"]) for r in records] == [("x", True), ("y", False)]
    # A dataset with both columns has None in the one a record lacks: the other is its prompt.
    both = write_jsonl(tmp_path / "both.jsonl", [
        {"prompt": None, "messages": [{"role": "user", "content": "q"}], "completion": "x", "label": True},
        {"prompt": "p", "messages": None, "completion": "y", "label": False},
    ])  # fmt: skip
    assert [("messages" in r, r["label"]) for r in load_unpaired([str(both)])] == [
        (True, True),
        (False, False),
    ]
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt": "a", "completion": "b", "label": True}] * 3)
    with pytest.raises(KaikaError, match="all 3 records have label true"):
        load_unpaired([str(one)])


def test_generate_and_merge_take_the_preference_tuned_adapter(sft_run, pairs_file, tmp_path):
    out = tmp_path / "dpo"
    run_kaika("dpo", "--from", str(sft_run), "--data", str(pairs_file), "--output-dir", str(out),
              "--max-steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--cutoff-len", "128",
              cwd=tmp_path)  # fmt: skip
    saved = (out / "template.json").read_text()
    assert saved == (sft_run / "template.json").read_text()  # the SFT run's template goes on
    said = run_kaika("generate", str(out), "日本の首都は？", "--max-new-tokens", "4", cwd=tmp_path)
    assert said.strip()
    run_kaika("merge", str(out), str(tmp_path / "merged"), cwd=tmp_path)
    assert (tmp_path / "merged" / "config.json").is_file()


def test_bad_starts_fail_before_any_model_loads(sft_run, pairs_file, tmp_path):
    from kaika.errors import KaikaError

    kto = dpo_config(pairs_file, tmp_path / "k", loss="kto")
    kto.train.micro_batch_size = 1
    with pytest.raises(KaikaError, match="needs 2 or more"):
        preference.dpo(kto)

    with pytest.raises(KaikaError, match="no reference model to precompute"):
        preference.dpo(dpo_config(pairs_file, tmp_path / "a", loss="orpo", precompute_ref=True))
    with pytest.raises(KaikaError, match="does not exist"):
        preference.dpo(dpo_config(pairs_file, tmp_path / "b", from_run=str(tmp_path / "nowhere")))
    cfg = dpo_config(pairs_file, tmp_path / "c", from_run=str(sft_run))
    cfg.model.base_model = "gemma-3-270m"
    with pytest.raises(KaikaError, match="its adapter was trained on"):
        preference.dpo(cfg)


def test_pairs_from_a_runs_own_answers_by_metrics_and_by_a_judge(sft_run, tmp_path):
    from judge_server import JudgeServer
    from kaika.config import GenerateArgs
    from kaika.eval.judge import JudgeSettings
    from kaika.eval.pairs import make_pairs, metric_key

    tasks = write_jsonl(tmp_path / "tasks.jsonl", seed_records(6, 120))
    args = GenerateArgs(temperature=1.0, max_new_tokens=10, batch_size=6)
    out = tmp_path / "pairs.jsonl"
    report = make_pairs(sft_run, str(tasks), out, args, samples=3)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert report.pairs == len(rows) > 0 and report.pairs + report.no_preference + report.same_text == 6
    for row in rows:  # chosen outranks rejected by the stated rule
        c, r = row["scores"]["chosen"], row["scores"]["rejected"]
        assert metric_key(c) > metric_key(r), row
        assert c["chrf"] == pytest.approx(metrics_chrf(row["chosen"], tasks, row["task_id"]))
    assert len(load_pairs([str(out)])) == len(rows)  # kaika dpo reads what it wrote

    # The judge decides: it prefers the answer with more distinct characters (a rule it can apply
    # to any text), and the chosen side must be the one it scored higher.
    def reply(prompt: str) -> tuple[int, str]:
        answer = prompt.rsplit("回答", 1)[-1]
        return 200, f"評価: {1 + min(len(set(answer)), 40) // 10}"

    with JudgeServer(reply) as server:
        judged = make_pairs(sft_run, str(tasks), tmp_path / "judged.jsonl", args, samples=3, scorer="judge",
                            judge=JudgeSettings(server.url, concurrency=2))  # fmt: skip
        assert len(server.requests) == 6 * 3 and judged.judge_failures == 0
    for row in map(json.loads, (tmp_path / "judged.jsonl").read_text().splitlines()):
        assert row["scores"]["chosen"]["judge"] >= row["scores"]["rejected"]["judge"]


def metrics_chrf(answer: str, tasks: Path, task_id: int) -> float:
    from kaika.eval.metrics import chrf

    reference = json.loads(tasks.read_text().splitlines()[task_id])["output"]
    return chrf(answer, reference)


@pytest.mark.slow
def test_gemma_3_270m_learns_the_shipped_preferences(tmp_path):
    """The real pretrained model users start from, in the dtype they train in (bf16 where the CPU
    computes it natively), on the shipped pairs: after a few steps
    the held-out pairs' answers are preferred (reward accuracy and margin measured before the first
    step are 0: a fresh adapter is the reference itself)."""
    cfg = DpoConfig()
    cfg.model.base_model, cfg.model.dtype = "gemma-3-270m", train_dtype()
    # Sized for a 2-core CPU without native bf16 (float32): 6 steps of 8 pairs cut at 192 tokens. Measured
    # in float32 on an AVX512 Xeon: held-out accuracy 0.94, margin 1.04, in 103 s (384 tokens, 10 steps at
    # 5e-4: 0.81 and 0.95 in 197 s; 4 steps at 2e-3 left the margin negative).
    cfg.data.data, cfg.data.cutoff_len, cfg.data.val_set_size = ["seed-prefs-ja"], 192, 12
    cfg.lora.r = 16
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.micro_batch_size = str(tmp_path / "dpo"), 6, 8, 8
    t.lr, t.eval_steps, t.logging_steps = 1e-3, 6, 1
    result = preference.dpo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "dpo" / "trainer_log.jsonl").read_text().splitlines()]
    first = next(r for r in rows if "loss" in r)
    assert first["reward_margin"] == pytest.approx(0, abs=1e-3)  # step 1: the policy is the base
    final = [r for r in rows if "eval_reward_accuracy" in r][-1]
    assert final["eval_reward_accuracy"] >= 0.75 and final["eval_reward_margin"] > 0, final
    frozen = next(p.dtype for p in result.model.parameters() if not p.requires_grad)
    assert frozen == getattr(torch, train_dtype())


@pytest.mark.slow
def test_gemma_3_270m_kto_on_the_shipped_single_answers(tmp_path):
    """KTO on the real model, in the dtype users train in, on seed-kto-ja (one answer per prompt, good
    or bad): the held-out desirable answers end up with the higher reward, the KL estimate is logged at
    every step, and the adapter is saved verified."""
    cfg = DpoConfig()
    cfg.model.base_model, cfg.model.dtype = "gemma-3-270m", train_dtype()
    cfg.data.data, cfg.data.cutoff_len, cfg.data.val_set_size = ["seed-kto-ja"], 192, 16
    cfg.dpo = replace(cfg.dpo, loss="kto")
    cfg.lora.r = 16
    t = cfg.train
    t.output_dir, t.max_steps, t.batch_size, t.micro_batch_size = str(tmp_path / "kto"), 6, 8, 8
    t.lr, t.eval_steps, t.logging_steps = 1e-3, 6, 1
    result = preference.dpo(cfg)
    rows = [json.loads(line) for line in (tmp_path / "kto" / "trainer_log.jsonl").read_text().splitlines()]
    assert all("kl" in r for r in rows if "loss" in r)
    final = [r for r in rows if "eval_reward_chosen" in r][-1]
    assert final["eval_reward_chosen"] > final["eval_reward_rejected"], final
    assert result.kl is not None
