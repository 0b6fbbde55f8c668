"""rmjob_trainer.hub against the Hub emulator (or the real Hub with RMJOB_TEST_REAL_HUB=1).

Every check goes through the real huggingface_hub client, so the same tests run against
huggingface.co: ``RMJOB_TEST_REAL_HUB=1 HF_TOKEN=hf_... [RMJOB_TEST_HF_ENTITY=org]`` pushes to
uniquely named private repositories and deletes them afterwards (docs/hub-and-tracking.md).
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

from rmjob_trainer import UserInputError
from rmjob_trainer.config import RewardConfig
from rmjob_trainer.hub import push_to_hub, repo_name

from hub_emulator import HubEmulator

REAL_HUB = os.environ.get("RMJOB_TEST_REAL_HUB") == "1"
RUN_NAME = "reward_modeling__1__1725461002"
METRICS = {"run_name": RUN_NAME, "step": 3, "episode": 96, "train/rm/loss": 0.5,
           "eval/rm/accuracy": 0.8125, "eval/rm/loss": 0.4321}


@dataclasses.dataclass
class HubTarget:
    endpoint: str
    token: str
    entity: str  # a namespace the token may write to, other than the token's user
    user: str
    emulator: HubEmulator | None

    @property
    def api(self) -> HfApi:
        return HfApi(endpoint=self.endpoint, token=self.token)


@pytest.fixture
def hub_server(monkeypatch, request, tmp_path):
    """The Hub to push to, with HF_ENDPOINT / HF_TOKEN set for the code under test.

    huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET once, at import: rmjob's hub.py
    passes the endpoint explicitly, the tests pass ``endpoint=`` to download helpers,
    subprocesses get the environment, and the Xet switch is patched in the constants.
    """
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # conftest.py turns the Hub off for every other test
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    if REAL_HUB:
        token = os.environ.get("HF_TOKEN") or pytest.fail("RMJOB_TEST_REAL_HUB=1 needs HF_TOKEN")
        endpoint = os.environ.get("HF_ENDPOINT", constants.ENDPOINT)
        user = HfApi(endpoint=endpoint, token=token).whoami()["name"]
        target = HubTarget(endpoint, token, os.environ.get("RMJOB_TEST_HF_ENTITY", user), user, None)
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        request.addfinalizer(lambda: _delete_test_repos(target))
        yield target
        return
    token = f"hf_emulator_{secrets.token_hex(16)}"
    with HubEmulator(token=token, user="test-user", orgs=("test-org",)) as emulator:
        monkeypatch.setenv("HF_ENDPOINT", emulator.endpoint)
        monkeypatch.setenv("HF_TOKEN", token)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
        yield HubTarget(emulator.endpoint, token, "test-org", "test-user", emulator)


_REPO_NAMES: list[str] = []  # every repository name a test made up, to clean the real Hub


def _unique_repo_name() -> str:
    _REPO_NAMES.append(f"rmjob-test-{secrets.token_hex(4)}")
    return _REPO_NAMES[-1]


def _delete_test_repos(target: HubTarget) -> None:
    for name in _REPO_NAMES:
        for namespace in {target.entity, target.user}:
            target.api.delete_repo(f"{namespace}/{name}", missing_ok=True)


@pytest.fixture(scope="session")
def output_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """What train.py leaves in output_dir: a sequence-classification model with its tokenizer
    and chat template, metrics.json, and a checkpoint directory that must not be pushed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmjob_trainer.chat_templates import CHAT_TEMPLATES

    base = tiny_model_dir
    out = tmp_path_factory.mktemp("output")
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.chat_template = CHAT_TEMPLATES["simple_chat"]
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(METRICS))
    (out / "checkpoints" / "step_2").mkdir(parents=True)
    (out / "checkpoints" / "step_2" / "optimizer.pt").write_bytes(b"\0" * 16)
    return out


def _cfg(**overrides) -> RewardConfig:
    fields = dict(
        model_name_or_path="EleutherAI/pythia-14m",
        dataset_mixer={"trl-internal-testing/sentiment-trl-style": 1.0},
        exp_name="reward_modeling",
        seed=1,
        push_to_hub=True,
        hf_repo_id=_unique_repo_name(),
    )
    return RewardConfig(**(fields | overrides))


