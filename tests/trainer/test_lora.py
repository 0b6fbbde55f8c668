"""LoRA (--use_peft): adapters plus a fully trained score head; it learns, the output_dir holds a
merged model that plain transformers loads, the adapter is saved beside it; DDP and ZeRO-2 follow
the single-process run, ZeRO-3 is refused."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rmjob_trainer import ConfigError
from rmjob_trainer.config import RewardConfig

DS_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ds_configs"
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
LORA_R = 8


def _config(model_dir, dataset_dir, output_dir, **overrides) -> RewardConfig:
    values = dict(
        dataset_mixer={str(dataset_dir): 1.0}, model_name_or_path=str(model_dir), sanity_check=True,
        sanity_check_max_samples=200, learning_rate=5e-3, per_device_train_batch_size=8,
        per_device_eval_batch_size=50, num_train_epochs=2, num_evals=2, output_dir=str(output_dir),
        run_name="lora-run", use_peft=True, lora_r=LORA_R, lora_alpha=16,
    )
    return RewardConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def lora_trained(tiny_model_dir, bundled_dataset_dir, tmp_path_factory):
    from rmjob_trainer.train import train

    cfg = _config(tiny_model_dir, bundled_dataset_dir, tmp_path_factory.mktemp("lora"))
    return cfg, train(cfg)


def test_lora_run_learns_the_bundled_data(lora_trained):
    # the bar of test_train.py::test_learns_the_bundled_data
    _, metrics = lora_trained
    assert metrics["eval/rm/accuracy"] >= 0.9
    assert metrics["eval/rm/loss"] < 0.4


def _plain_accuracy(model, tokenizer, eval_dataset, batch_size: int) -> float:
    """transformers' own forward: right padding, last non-pad token found by config.pad_token_id."""
    correct = 0
    for start in range(0, len(eval_dataset), batch_size):
        rows = eval_dataset[start:start + batch_size]
        batch = tokenizer.pad({"input_ids": rows["input_ids_chosen"] + rows["input_ids_rejected"]},
                              return_tensors="pt")
        with torch.no_grad():
            chosen, rejected = model(**batch).logits.squeeze(-1).chunk(2)
        correct += (chosen > rejected).sum().item()
    return correct / len(eval_dataset)


def test_output_dir_is_a_merged_plain_model_that_reproduces_eval_accuracy(lora_trained, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmjob_trainer.data import build_datasets

    cfg, metrics = lora_trained
    output_dir = Path(cfg.output_dir)
    assert {"model.safetensors", "config.json", "metrics.json"} <= set(os.listdir(output_dir))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(output_dir / "adapter"))
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged, not wrapped
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    _, eval_dataset = build_datasets(cfg, tokenizer)
    accuracy = _plain_accuracy(model, tokenizer, eval_dataset, cfg.per_device_eval_batch_size)
    assert accuracy == pytest.approx(metrics["eval/rm/accuracy"], abs=1e-9)

    # The adapter on the untouched base model gives the merged model's rewards.
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    adapted = PeftModel.from_pretrained(base, output_dir / "adapter").eval()
    batch = tokenizer.pad({"input_ids": eval_dataset[:8]["input_ids_chosen"]}, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, model(**batch).logits, atol=1e-4, rtol=1e-4)


def test_only_lora_weights_and_the_score_head_are_trained(tiny_model_dir, bundled_dataset_dir, tmp_path):
    from transformers import AutoConfig

    from rmjob_trainer.distributed import DDPEngine, Dist
    from rmjob_trainer.model import load_tokenizer

    cfg = _config(tiny_model_dir, bundled_dataset_dir, tmp_path)
    engine = DDPEngine(cfg, load_tokenizer(cfg), Dist(0, 1, torch.device("cpu")), num_training_steps=1)
    trainable = {name: p.numel() for name, p in engine.hf_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or ".modules_to_save." in n for n in trainable)

    base = AutoConfig.from_pretrained(tiny_model_dir)
    hidden = base.hidden_size
    # GPT-NeoX's default LoRA target is the fused query_key_value: hidden -> 3 * hidden
    lora_per_layer = LORA_R * (hidden + 3 * hidden)
    score_head = hidden  # [1, hidden], no bias
    assert sum(trainable.values()) == base.num_hidden_layers * lora_per_layer + score_head
    optimized = sum(p.numel() for group in engine.optimizer.param_groups for p in group["params"])
    assert optimized == sum(trainable.values())


