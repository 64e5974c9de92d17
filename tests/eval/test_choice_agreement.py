"""kaika's multiple-choice scores against lm-evaluation-harness's, item by item.

lm-eval (its ``HFLM`` wrapper around the same model object) scores the shipped JGLUE files through
local task definitions whose prompt, description and delimiter are read from lm-eval's own
``ja_leaderboard_jcommonsenseqa`` / ``ja_leaderboard_jnli`` task files (0-shot; only the data source is
ours). Per-item, per-choice log-likelihoods must agree to float32 noise and every accuracy must be
the same. In float32: in bf16 the two programs' different summation orders differ by more than the
gap between close choices, which says nothing about either."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import pytest
import torch
import yaml

from helpers import build_model
from kaika.eval.choice import load_task_set, score_items, task_specs

pytestmark = pytest.mark.slow

JNLI_LABELS = ["entailment", "contradiction", "neutral"]


def lm_eval_task(name: str) -> dict:
    """lm-eval's own japanese_leaderboard task definition (its ``!function`` hooks left out)."""
    import lm_eval

    loader = type("Loader", (yaml.SafeLoader,), {})
    loader.add_constructor("!function", lambda _loader, _node: None)
    folder = Path(lm_eval.__file__).parent / "tasks" / "japanese_leaderboard"
    return yaml.load((folder / f"ja_leaderboard_{name}.yaml").read_text(encoding="utf-8"), loader)


def write_local_tasks(folder: Path) -> None:
    """lm-eval tasks on kaika's shipped files: lm-eval's prompts, 0-shot."""
    for name in ("jcommonsenseqa", "jnli"):
        theirs = lm_eval_task(name)
        data = str(resources.files("kaika.assets").joinpath(task_specs()[name].file))
        task = {
            "task": f"kaika_{name}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"validation": data}},
            "validation_split": "validation",
            "output_type": "multiple_choice",
            "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
            **{k: theirs[k] for k in ("description", "doc_to_text", "doc_to_choice", "target_delimiter")},
            "doc_to_target": "label" if name == "jcommonsenseqa" else f"{{{{{JNLI_LABELS}.index(label)}}}}",
        }
        text = yaml.safe_dump(task, allow_unicode=True)
        if name == "jcommonsenseqa":  # its choices come from a process_docs hook, as in lm-eval's
            text += "process_docs: !function kaika_hooks.add_choices\n"
        (folder / f"kaika_{name}.yaml").write_text(text, encoding="utf-8")
    (folder / "kaika_hooks.py").write_text(
        "def add_choices(ds):\n    return ds.map(lambda d: {'choices': [d[f'choice{i}'] for i in range(5)]})\n"
    )


def assert_agree(model, tokenizer, folder: Path, limits: dict[str, int]) -> None:
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=1)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    for name, limit in limits.items():
        theirs = lm_eval.simple_evaluate(
            model=lm,
            tasks=[f"kaika_{name}"],
            task_manager=manager,
            limit=limit,
            num_fewshot=0,
            log_samples=True,
        )
        samples = sorted(theirs["samples"][f"kaika_{name}"], key=lambda s: s["doc_id"])
        tasks = load_task_set(name)
        tasks.items = tasks.items[:limit]
        ours = score_items(model, tokenizer, tasks, name)
        assert len(samples) == len(ours) == limit
        for item, sample, row in zip(tasks.items, samples, ours, strict=True):
            assert sample["arguments"][0][0] == item.context  # the same prompt, character for character
            assert sample["target"] == item.answer
            their_ll = [resp[0][0] for resp in sample["resps"]]
            assert row["loglik"] == pytest.approx(their_ll, abs=1e-4, rel=1e-5)
        result = theirs["results"][f"kaika_{name}"]
        assert result["acc,none"] == pytest.approx(sum(r["correct"] for r in ours) / limit)
        assert result["acc_norm,none"] == pytest.approx(sum(r["correct_norm"] for r in ours) / limit)


def test_agrees_with_lm_eval_on_a_tiny_bloom(tmp_path, ja_tokenizer):
    from transformers import AutoModelForCausalLM

    write_local_tasks(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(
        build_model("bloom", ja_tokenizer, tmp_path / "bloom")
    ).eval()
    assert_agree(model, ja_tokenizer, tmp_path, {"jcommonsenseqa": 40, "jnli": 40})


def test_agrees_with_lm_eval_on_gemma_3_270m(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kaika.modeling.builtin import builtin_model_path

    write_local_tasks(tmp_path)
    path = builtin_model_path("gemma-3-270m")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert_agree(model, AutoTokenizer.from_pretrained(path), tmp_path, {"jcommonsenseqa": 12, "jnli": 6})