def test_repo_name_defaults_to_open_instruct_naming():
    cfg = _cfg(hf_repo_id=None)
    assert repo_name(cfg) == "reward_modeling__EleutherAI_pythia-14m"


def test_push_creates_private_repo_on_run_branch(hub_server, output_dir, caplog, capsys):
    caplog.set_level("DEBUG")
    cfg = _cfg(hf_entity=hub_server.entity)

    result = push_to_hub(cfg, output_dir, METRICS)

    repo_id = f"{hub_server.entity}/{cfg.hf_repo_id}"
    assert result == {
        "repo": repo_id,
        "revision": RUN_NAME,
        "commit": result["commit"],
        "url": f"{hub_server.endpoint}/{repo_id}/tree/{RUN_NAME}",
    }
    assert re.fullmatch(r"[0-9a-f]{40}", result["commit"])
    api = hub_server.api
    branches = {b.name: b.target_commit for b in api.list_repo_refs(repo_id).branches}
    assert branches[RUN_NAME] == result["commit"]
    info = api.model_info(repo_id, revision=RUN_NAME)
    assert info.private is True
    assert info.sha == result["commit"]
    files = {s.rfilename for s in info.siblings}
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "metrics.json"} <= files
    assert not any(f.startswith("checkpoints/") for f in files)
    if hub_server.emulator:
        repo = hub_server.emulator.repos[repo_id]
        # One commit on top of main's initial one, holding the model and its card together.
        assert [c.oid for c in repo.history(RUN_NAME)] == [result["commit"], repo.branches["main"]]
        assert repo.commit(result["commit"]).files["model.safetensors"].lfs  # went through LFS
    _assert_token_not_leaked(hub_server, caplog, capsys, output_dir)


def test_model_card_has_metrics_and_usage(hub_server, output_dir, tmp_path):
    cfg = _cfg(hf_entity=hub_server.entity)
    result = push_to_hub(cfg, output_dir, METRICS)

    card = Path(hf_hub_download(result["repo"], "README.md", revision=result["revision"],
                                endpoint=hub_server.endpoint, cache_dir=tmp_path)).read_text()

    front_matter = card.split("---")[1]
    assert "base_model: EleutherAI/pythia-14m" in front_matter
    assert "trl-internal-testing/sentiment-trl-style" in front_matter
    assert "| eval/rm/accuracy | 0.8125 |" in card
    assert "| eval/rm/loss | 0.4321 |" in card
    assert "| learning_rate | `2e-05` |" in card
    assert f'repo_id, revision = "{result["repo"]}", "{result["revision"]}"' in card
    pushed_metrics = hf_hub_download(result["repo"], "metrics.json", revision=result["commit"],
                                     endpoint=hub_server.endpoint, cache_dir=tmp_path)
    assert json.loads(Path(pushed_metrics).read_text()) == METRICS


