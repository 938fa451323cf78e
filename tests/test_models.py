"""Model resolver: embedded GGUF, local folders, hub ids, and their error messages."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from balancedbio.models import (
    PROVENANCE_FILE,
    ModelResolutionError,
    chat_generate,
    load_causal_lm,
    load_tokenizer,
    resolve_model,
)

MEDICAL_CHAT = [{"role": "user", "content": "Which organ produces insulin? Answer in one sentence."}]


def test_embedded_policy_model_resolves_to_the_gguf_in_the_wheel():
    resolved = resolve_model("embedded:smollm2-135m-instruct")
    assert resolved.kind == "embedded"
    assert resolved.gguf_file.endswith(".gguf")
    assert (Path(resolved.location) / resolved.gguf_file).stat().st_size > 50_000_000
    assert resolved.upstream_hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_embedded_encoder_resolves_to_a_transformers_folder():
    resolved = resolve_model("embedded:all-minilm-l6-v2")
    assert resolved.gguf_file is None
    assert (Path(resolved.location) / "config.json").is_file()
    assert (Path(resolved.location) / "model.safetensors").is_file()


def test_unknown_embedded_name_lists_the_known_ones():
    with pytest.raises(ModelResolutionError, match=r"Unknown embedded model 'embedded:gpt-5'.*smollm2-135m-instruct"):
        resolve_model("embedded:gpt-5")


def test_missing_local_folder_fails_in_one_sentence(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(ModelResolutionError) as info:
        resolve_model(str(missing))
    message = str(info.value)
    assert message == f"Local model folder '{missing}' does not exist."


def test_relative_missing_folder_is_not_mistaken_for_a_hub_id():
    with pytest.raises(ModelResolutionError, match="does not exist"):
        resolve_model("./models/my-finetune")


def test_folder_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelResolutionError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_pickled_weights_are_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelResolutionError, match="pickled"):
        load_causal_lm(str(tmp_path))


def test_hub_id_resolves_without_network():
    resolved = resolve_model("Qwen/Qwen2.5-7B-Instruct")
    assert (resolved.kind, resolved.location) == ("hub", "Qwen/Qwen2.5-7B-Instruct")


@pytest.mark.parametrize("bad", ["", "   ", "not a model!", "owner/name with spaces"])
def test_invalid_sources_are_rejected(bad):
    with pytest.raises(ModelResolutionError):
        resolve_model(bad)


def test_hub_model_offline_and_uncached_explains_why(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-cache"))
    with pytest.raises(ModelResolutionError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_tokenizer("balancedbio-tests/no-such-model")


@pytest.mark.slow
def test_prepared_folder_is_plain_safetensors_with_chat_template(prepared_model_dir):
    assert (prepared_model_dir / "model.safetensors").stat().st_size > 100_000_000
    assert not list(prepared_model_dir.glob("*.gguf"))
    config = json.loads((prepared_model_dir / "config.json").read_text())
    assert "quantization_config" not in config, "GGUF quantizer must be stripped before saving"
    provenance = json.loads((prepared_model_dir / PROVENANCE_FILE).read_text())
    assert provenance["source"] == "embedded:smollm2-135m-instruct"
    assert provenance["parameters"] > 100_000_000
    assert len(provenance["gguf_sha256"]) == 64
    tokenizer = load_tokenizer(str(prepared_model_dir))
    assert "<|im_start|>" in tokenizer.chat_template
    text = tokenizer.apply_chat_template(MEDICAL_CHAT, tokenize=False, add_generation_prompt=True)
    assert text.rstrip().endswith("<|im_start|>assistant")


@pytest.mark.slow
def test_prepared_model_answers_and_matches_the_gguf_greedily(prepared_model_dir):
    prepared = load_causal_lm(str(prepared_model_dir))
    tokenizer = load_tokenizer(str(prepared_model_dir))
    answer = chat_generate(prepared, tokenizer, MEDICAL_CHAT, max_new_tokens=24)
    assert answer.strip(), "greedy answer is empty"
    assert "<|im_end|>" not in answer

    # The conversion must not change the model: same greedy tokens as the GGUF itself.
    gguf_model = load_causal_lm("embedded:smollm2-135m-instruct")
    gguf_tokenizer = load_tokenizer("embedded:smollm2-135m-instruct")
    assert chat_generate(gguf_model, gguf_tokenizer, MEDICAL_CHAT, max_new_tokens=24) == answer


@pytest.mark.slow
def test_prepared_model_is_trainable(prepared_model_dir):
    import torch

    model = load_causal_lm(str(prepared_model_dir))
    tokenizer = load_tokenizer(str(prepared_model_dir))
    batch = tokenizer(["Insulin is produced by the pancreas."], return_tensors="pt")
    loss = model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads[:5])


def test_hub_models_load_only_safetensors_and_the_nli_judge_honours_its_revision(tmp_path):
    # A real (offline) Hugging Face cache with three commits of an NLI model and a policy model
    # that ships only pytorch_model.bin; the loaders run in a fresh interpreter that reads it.
    import os
    import subprocess
    import sys

    job = Path(__file__).with_name("fault_hub_job.py")
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(job), str(tmp_path)], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(done.stdout.strip().splitlines()[-1])
    assert outcome["nli_main"] == 0  # refs/main: "entailment" is label 0
    assert outcome["nli_pinned"] == 2  # the pinned commit orders its labels differently
    refused = "has no safetensors weights at this revision; pickled *.bin weights are refused"
    assert refused in outcome["nli_pickled"] and refused in outcome["policy_pickled"]
