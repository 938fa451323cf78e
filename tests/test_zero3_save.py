"""save_merged under DeepSpeed ZeRO-3: every rank joins the gather, the main process writes the gathered
weights (not the partitioned placeholders its own module holds)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")


def _tiny(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from test_distributed import _tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         pad_token_id=0, eos_token_id=2, bos_token_id=None)
    return LlamaForCausalLM(config), _tokenizer()


class _Accelerator:
    """What save_merged reads of accelerate's Accelerator, for one rank of a ZeRO-3 job."""

    def __init__(self, main: bool, gathered: dict):
        self.is_main_process, self.gathered, self.calls = main, gathered, 0
        self.state = SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3))

    def unwrap_model(self, model):
        return model

    def get_state_dict(self, model):  # the collective: every rank must come here
        self.calls += 1
        return dict(self.gathered)  # save_pretrained empties the dict it is given


def test_zero3_save_writes_the_gathered_state_dict_from_the_main_process_only(tmp_path):
    from safetensors.torch import load_file

    from balancedbio.models import save_merged

    model, tokenizer = _tiny(tmp_path)
    gathered = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with torch.no_grad():  # what a ZeRO-3 rank's module holds: placeholders, not the weights
        for p in model.parameters():
            p.zero_()
    for main in (False, True):
        accelerator = _Accelerator(main, gathered)
        trainer = SimpleNamespace(accelerator=accelerator, model=model, model_wrapped=model)
        out = tmp_path / f"out_main_{main}"
        save_merged(trainer, tokenizer, str(out), {"extra.json": {"a": 1}}, every_rank=True)
        assert accelerator.calls == 1  # the other ranks gather too (HF's save_model does the same)
        assert out.exists() == main
    saved = load_file(str(tmp_path / "out_main_True" / "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(saved[key], gathered[key]) and float(saved[key].abs().sum()) > 0


def test_zero3_save_from_the_main_process_alone_is_refused_not_a_hang(tmp_path):
    from balancedbio.models import save_merged

    model, tokenizer = _tiny(tmp_path)
    trainer = SimpleNamespace(accelerator=_Accelerator(True, {}), model=model, model_wrapped=model)
    with pytest.raises(RuntimeError, match="every_rank=True"):
        save_merged(trainer, tokenizer, str(tmp_path / "out"))
    assert trainer.accelerator.calls == 0 and not (tmp_path / "out").exists()


def test_plain_save_writes_the_module_weights(tmp_path):
    from accelerate import Accelerator
    from safetensors.torch import load_file

    from balancedbio.models import save_merged, zero3_enabled

    model, tokenizer = _tiny(tmp_path)
    accelerator = Accelerator(cpu=True)
    assert not zero3_enabled(accelerator)
    save_merged(SimpleNamespace(accelerator=accelerator, model=model, model_wrapped=model), tokenizer,
                str(tmp_path / "plain"))
    saved = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert torch.equal(saved["model.norm.weight"], model.model.norm.weight.detach())
