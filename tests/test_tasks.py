"""The LLM-Adapters task harness: answer extraction on hand-written outputs, the bundled test slices, and real
evaluation runs of the bundled TinyStories-656K (plain, sketched and as a peft model) in both modes."""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import pytest
import torch

from sketchtune.cli import add_eval_tasks_arguments, run_eval_tasks
from sketchtune.errors import SketchError
from sketchtune.eval.answers import (
    TASKS,
    extract_answer,
    extract_label,
    extract_letter,
    extract_number,
    is_correct,
    number_is_correct,
)
from sketchtune.eval.tasks import (
    BUNDLED_TASKS,
    COMMONSENSE_TASKS,
    MATH_TASKS,
    candidate_labels,
    evaluate_tasks,
    format_results_table,
    load_task,
    resolve_task,
    resolve_tasks,
    truncate_left,
)
from sketchtune.prompts import format_prompt

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "llm-adapters" / "dataset"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """A 656K-parameter model gains nothing from threads, and on a busy 2-core machine they only contend."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------- prompts


def test_prompt_is_the_alpaca_template():
    assert format_prompt("Add 2 and 3.") == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )
    assert format_prompt("Sum {these}", "2, 3") == (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n### Instruction:\nSum {these}\n\n"
        "### Input:\n2, 3\n\n### Response:\n"
    )


# -------------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize("text, expected", [
    ("He needs 24 * 24 = 576 tiles. The answer is 576.", 576.0),
    ("The answer is 1,234,567", 1234567.0),
    ("In total $1,023.65 was paid.", 1023.65),
    ("The number is -15.", -15.0),
    ("It fell from 4 to -3.5 degrees", -3.5),
    ("0.2 + 0.4 = 0.6 of a loaf", 0.6),
    ("The answer is 9.8.", 9.8),
    ("3 apples and then 4", 4.0),
    ("20-5", -5.0),  # upstream quirk: the minus binds to the last number
    ("3,4", 34.0),  # upstream quirk: commas are deleted before matching
    ("I do not know the answer.", None),
    ("", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


def test_number_is_correct_tolerance():
    assert number_is_correct(576.0, "576.0") and number_is_correct(-15, "-15.0")
    assert number_is_correct(1.8333, "1.8333333333333335") and number_is_correct(576.001, "576")
    assert not number_is_correct(576.01, "576") and not number_is_correct(None, "0")
    assert is_correct("gsm8k", extract_number("so 120 animals"), "120.0")


@pytest.mark.parametrize("text, upstream, explicit", [
    ("Rationale: 16x + 4 = 64, so x = 3.75. The answer is (D).", "D", "D"),
    ("A train runs 60 km/h. The answer is (C).", "A", "C"),  # upstream takes the article "A"
    ("Answer: (B) 61 m", "A", "B"),
    ("(A) 5 (B) 6, so the answer is B", "A", "B"),
    ("the answer is a bit unclear", None, None),
    ("", None, None),
])
def test_extract_letter(text, upstream, explicit):
    assert extract_letter(text) == upstream
    assert extract_letter(text, "explicit") == explicit
    assert is_correct("AQuA", extract_answer("AQuA", text), "D") == (upstream == "D")


@pytest.mark.parametrize("task, text, expected", [
    ("boolq", "the correct answer is false", "false"),
    ("boolq", "True. It is.", "true"),
    ("boolq", "this is untrue", "true"),  # upstream quirk: no word boundaries
    ("boolq", "yes", None),
    ("piqa", "the correct answer is solution2", "solution2"),
    ("social_i_qa", "answer3", "answer3"),
    ("ARC-Easy", "Answer5 is right", "answer5"),
    ("ARC-Challenge", "answer2 or answer1", "answer2"),  # the first one wins
    ("openbookqa", "the correct answer is answer4 answer4", "answer4"),
    ("hellaswag", "ending4", "ending4"),
    ("winogrande", "the correct answer is option1", "option1"),
    ("winogrande", "answer1", None),  # another family's labels do not count
])
def test_extract_commonsense(task, text, expected):
    assert extract_answer(task, text) == expected
    assert is_correct(task, expected, expected or "x") == (expected is not None)


def test_task_table():
    assert set(MATH_TASKS + COMMONSENSE_TASKS) < set(TASKS)
    assert {TASKS[t].family for t in MATH_TASKS} == {"math", "aqua"}
    assert all(TASKS[t].family == "commonsense" and len(TASKS[t].labels) >= 2 for t in COMMONSENSE_TASKS)
    assert extract_label("Option2", ("option1", "option2")) == "option2"


# ---------------------------------------------------------------------------------------------- names and data


@pytest.mark.parametrize("name, canonical", [
    ("gsm8k", "gsm8k"), ("GSM8K", "gsm8k"), ("siqa", "social_i_qa"), ("Social_I_QA", "social_i_qa"),
    ("arc-e", "ARC-Easy"), ("ARC_C", "ARC-Challenge"), ("arc-challenge", "ARC-Challenge"), ("obqa", "openbookqa"),
    ("aqua", "AQuA"), ("addsub", "AddSub"), ("SVAMP", "SVAMP"),
])
def test_resolve_task(name, canonical):
    assert resolve_task(name) == canonical


def test_unknown_task_lists_valid_names():
    with pytest.raises(SketchError, match=r"unknown task 'gsm9k'.*gsm8k.*boolq"):
        resolve_task("gsm9k")
    assert resolve_tasks("gsm8k, GSM8K,boolq") == ["gsm8k", "boolq"]
    assert resolve_tasks(["math"]) == list(MATH_TASKS)
    assert len(resolve_tasks("all")) == 14


def test_bundled_slices():
    for name in MATH_TASKS + COMMONSENSE_TASKS:
        records = load_task(name, BUNDLED_TASKS)
        assert len(records) == 8 and all({"instruction", "input", "output", "answer"} <= set(r) for r in records)
        assert len(load_task(name, BUNDLED_TASKS, limit=3)) == 3
        original = SHARED / name / "test.json"
        if original.is_file():  # byte-faithful: the same records, formatted as the original files
            head = json.loads(original.read_text(encoding="utf-8"))[:8]
            assert (BUNDLED_TASKS / f"{name}.json").read_text(encoding="utf-8") == json.dumps(head, indent=4)


def test_load_task_layouts_and_errors(tmp_path):
    (tmp_path / "boolq").mkdir()
    (tmp_path / "boolq" / "test.json").write_text(json.dumps(load_task("boolq", BUNDLED_TASKS, 2)))
    assert [r["answer"] for r in load_task("BoolQ", tmp_path)] == ["false", "true"]
    with pytest.raises(SketchError, match="no test set for piqa"):
        load_task("piqa", tmp_path)
    with pytest.raises(SketchError, match="no such data directory"):
        load_task("piqa", tmp_path / "missing")
    with pytest.raises(SketchError, match="unknown task"):
        load_task("nope", BUNDLED_TASKS)
    (tmp_path / "winogrande.json").write_text("[{")
    with pytest.raises(SketchError, match="not valid JSON"):
        load_task("winogrande", tmp_path)
    (tmp_path / "piqa.json").write_text('{"instruction": "x"}')
    with pytest.raises(SketchError, match="not an LLM-Adapters test set"):
        load_task("piqa", tmp_path)
    with pytest.raises(SketchError, match="limit"):
        load_task("boolq", BUNDLED_TASKS, limit=0)


def test_candidate_labels_follow_the_record():
    arc = {"instruction": "Q?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3"}
    assert candidate_labels("ARC-Easy", arc) == ["answer1", "answer2", "answer3"]
    assert candidate_labels("boolq", {"instruction": "no format line"}) == ["true", "false"]
    for name in COMMONSENSE_TASKS:
        for r in load_task(name, BUNDLED_TASKS):
            assert r["answer"] in candidate_labels(name, r)


def test_truncate_left_keeps_bos():
    assert truncate_left([1, 5, 6, 7, 8], 3, bos=1) == [1, 7, 8]
    assert truncate_left([5, 6, 7, 8], 3, bos=1) == [6, 7, 8]
    assert truncate_left([1, 5], 3, bos=1) == [1, 5]


# ------------------------------------------------------------------------------------------- real evaluations

TASK_SET = ["gsm8k", "boolq", "piqa"]


def check_structure(results, mode, limit=2):
    assert results["mode"] == mode and results["limit"] == limit
    assert list(results["tasks"]) == TASK_SET
    for name, r in results["tasks"].items():
        assert r["total"] == limit == len(r["predictions"]) and 0 <= r["correct"] <= limit
        assert r["accuracy"] == r["correct"] / limit
        assert [p["index"] for p in r["predictions"]] == list(range(limit))
        assert all(p["correct"] == is_correct(name, p["prediction"], p["answer"]) for p in r["predictions"])
    accuracies = [r["accuracy"] for r in results["tasks"].values()]
    assert results["average"] == pytest.approx(sum(accuracies) / len(accuracies))


def test_generate_mode(tiny):
    model, tok = tiny
    results = evaluate_tasks(model, tok, TASK_SET, BUNDLED_TASKS, limit=2, batch_size=2, max_new_tokens=12,
                             progress=False)
    check_structure(results, "generate")
    for name, r in results["tasks"].items():
        assert r["method"] == "generate"
        for p in r["predictions"]:
            assert isinstance(p["output"], str) and p["output"]  # the tiny model always writes something
            assert "### Response" not in p["output"]  # only new tokens are decoded
            assert p["prediction"] == extract_answer(name, p["output"])
    table = format_results_table(results)
    assert "gsm8k" in table and "piqa" in table and "average (3 tasks)" in table
    assert not model.training


def test_generation_is_batch_invariant_and_truncated(tiny, tmp_path, monkeypatch):
    """Left padding must not change greedy outputs, and over-long prompts are cut to fit the 512-token context."""
    model, tok = tiny
    one = evaluate_tasks(model, tok, ["AddSub"], BUNDLED_TASKS, limit=3, batch_size=1, max_new_tokens=6,
                         progress=False)
    three = evaluate_tasks(model, tok, ["AddSub"], BUNDLED_TASKS, limit=3, batch_size=3, max_new_tokens=6,
                           progress=False)
    assert [p["output"] for p in one["tasks"]["AddSub"]["predictions"]] == \
           [p["output"] for p in three["tasks"]["AddSub"]["predictions"]]

    long = {"instruction": "How many apples? " * 300, "input": "", "output": "", "answer": "3"}
    (tmp_path / "SingleEq.json").write_text(json.dumps([long]))
    widths = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: widths.append(kw["input_ids"].shape[1]) or original(**kw))
    r = evaluate_tasks(model, tok, ["SingleEq"], tmp_path, max_new_tokens=8, progress=False)
    assert widths == [512 - 8] and r["tasks"]["SingleEq"]["total"] == 1


def test_likelihood_mode(tiny):
    model, tok = tiny
    results = evaluate_tasks(model, tok, TASK_SET, BUNDLED_TASKS, limit=2, batch_size=4, max_new_tokens=12,
                             mode="likelihood", progress=False)
    check_structure(results, "likelihood")
    assert results["tasks"]["gsm8k"]["method"] == "generate"  # math has no candidate labels to score
    records = {n: load_task(n, BUNDLED_TASKS, 2) for n in ("boolq", "piqa")}
    for name in ("boolq", "piqa"):
        assert results["tasks"][name]["method"] == "likelihood"
        for p, record in zip(results["tasks"][name]["predictions"], records[name]):
            labels = candidate_labels(name, record)
            assert list(p["scores"]) == labels and p["prediction"] in labels
            assert p["prediction"] == max(p["scores"], key=p["scores"].get)
            assert all(s < 0 for s in p["scores"].values())


def test_bad_arguments(tiny):
    model, tok = tiny
    with pytest.raises(SketchError, match="unknown mode"):
        evaluate_tasks(model, tok, ["boolq"], BUNDLED_TASKS, mode="beam")
    with pytest.raises(SketchError, match="unknown task 'hellaswagg'"):
        evaluate_tasks(model, tok, ["boolq", "hellaswagg"], BUNDLED_TASKS)
    with pytest.raises(SketchError, match="no test set for hellaswag"):
        evaluate_tasks(model, tok, ["hellaswag"], BUNDLED_TASKS)


# -------------------------------------------------------------------------------------------------------- CLI


def cli_args(*argv):
    return add_eval_tasks_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_on_sketched_model(sketched_dir, tmp_path, capsys):
    out = tmp_path / "res" / "results.json"
    code = run_eval_tasks(cli_args(str(sketched_dir), "--tasks", "SingleEq,winogrande", "--data-dir", "bundled",
                                   "--limit", "2", "--max-new-tokens", "6", "--mode", "likelihood",
                                   "--out", str(out)))
    assert code == 0
    printed = capsys.readouterr().out
    assert "SingleEq" in printed and "winogrande" in printed and "likelihood" in printed
    saved = json.loads(out.read_text())
    assert saved["model"] == str(sketched_dir) and saved["tasks"]["winogrande"]["total"] == 2


def test_cli_with_sketch_adapter(sketched_dir, tmp_path, capsys):
    adapter = pytest.importorskip("sketchtune.train.adapter")
    import sketchtune

    model, _ = sketchtune.load(sketched_dir)
    adapter.save_adapter(model, tmp_path / "adapter")
    code = run_eval_tasks(cli_args(str(sketched_dir), "--adapter", str(tmp_path / "adapter"), "--tasks", "piqa",
                                   "--data-dir", "bundled", "--limit", "1", "--max-new-tokens", "4"))
    assert code == 0 and "piqa" in capsys.readouterr().out


def test_cli_on_peft_adapter_dir(tiny, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model

    model, _ = tiny
    lora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "lora")  # no tokenizer saved: it comes from the base model
    assert not (tmp_path / "lora" / "tokenizer.json").exists()
    code = run_eval_tasks(cli_args(str(tmp_path / "lora"), "--tasks", "obqa,mawps", "--data-dir",
                                   str(BUNDLED_TASKS), "--limit", "1", "--max-new-tokens", "4"))
    assert code == 0
    assert "openbookqa" in capsys.readouterr().out
    with pytest.raises(SketchError, match="cannot be applied"):
        run_eval_tasks(cli_args(str(tmp_path / "lora"), "--tasks", "boolq", "--data-dir", "bundled",
                                "--adapter", "x"))


def test_cli_errors(tmp_path, monkeypatch):
    from sketchtune.modeling import BUNDLED_MODEL

    with pytest.raises(SketchError, match="unknown task 'gsm9k'.*valid tasks"):
        run_eval_tasks(cli_args(str(BUNDLED_MODEL), "--tasks", "gsm9k", "--data-dir", "bundled"))
    with pytest.raises(SketchError, match="no test set for boolq"):
        run_eval_tasks(cli_args(str(BUNDLED_MODEL), "--tasks", "boolq", "--data-dir", str(tmp_path)))
    with pytest.raises(SketchError, match="--limit must be"):
        run_eval_tasks(cli_args(str(BUNDLED_MODEL), "--tasks", "boolq", "--data-dir", "bundled", "--limit", "0"))
    monkeypatch.delenv("SKETCHTUNE_TASKS_DIR", raising=False)  # no workspace path is ever guessed
    with pytest.raises(SketchError, match="--data-dir bundled"):
        run_eval_tasks(cli_args(str(BUNDLED_MODEL), "--tasks", "boolq"))
    monkeypatch.setenv("SKETCHTUNE_TASKS_DIR", str(tmp_path))
    with pytest.raises(SketchError, match="no test set for boolq"):
        run_eval_tasks(cli_args(str(BUNDLED_MODEL), "--tasks", "boolq"))
    with pytest.raises(SketchError, match="no sketch adapter at a"):
        run_eval_tasks(cli_args(str(BUNDLED_MODEL), "--tasks", "boolq", "--data-dir", "bundled", "--adapter", "a"))