def test_lora_with_zero3_is_one_clear_error():
    from rmjob_trainer.distributed import build_deepspeed_config, deepspeed_settings

    cfg = RewardConfig(use_peft=True, deepspeed=str(DS_CONFIGS / "deepspeed_zero3.yaml"))
    with pytest.raises(ConfigError, match="--use_peft does not work with ZeRO-3"):
        build_deepspeed_config(deepspeed_settings(cfg, environ={}), cfg, world_size=2, precision=None)


def test_lora_run_resumes_from_its_checkpoint_to_the_same_final_metrics(
        tiny_model_dir, bundled_dataset_dir, tmp_path):
    from rmjob_trainer.train import train

    def cfg(output_dir, **overrides):
        return _config(tiny_model_dir, bundled_dataset_dir, output_dir, sanity_check_max_samples=24,
                       per_device_train_batch_size=4, num_train_epochs=1, num_evals=1, checkpointing_steps=3,
                       **overrides)

    whole = train(cfg(tmp_path / "whole"))
    assert (tmp_path / "whole" / "checkpoints" / "step_3").is_dir()  # 6 steps, the step-3 checkpoint kept
    (tmp_path / "whole" / "metrics.json").unlink()  # as if killed after step 3's checkpoint
    with pytest.raises(ConfigError, match="use_peft true there, false now"):
        train(cfg(tmp_path / "whole", use_peft=False))
    resumed = train(cfg(tmp_path / "whole"))
    assert resumed.keys() == whole.keys()
    for key, value in whole.items():
        assert resumed[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key


def test_lora_target_modules_matching_nothing_is_one_clear_error(tiny_model_dir):
    from rmjob_trainer.model import load_model, load_tokenizer

    cfg = RewardConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_target_modules=["q_proj"])
    with pytest.raises(ConfigError, match=r"^--lora_target_modules \['q_proj'\]: .*model type 'gpt_neox'"):
        load_model(cfg, load_tokenizer(cfg))


# --- 2-process runs -------------------------------------------------------------------------
def _flags(model_dir, dataset_dir, output_dir, grad_accum: int) -> list[str]:
    return [
        "--dataset_mixer", json.dumps({str(dataset_dir): 1.0}), "--model_name_or_path", str(model_dir),
        "--sanity_check", "--sanity_check_max_samples", "101", "--total_episodes", "40",
        "--learning_rate", "5e-3", "--per_device_train_batch_size", "2",
        "--gradient_accumulation_steps", str(grad_accum), "--per_device_eval_batch_size", "16",
        "--output_dir", str(output_dir), "--seed", "5", "--use_peft", "--lora_r", str(LORA_R),
    ]


