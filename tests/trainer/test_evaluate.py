"""rmjob_trainer.evaluate: RewardBench v1 / v2 scoring, the report files, the CLI.

Scoring tests feed known rewards through the function API: each reply's text is its reward
("2.5"), and the expected numbers below are worked out by hand from those rewards. The
end-to-end tests run the CLI on a tiny random-init reward model and recompute every reward
with a plain transformers forward pass on the unpadded sequence.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from rmjob_trainer.evaluate import benchmark_metrics, log_to_wandb, run_benchmark, write_report


def reward_from_text(conversations):
    return [float(conversation[-1]["content"]) for conversation in conversations]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def v1_row(subset, chosen, rejected, prompt="p"):
    return {"prompt": prompt, "chosen": str(chosen), "rejected": str(rejected), "subset": subset,
            "chosen_model": "m1", "rejected_model": "m2"}


def v2_row(subset, chosen, rejected, row_id=None):
    row = {"prompt": "p", "chosen": [str(c) for c in chosen], "rejected": [str(r) for r in rejected],
           "subset": subset, "num_correct": len(chosen)}
    if row_id is not None:
        row["id"] = row_id
    return row


# (chosen reward, rejected reward): a = 2 correct of 4 (one tie), b = 2 correct of 3 (one tie).
V1_PAIRS = {"a": [(2, 1), (1, 1), (0, 3), (5, -1)], "b": [(1, 0), (2, 2), (3, 1)]}


@pytest.fixture
def v1_file(tmp_path):
    return write_jsonl(tmp_path / "v1.jsonl", [v1_row(s, c, r) for s, pairs in V1_PAIRS.items() for c, r in pairs])


def test_v1_per_subset_overall_ties_and_reward_stats(v1_file):
    result = run_benchmark(v1_file, reward_from_text)
    assert result["format"] == "rewardbench_v1"
    a, b = result["subsets"]["a"], result["subsets"]["b"]
    assert (a["accuracy"], a["count"], a["ties"], a["tie_rate"]) == (0.5, 4, 1, 0.25)  # a tie is not correct
    assert (b["accuracy"], b["count"], b["ties"]) == (pytest.approx(2 / 3), 3, 1)
    assert result["overall"] == pytest.approx(4 / 7)  # correct pairs / pairs
    assert (result["count"], result["ties"], result["tie_rate"]) == (7, 2, pytest.approx(2 / 7))
    # a: chosen 2, 1, 0, 5; rejected 1, 1, 3, -1; margins 1, 0, -3, 6 (population std)
    assert a["chosen_mean"] == 2 and a["chosen_std"] == pytest.approx(math.sqrt(3.5))
    assert a["rejected_mean"] == 1 and a["rejected_std"] == pytest.approx(math.sqrt(2))
    assert a["margin_mean"] == 1 and a["margin_std"] == pytest.approx(math.sqrt(10.5))
    assert [e["chosen_rewards"] + e["rejected_rewards"] for e in result["examples"][:2]] == [[2, 1], [1, 1]]
    assert "sections" not in result


def test_v1_sections_weighted_by_example_count(v1_file, tmp_path):
    section_map = tmp_path / "sections.json"
    section_map.write_text(json.dumps({"A only": ["a"], "Both": ["a", "b", "not-in-data"]}))
    result = run_benchmark(v1_file, reward_from_text, section_map)
    assert result["sections"]["A only"]["accuracy"] == 0.5
    assert result["sections"]["Both"]["accuracy"] == pytest.approx((0.5 * 4 + 2 / 3 * 3) / 7)
    assert result["sections"]["Both"]["count"] == 7
    explicit = run_benchmark(v1_file, reward_from_text, {"Weighted": {"a": 1, "b": 3}})
    assert explicit["sections"]["Weighted"]["accuracy"] == pytest.approx((0.5 * 1 + 2 / 3 * 3) / 4)
    assert explicit["unmapped_subsets"] == []
    partial = run_benchmark(v1_file, reward_from_text, {"A": ["a"]})
    assert partial["unmapped_subsets"] == ["b"]


def test_builtin_rewardbench_sections_upweight_math_prm_to_the_code_subsets(tmp_path):
    rows = ([v1_row("math-prm", 1, 0), v1_row("math-prm", 0, 1)]  # 0.5
            + [v1_row("hep-cpp", 1, 0)] * 3  # 1.0
            + [v1_row("hep-go", 0, 1)]  # 0.0
            + [v1_row("alpacaeval-easy", 1, 0), v1_row("mt-bench-easy", 0, 1)]
            + [v1_row("mine", 1, 0)])
    result = run_benchmark(write_jsonl(tmp_path / "rb.jsonl", rows), reward_from_text, "rewardbench")
    reasoning = result["sections"]["Reasoning"]
    # math-prm weighs as much as hep-cpp + hep-go together (4), not its 2 pairs.
    assert reasoning["weights"] == {"math-prm": 4, "hep-cpp": 3, "hep-go": 1}
    assert reasoning["accuracy"] == pytest.approx((0.5 * 4 + 1.0 * 3 + 0.0 * 1) / 8)
    assert result["sections"]["Chat"]["accuracy"] == 0.5
    assert result["sections"]["Safety"] == {"accuracy": None, "count": 0, "weights": {}}
    assert result["unmapped_subsets"] == ["mine"]


def test_every_file_layout_gives_the_same_result(v1_file, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    rows = [json.loads(line) for line in v1_file.read_text().splitlines()]
    columns = {key: [row[key] for row in rows] for key in rows[0]}
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    (tmp_path / "columns.json").write_text(json.dumps(columns))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "v1.parquet")
    Dataset.from_list(rows).save_to_disk(tmp_path / "saved")
    DatasetDict(test=Dataset.from_list(rows), train=Dataset.from_list(rows[:1])).save_to_disk(tmp_path / "saved_dict")
    expected = run_benchmark(v1_file, reward_from_text)
    for path, split in (("rows.json", None), ("columns.json", None), ("v1.parquet", None), ("saved", None),
                        ("saved_dict", "test")):
        result = run_benchmark(tmp_path / path, reward_from_text, split=split)
        assert (result["subsets"], result["overall"]) == (expected["subsets"], expected["overall"]), path


V2_ROWS = [
    v2_row("Math", [3], [1, 2, 0]),  # strictly best: 1
    v2_row("Math", [2], [2, 1, 2]),  # three tied at the top: 1/3
    v2_row("Focus", [0], [1, -1, 0]),  # beaten: 0
    v2_row("Focus", [5], [4, 4, 4]),  # 1
    v2_row("Focus", [1], [1, 0, 0]),  # two tied at the top: 1/2
    # Ties (upstream's process_single_model), prompt 0 and prompt 1:
    v2_row("Ties", [5], [1, 2], "ref:0"),  # accurate, correct-incorrect margin 3
    v2_row("Ties", [4, 6, 5], [3, 1], "tied:0"),  # accurate, correct spread 2, margin 1
    v2_row("Ties", [1], [2], "ref:1"),  # not accurate, margin -1
    v2_row("Ties", [3, 3], [0], "tied:1"),  # accurate, spread 0, margin 3
]


def test_v2_best_of_n_ties_split_credit_and_ties_subset(tmp_path):
    result = run_benchmark(write_jsonl(tmp_path / "v2.jsonl", V2_ROWS), reward_from_text)
    assert result["format"] == "rewardbench_v2"
    math_subset, focus, ties = (result["subsets"][name] for name in ("Math", "Focus", "Ties"))
    assert math_subset["accuracy"] == pytest.approx((1 + 1 / 3) / 2)
    assert (math_subset["count"], math_subset["ties"]) == (2, 1)
    assert focus["accuracy"] == pytest.approx((0 + 1 + 0.5) / 3)
    assert (focus["count"], focus["ties"]) == (3, 1)
    assert [e["credit"] for e in result["examples"][:5]] == pytest.approx([1, 1 / 3, 0, 1, 0.5])
    # ref accuracy 1/2, tied accuracy 2/2; correctness preferred: prompt 0 (1 > 2 no), prompt 1
    # (3 > 0 yes) = 1/2; hard: min(3, 1) > 2 no, min(-1, 3) > 0 no = 0; margin score
    # tanh(min margin / spread - 1): prompt 0, min(3, 1) / 2 = 0.5 -> tanh(-0.5); prompt 1, spread 0:
    # -1 / 0 = -inf with numpy's division (upstream's) -> tanh = -1.
    assert ties["ref_accuracy"] == 0.5 and ties["tied_accuracy"] == 1
    assert ties["correctness_preferred"] == 0.5 and ties["correctness_preferred_hard"] == 0
    assert ties["correctness_margin_score"] == pytest.approx((math.tanh(-0.5) - 1) / 2)
    expected_ties = 0.3 * 1 + 0.3 * 0.5 + 0.2 * 0.5 + 0.2 * 0 + 0.01 * (math.tanh(-0.5) - 1) / 2
    assert ties["accuracy"] == pytest.approx(expected_ties) and ties["count"] == 4
    assert result["overall"] == pytest.approx(((1 + 1 / 3) / 2 + 0.5 + expected_ties) / 3)  # mean of subsets
    # margin: worst chosen - best rejected; Math: 3 - 2, 2 - 2
    assert math_subset["margin_mean"] == 0.5
    assert math_subset["chosen_mean"] == 2.5 and math_subset["rejected_mean"] == pytest.approx(8 / 6)


def test_ties_margin_score_counts_prompts_whose_correct_answers_tie(tmp_path):
    # Upstream divides by the spread with numpy: x / 0 is +-inf (tanh +-1), 0 / 0 is NaN (set to 0),
    # and the mean runs over every prompt with a ref and a tied row.
    rows = [v2_row("Ties", [2], [0], "ref:0"), v2_row("Ties", [3, 3], [1], "tied:0"),  # min(2, 2) / 0 -> +1
            v2_row("Ties", [1], [1], "ref:1"), v2_row("Ties", [3, 3], [1], "tied:1"),  # min(0, 2) / 0 -> 0
            v2_row("Ties", [0], [1], "ref:2"), v2_row("Ties", [3, 3], [1], "tied:2"),  # min(-1, 2) / 0 -> -1
            v2_row("Ties", [2], [0], "ref:3"), v2_row("Ties", [5, 5], [1], "tied:3"),  # min(2, 4) / 0 -> +1
            v2_row("Ties", [2], [0], "ref:4"), v2_row("Ties", [4, 3], [2], "tied:4")]  # min(2, 1) / 1 -> tanh(0)
    ties = run_benchmark(write_jsonl(tmp_path / "ties.jsonl", rows), reward_from_text)["subsets"]["Ties"]
    assert ties["correctness_margin_score"] == pytest.approx((1 + 0 - 1 + 1 + 0) / 5)
    parts = (ties["tied_accuracy"], ties["ref_accuracy"], ties["correctness_preferred"],
             ties["correctness_preferred_hard"])
    # ref margins 2, 0, -1, 2, 2; tied margin > spread except prompt 4 (1 > 1); min > spread: prompts 0, 3
    assert parts == (1, pytest.approx(3 / 5), pytest.approx(4 / 5), pytest.approx(2 / 5))
    assert ties["accuracy"] == pytest.approx(0.3 * 1 + 0.3 * 3 / 5 + 0.2 * 4 / 5 + 0.2 * 2 / 5 + 0.01 * 1 / 5)


def test_report_files_and_wandb_metrics(v1_file, tmp_path):
    from rmjob_trainer.tracking import Tracker

    result = run_benchmark(v1_file, reward_from_text, {"S": ["a", "b"]})
    png = write_report(result, tmp_path / "out" / "bench.json")
    assert png == tmp_path / "out" / "bench.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert saved["subsets"]["a"]["accuracy"] == 0.5 and saved["overall"] == pytest.approx(4 / 7)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench.json", "bench.png"]  # no temp files

    class FakeRun:
        def __init__(self):
            self.logged = []

        def log(self, data, step):
            self.logged.append((step, data))

    run = FakeRun()
    log_to_wandb(Tracker(run), result, step=40, png_path=png)
    (step, logged), = run.logged
    assert step == 40 and logged["benchmark/overall"] == pytest.approx(4 / 7)
    assert logged["benchmark/subset/a"] == 0.5 and logged["benchmark/section/S"] == pytest.approx(4 / 7)
    assert logged["benchmark/tie_rate"] == pytest.approx(2 / 7) and "benchmark/rewards" in logged
    assert benchmark_metrics(result, "x/")["x/chosen_mean"] == pytest.approx(14 / 7)
    log_to_wandb(Tracker(), result, step=1, png_path=png)  # tracking off: nothing to do, no error


# --- command line ---------------------------------------------------------------------------


def run_evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rmjob_trainer.evaluate", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_reward_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny base model with a saved (random) score head, so every load gives the same rewards."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_rm")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def plain_transformers_rewards(model_dir, conversations):
    """Each conversation alone, unpadded, through the HF model's own forward: no rmjob code."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmjob_trainer.chat_templates import CHAT_TEMPLATES

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = CHAT_TEMPLATES["simple_chat"]
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([tokenizer.apply_chat_template(c, return_dict=False)])).logits[0, 0].item()
                for c in conversations]