def test_model_card_snippet_computes_the_training_reward(hub_server, output_dir, tmp_path):
    """The card's usage code, run as a user would, prints the reward rmjob trains on."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmjob_trainer.model import get_reward

    cfg = _cfg(hf_entity=hub_server.entity, hf_repo_revision="card-snippet")
    result = push_to_hub(cfg, output_dir, METRICS)
    card = Path(hf_hub_download(result["repo"], "README.md", revision="card-snippet",
                                endpoint=hub_server.endpoint, cache_dir=tmp_path)).read_text()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)

    env = {**os.environ, "HF_HOME": str(tmp_path / "snippet_home")}
    run = subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    printed = float(re.search(r"reward: (-?[0-9.]+)", run.stdout).group(1))

    local = snapshot_download(result["repo"], revision=result["commit"], endpoint=hub_server.endpoint,
                              cache_dir=tmp_path / "snapshots")
    tokenizer = AutoTokenizer.from_pretrained(local)
    model = AutoModelForSequenceClassification.from_pretrained(local).eval()
    chat = ast.literal_eval(re.search(r"chat = (\[.*?\])\n", snippet, re.S).group(1))
    input_ids = tokenizer.apply_chat_template(chat, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        expected = get_reward(model, input_ids, tokenizer.pad_token_id).item()
    assert printed == pytest.approx(expected, abs=1e-4)


def test_entity_defaults_to_token_user_and_push_is_repeatable(hub_server, output_dir):
    cfg = _cfg()
    first = push_to_hub(cfg, output_dir, METRICS)
    second = push_to_hub(cfg, output_dir, {**METRICS, "eval/rm/accuracy": 0.9})

    assert first["repo"] == second["repo"] == f"{hub_server.user}/{cfg.hf_repo_id}"
    assert second["commit"] != first["commit"]  # only the card changed, and it is committed
    refs = hub_server.api.list_repo_refs(first["repo"])
    assert {b.name: b.target_commit for b in refs.branches}[RUN_NAME] == second["commit"]


def test_public_repo_when_asked(hub_server, output_dir):
    result = push_to_hub(_cfg(hf_entity=hub_server.entity, hf_repo_private=False), output_dir, METRICS)
    assert hub_server.api.model_info(result["repo"]).private is False


def test_missing_token_is_a_user_error(monkeypatch, output_dir):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(UserInputError, match="HF_TOKEN"):
        push_to_hub(_cfg(), output_dir, METRICS)


def _assert_token_not_leaked(hub_server: HubTarget, caplog, capsys, output_dir: Path) -> None:
    token = hub_server.token
    captured = capsys.readouterr()
    assert token not in caplog.text and token not in captured.out and token not in captured.err
    for path in [*output_dir.rglob("*"), *Path(os.environ["HF_HOME"]).rglob("*")]:
        assert not path.is_file() or token.encode() not in path.read_bytes(), path
    if hub_server.emulator:
        for repo in hub_server.emulator.repos.values():
            for commit in repo.commits.values():
                assert all(token.encode() not in blob.content for blob in commit.files.values())


def test_cli_push_to_hub_end_to_end(hub_server, tmp_path, tiny_model_dir, bundled_dataset_dir):
    """``python -m rmjob_trainer ... --push_to_hub``: train a tiny model, push it, read it back."""
    data = str(bundled_dataset_dir)
    out = tmp_path / "out"
    repo_name = _unique_repo_name()
    command = [
        sys.executable, "-m", "rmjob_trainer", "--model_name_or_path", str(tiny_model_dir),
        "--dataset_mixer", json.dumps({data: 32}), "--dataset_eval_mixer", json.dumps({data: 16}),
        "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "8", "--output_dir", str(out),
        "--push_to_hub", "--hf_entity", hub_server.entity, "--hf_repo_id", repo_name,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)  # env: the fixture's
    assert result.returncode == 0, result.stderr[-3000:]

    metrics = json.loads((out / "metrics.json").read_text())
    hub = metrics["hub"]
    assert hub["repo"] == f"{hub_server.entity}/{repo_name}" and hub["revision"] == metrics["run_name"]
    assert hub["url"] == f"{hub_server.endpoint}/{hub['repo']}/tree/{metrics['run_name']}"
    info = hub_server.api.model_info(hub["repo"], revision=hub["revision"])
    assert info.private is True and info.sha == hub["commit"]
    assert {"model.safetensors", "tokenizer.json", "chat_template.jinja", "metrics.json", "README.md"} <= {
        s.rfilename for s in info.siblings}
    weights = hf_hub_download(hub["repo"], "model.safetensors", revision=hub["commit"],
                              endpoint=hub_server.endpoint, cache_dir=tmp_path / "cache")
    assert Path(weights).read_bytes() == (out / "model.safetensors").read_bytes()
    card = Path(hf_hub_download(hub["repo"], "README.md", revision=hub["commit"],
                                endpoint=hub_server.endpoint, cache_dir=tmp_path / "cache")).read_text()
    assert f"| eval/rm/accuracy | {metrics['eval/rm/accuracy']:.4g} |" in card
    assert hub_server.token not in result.stdout + result.stderr
    for path in out.rglob("*"):
        assert not path.is_file() or hub_server.token.encode() not in path.read_bytes(), path
