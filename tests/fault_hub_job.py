"""For test_faults.py: hub loading from an offline Hugging Face cache built here (no network).

usage: HF_HUB_CACHE=... HF_HUB_OFFLINE=1 python fault_hub_job.py CACHE
Prints one JSON object: what the NLI judge and the policy loader did for each revision.
"""

import json
import sys
from pathlib import Path

A, B, C = "a" * 40, "b" * 40, "c" * 40


def snapshot(cache: Path, repo: str, commit: str) -> Path:
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(A)
    folder = root / "snapshots" / commit
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def build(cache: Path) -> None:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)

    backend = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "yes": 2, "no": 3}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    tiny = dict(vocab_size=4, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    for commit, labels in ((A, ["entailment", "neutral", "contradiction"]),
                           (B, ["contradiction", "neutral", "entailment"]), (C, ["entailment", "neutral", "x"])):
        folder = snapshot(cache, "owner/nli", commit)
        model = BertForSequenceClassification(BertConfig(**tiny, id2label=dict(enumerate(labels)),
                                                         label2id={v: k for k, v in enumerate(labels)}))
        model.config.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        if commit == C:  # pickled weights only
            torch.save(model.state_dict(), folder / "pytorch_model.bin")
        else:
            model.save_pretrained(folder)
    folder = snapshot(cache, "owner/lm", A)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=4, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2))
    lm.config.save_pretrained(folder)
    torch.save(lm.state_dict(), folder / "pytorch_model.bin")


def attempt(call):
    try:
        return call()
    except Exception as err:  # the test reads the message
        return f"{type(err).__name__}: {err}"


def main() -> None:
    cache = Path(sys.argv[1])
    build(cache)
    from balancedbio.models import load_causal_lm
    from balancedbio.rewards import NLIJudge

    print(json.dumps({
        "nli_main": attempt(lambda: NLIJudge("owner/nli").entailment_id),
        "nli_pinned": attempt(lambda: NLIJudge("owner/nli", revision=B).entailment_id),
        "nli_pickled": attempt(lambda: NLIJudge("owner/nli", revision=C).entailment_id),
        "policy_pickled": attempt(lambda: type(load_causal_lm("owner/lm")).__name__),
    }))


if __name__ == "__main__":
    main()