PROMPTS = ["I watched the movie yesterday.", "How was the food?", "Tell me about the book."]
REPLIES = ["It was wonderful, I loved every minute.", "Terrible.", "It was fine I guess, nothing special at all.",
           "Absolutely great!", "Bad, boring and far too long for what it was.", "ok"]


def test_cli_end_to_end_v1_with_a_tiny_model(tiny_reward_model_dir, tmp_path):
    rows = [v1_row(subset, REPLIES[i % 6], REPLIES[(i + 3) % 6], PROMPTS[i % 3])
            for i, subset in enumerate(["x"] * 5 + ["y"] * 4)]
    dataset = write_jsonl(tmp_path / "v1.jsonl", rows)
    section_map = tmp_path / "sections.json"
    section_map.write_text(json.dumps({"S": ["x", "y"]}))
    out = tmp_path / "report" / "v1.json"
    result = run_evaluate("--model_name_or_path", str(tiny_reward_model_dir), "--dataset", str(dataset),
                          "--chat_template", "simple_chat", "--output", str(out), "--batch_size", "8",
                          "--section_map", str(section_map))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("\n") == 1 and result.stdout.startswith(f"rewardbench_v1 {dataset}: overall ")
    report = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"

    conversations = [[{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r[key]}]
                     for r in rows for key in ("chosen", "rejected")]
    expected = plain_transformers_rewards(tiny_reward_model_dir, conversations)
    got = [reward for e in report["examples"] for reward in e["chosen_rewards"] + e["rejected_rewards"]]
    assert got == pytest.approx(expected, abs=1e-4)
    pairs = list(zip(expected[0::2], expected[1::2]))
    for subset, indices in (("x", range(0, 5)), ("y", range(5, 9))):
        correct = sum(pairs[i][0] > pairs[i][1] for i in indices)
        assert report["subsets"][subset]["accuracy"] == pytest.approx(correct / len(indices))
    assert report["overall"] == pytest.approx(sum(c > r for c, r in pairs) / len(pairs))
    assert report["sections"]["S"]["accuracy"] == pytest.approx(report["overall"])
    assert f"overall {report['overall']:.4f} over 9 pairs" in result.stdout