def _run(args: list[str], processes: int) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    prefix = launcher if processes > 1 else [sys.executable]
    result = subprocess.run([*prefix, "-m", "rmjob_trainer", *args], env=ENV, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def _losses(output_dir: Path) -> list[float]:
    return [json.loads(line)["train/rm/loss"] for line in open(output_dir / "log.jsonl")]


@pytest.fixture(scope="module")
def single_process_lora_run(tiny_model_dir, bundled_dataset_dir, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("lora-single")
    _run(_flags(tiny_model_dir, bundled_dataset_dir, output_dir, grad_accum=2), processes=1)
    return output_dir


@pytest.mark.slow
@pytest.mark.xdist_group("distributed")
@pytest.mark.parametrize("deepspeed", [None, "deepspeed_zero2.yaml"], ids=["ddp", "zero2"])
def test_two_process_lora_matches_one_process_and_saves_a_merged_model(
        deepspeed, single_process_lora_run, tiny_model_dir, bundled_dataset_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    args = _flags(tiny_model_dir, bundled_dataset_dir, tmp_path, grad_accum=1)
    if deepspeed:
        args += ["--deepspeed", str(DS_CONFIGS / deepspeed)]
    _run(args, processes=2)

    assert _losses(tmp_path) == pytest.approx(_losses(single_process_lora_run), rel=1e-4, abs=1e-5)
    got = json.loads((tmp_path / "metrics.json").read_text())
    want = json.loads((single_process_lora_run / "metrics.json").read_text())
    assert got["eval/rm/accuracy"] == pytest.approx(want["eval/rm/accuracy"], abs=1e-9)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    reference = AutoModelForSequenceClassification.from_pretrained(single_process_lora_run)
    for (name, weight), (_, expected) in zip(merged.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(weight, expected, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_lora_on_a_llama_model_gives_the_merged_models_rewards(tiny_llama_no_pad_dir, padding_free):
    # Llama's (Mistral's, Qwen's, ...) backbone attribute is named 'model', which on a PeftModel is
    # peft's own attribute: the whole sequence-classification model.
    import copy

    from rmjob_trainer.model import RewardModel, get_reward, load_model, load_tokenizer, padded_batch
    from rmjob_trainer.packing import collate_packed

    cfg = RewardConfig(model_name_or_path=str(tiny_llama_no_pad_dir), use_peft=True, lora_r=LORA_R,
                       padding_free=padding_free)
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    torch.manual_seed(0)
    with torch.no_grad():  # trained-looking adapters (peft starts lora_B at 0, a no-op)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    sequences = [[5, 6, 7, 8, tokenizer.eos_token_id], [9, 10, tokenizer.eos_token_id]]
    batch = collate_packed(sequences) if padding_free else padded_batch(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        trained = RewardModel(model, tokenizer.pad_token_id, padding_free)(batch)
        evaluated = get_reward(model, **padded_batch(sequences, tokenizer.pad_token_id),
                               pad_token_id=tokenizer.pad_token_id)  # the --eval_benchmark path
        merged = copy.deepcopy(model).merge_and_unload()
        plain = merged(**tokenizer.pad({"input_ids": sequences}, return_tensors="pt")).logits.squeeze(-1)
    torch.testing.assert_close(trained, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(evaluated, plain, atol=1e-5, rtol=1e-5)


def test_all_linear_targets_every_linear_layer(tiny_model_dir):
    # peft takes 'all-linear' only as the whole target value; the flag parses to a list of names.
    from rmjob_trainer.cli import parse_args
    from rmjob_trainer.model import load_model, load_tokenizer

    cfg = parse_args(["--model_name_or_path", str(tiny_model_dir), "--dataset_mixer", '{"d": 1.0}', "--use_peft",
                      "--lora_r", str(LORA_R), "--lora_target_modules", "all-linear"])
    assert cfg.lora_target_modules == ["all-linear"]
    model = load_model(cfg, load_tokenizer(cfg))
    adapted = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"}  # all but the score head


def test_merging_half_precision_weights_keeps_the_lora_update(tiny_model_dir, tmp_path):
    # DeepSpeed bf16 holds the weights in bf16: W + BA rounded to bf16 loses much of an update that
    # is small next to W. The merged model must give the rewards of the adapted weights it trained.
    import copy

    from transformers import AutoModelForSequenceClassification

    from rmjob_trainer.model import get_reward, load_model, load_tokenizer, padded_batch, save_merged

    cfg = RewardConfig(model_name_or_path=str(tiny_model_dir), use_peft=True, lora_r=LORA_R,
                       lora_target_modules=["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"])
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tokenizer)
    with torch.no_grad():  # an update about 1% of the weights, as after a typical LoRA run
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.004)
    model = model.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(1)
    sequences = [torch.randint(2, 700, (length,), generator=generator).tolist() + [tokenizer.eos_token_id]
                 for length in (20, 45, 80, 120)]
    batch = padded_batch(sequences, tokenizer.pad_token_id)
    with torch.no_grad():
        adapted = get_reward(copy.deepcopy(model).float(), pad_token_id=tokenizer.pad_token_id, **batch)
        save_merged(model, tmp_path)
        merged = AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
        torch.testing.assert_close(get_reward(merged, pad_token_id=tokenizer.pad_token_id, **batch), adapted,
                                   atol=1e-5, rtol=1e-5)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_adapter_of_a_resized_base_loads_with_the_documented_recipe(tiny_llama_no_pad_dir, tmp_path):
    # A tokenizer without a pad token gets [PAD] and the embeddings grow: the adapter then carries
    # the resized embedding matrix, and the base must be resized the same way before loading it
    # (docs/training.md, LoRA).
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from rmjob_trainer.model import load_model, load_tokenizer, save_merged

    cfg = RewardConfig(model_name_or_path=str(tiny_llama_no_pad_dir), use_peft=True, lora_r=LORA_R)
    tokenizer = load_tokenizer(cfg)
    torch.manual_seed(0)
    model = load_model(cfg, tokenizer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    save_merged(model, tmp_path)
    tokenizer.save_pretrained(tmp_path)

    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama_no_pad_dir, num_labels=1)
    with pytest.raises(RuntimeError, match="size mismatch"):  # the base as it is does not take it
        PeftModel.from_pretrained(base, tmp_path / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(tiny_llama_no_pad_dir, num_labels=1)
    base.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)
    base.config.pad_token_id = tokenizer.pad_token_id
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = tokenizer.pad({"input_ids": [[5, 6, 7, 8, tokenizer.eos_token_id], [9, 10, tokenizer.eos_token_id]]},
                          return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(adapted(**batch).logits, merged(**batch).logits, atol=1e-5, rtol=1e-5)