def test_cli_end_to_end_v2_with_a_tiny_model(tiny_reward_model_dir, tmp_path):
    rows = [v2_row("Math", [REPLIES[i]], [REPLIES[(i + k) % 6] for k in (1, 2, 3)]) for i in range(4)]
    rows = [{**row, "prompt": PROMPTS[i % 3]} for i, row in enumerate(rows)]
    dataset = write_jsonl(tmp_path / "v2.jsonl", rows)
    out = tmp_path / "v2.json"
    result = run_evaluate("--model_name_or_path", str(tiny_reward_model_dir), "--dataset", str(dataset),
                          "--chat_template", "simple_chat", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    credits = []
    for row, example in zip(rows, report["examples"]):
        conversations = [[{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": reply}]
                         for reply in row["chosen"] + row["rejected"]]
        scores = plain_transformers_rewards(tiny_reward_model_dir, conversations)
        assert example["chosen_rewards"] + example["rejected_rewards"] == pytest.approx(scores, abs=1e-4)
        credits.append(float(scores[0] > max(scores[1:])))
    assert report["subsets"]["Math"]["accuracy"] == pytest.approx(sum(credits) / 4)
    assert report["overall"] == report["subsets"]["Math"]["accuracy"]


def _bad_inputs(tmp_path):
    ok_v1 = [v1_row("a", 1, 0)]
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.json").write_text("[]")
    (tmp_path / "data.csv").write_text("prompt,chosen,rejected,subset\np,a,b,s\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "bad_sections.json").write_text(json.dumps({"S": "a"}))
    write_jsonl(tmp_path / "ok.jsonl", ok_v1)
    return {
        "missing column": (write_jsonl(tmp_path / "nosubset.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}]),
                           (), "missing column 'subset'"),
        "unknown format": (write_jsonl(tmp_path / "messages.jsonl", [{
            "prompt": "p", "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}], "subset": "s"}]),
            (), "unknown format: 'chosen' in row 0 is a list of dicts"),
        "empty file": (tmp_path / "empty.jsonl", (), "the file is empty"),
        "no rows": (tmp_path / "blank.json", (), "no rows"),
        "nonexistent path": (tmp_path / "nothere.jsonl", (), "nothere.jsonl: no such file or directory"),
        "unknown file type": (tmp_path / "data.csv", (), "unknown file type"),
        "plain folder": (tmp_path / "folder", (), "is a folder but not a save_to_disk dataset"),
        "mixed formats": (write_jsonl(tmp_path / "mixed.jsonl", ok_v1 + [v2_row("a", [1], [0])]), (),
                          "row 1: 'chosen' is a list, but the file is RewardBench v1"),
        "null cell": (write_jsonl(tmp_path / "null.jsonl", ok_v1 + [{**ok_v1[0], "rejected": None}]), (),
                      "row 1: 'rejected' is null"),
        "number subset": (write_jsonl(tmp_path / "number.jsonl", ok_v1 + [{**ok_v1[0], "subset": 3}]), (),
                          "row 1: 'subset' must be a string, got an int"),
        "ties without id": (write_jsonl(tmp_path / "ties.jsonl", [v2_row("Ties", [1, 2], [0])]), (),
                            "row 0: a Ties row needs an 'id' of the form ref:N or tied:N"),
        "ties duplicate id": (write_jsonl(tmp_path / "ties_twice.jsonl", [
            v2_row("Ties", [1], [0], "ref:3"), v2_row("Ties", [2, 2], [0], "tied:3"),
            v2_row("Ties", [5], [9], "ref:03")]),
            (), "row 2: Ties id 'ref:03' is prompt 3's ref row again (row 0)"),
        "bad section map": (tmp_path / "ok.jsonl", ("--section_map", str(tmp_path / "bad_sections.json")),
                            "section 'S' must map to a list of subset names"),
        "unknown template": (tmp_path / "ok.jsonl", ("--chat_template", "nope"), "--chat_template: invalid choice"),
    }


BAD_INPUT_CASES = ["missing column", "unknown format", "empty file", "no rows", "nonexistent path",
                   "unknown file type", "plain folder", "mixed formats", "null cell", "number subset",
                   "ties without id", "ties duplicate id", "bad section map", "unknown template"]


@pytest.mark.parametrize("case", BAD_INPUT_CASES)
def test_bad_input_is_one_error_line_and_exit_2(case, tmp_path, tiny_model_dir):
    dataset, extra, fragment = _bad_inputs(tmp_path)[case]
    out = tmp_path / "out" / "result.json"
    result = run_evaluate("--model_name_or_path", str(tiny_model_dir), "--dataset", str(dataset),
                          "--output", str(out), *extra)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert fragment in result.stderr and result.stdout == ""
    assert not (tmp_path / "out").exists()  # nothing written


def test_missing_or_unloadable_model_folder_is_one_error_line(v1_file, tmp_path):
    result = run_evaluate("--model_name_or_path", str(tmp_path / "no-model"), "--dataset", str(v1_file))
    assert result.returncode == 2
    assert result.stderr == f"error: --model_name_or_path: {tmp_path / 'no-model'} is not a local folder\n"
    (tmp_path / "not-a-model").mkdir()
    result = run_evaluate("--model_name_or_path", str(tmp_path / "not-a-model"), "--dataset", str(v1_file))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: --model_name_or_path: cannot load {tmp_path / 'not-a-model'}: ")


def test_model_rewards_equal_unpadded_ones_when_the_text_holds_the_pad_token(tiny_reward_model_dir):
    # The pad id cannot tell padding from text when the template emits the pad token itself (here
    # at the start of every sequence); the sequence lengths can.
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmjob_trainer.chat_templates import CHAT_TEMPLATES
    from rmjob_trainer.evaluate import model_reward_fn

    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    tokenizer.chat_template = tokenizer.pad_token + CHAT_TEMPLATES["simple_chat"]
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir).eval()
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                     for p, r in zip(PROMPTS * 2, REPLIES)]
    sequences = tokenizer.apply_chat_template(conversations, return_dict=False)
    assert all(s[0] == tokenizer.pad_token_id for s in sequences) and len({len(s) for s in sequences}) > 1
    got = model_reward_fn(model, tokenizer, batch_size=3)(conversations)
    with torch.no_grad():
        unpadded = [model(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s))).logits[0, 0].item()
                    for s in sequences]
    assert got == pytest.approx(unpadded, abs=1e-5)


def test_a_lora_adapter_folder_is_one_error_line_naming_the_merged_model(tiny_llama_no_pad_dir, v1_file, tmp_path):
    # output_dir/adapter of a LoRA run, with a tokenizer copied beside it: transformers would load the
    # base and fail on the grown embeddings with a traceback.
    from rmjob_trainer.config import RewardConfig
    from rmjob_trainer.model import load_model, load_tokenizer, save_merged

    cfg = RewardConfig(model_name_or_path=str(tiny_llama_no_pad_dir), use_peft=True, lora_r=4)
    tokenizer = load_tokenizer(cfg)
    save_merged(load_model(cfg, tokenizer), tmp_path / "run")
    tokenizer.save_pretrained(tmp_path / "run" / "adapter")
    result = run_evaluate("--model_name_or_path", str(tmp_path / "run" / "adapter"), "--dataset", str(v1_file))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-3000:]
    assert result.stderr == (f"error: --model_name_or_path: {tmp_path / 'run' / 'adapter'} holds a LoRA adapter, "
                             f"not a reward model; evaluate the merged model in {tmp_path / 'run'}\n")


def test_model_rewards_with_a_tokenizer_without_pad_token(tiny_llama_no_pad_dir):
    # From Python, a tokenizer as loaded (Llama style, no pad token): padding needs no pad id.
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmjob_trainer.chat_templates import CHAT_TEMPLATES
    from rmjob_trainer.evaluate import model_reward_fn

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_no_pad_dir)
    assert tokenizer.pad_token_id is None
    tokenizer.chat_template = CHAT_TEMPLATES["simple_chat"]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_llama_no_pad_dir, num_labels=1).eval()
    conversations = [[{"role": "user", "content": p}, {"role": "assistant", "content": r}]
                     for p, r in zip(PROMPTS * 2, REPLIES)]
    got = model_reward_fn(model, tokenizer, batch_size=4)(conversations)
    with torch.no_grad():
        unpadded = [model(input_ids=torch.tensor([s])).logits[0, 0].item()
                    for s in tokenizer.apply_chat_template(conversations, return_dict=False)]
    assert got == pytest.approx(unpadded, abs=1e-5)
