"""Hugging Face checkpoints from training state: from the live engine, or from a committed checkpoint.

Every path ends in `save_hf_checkpoint`: the model's own `save_pretrained` with an explicit state
dict (tied weights handled by transformers), safetensors, the tokenizer beside it, and
`export_info.json` saying which step and run produced it. Written atomically. A LoRA run's
checkpoints hold only the adapters: its template names the base model and the adapter config, and
the export folds the adapters into the base weights (the same `merged/` a finished run writes).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from data.artifacts import atomic_directory, library_versions, write_json_atomic
from data.lineage import copy_lineage
from data.model_code import check_trust_remote_code
from training.checkpoint import METADATA, CheckpointError
from training.distributed import barrier
from training.run_dir import RunDir

ADAPTER_CONFIG = "adapter_config.json"  # PEFT's name; in a run's template it marks a LoRA run


def save_hf_checkpoint(model: PreTrainedModel, state_dict: dict[str, torch.Tensor], tokenizer, output: Path,
                       dtype: torch.dtype, info: dict, template: Path | None = None) -> Path:
    """`template`: the run's hf_template, whose lineage.json (which original blocks these are) the export carries."""
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in state_dict.items()}
    model.config.dtype = dtype
    with atomic_directory(output, overwrite=True) as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "export_info.json", {**info, "dtype": str(dtype).removeprefix("torch."),
                                                     "versions": library_versions()})
        if template is not None:
            copy_lineage(template, tmp)
    return output


def export_from_engine(engine, zero_stage: int, rank: int, tokenizer, output: Path, dtype: torch.dtype,
                       info: dict, template: Path | None = None) -> Path:
    """Collective. ZeRO-3 gathers the partitioned weights to rank 0; ZeRO-1/2 hold them whole."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # rank 0 only; None elsewhere
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        save_hf_checkpoint(engine.module, state, tokenizer, output, dtype, info, template)
    barrier()
    return output


def save_adapter_and_merged(model, tokenizer, run: RunDir, dtype: torch.dtype, info: dict) -> None:
    """A LoRA run's outputs: adapter/ in PEFT's format, then merged/, the adapters folded into a plain checkpoint."""
    with atomic_directory(run.adapter, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    merged = model.merge_and_unload()
    save_hf_checkpoint(merged, merged.state_dict(), tokenizer, run.merged, dtype, info, run.template)


def write_lora_template(directory: Path, base_model: str, adapters) -> None:
    """The adapter config, naming the base model by an absolute path when it is local."""
    saved = copy.deepcopy(adapters)
    saved.base_model_name_or_path = str(Path(base_model).resolve()) if Path(base_model).is_dir() else base_model
    saved.save_pretrained(directory)


def merge_lora_checkpoint(template: Path, adapter_state: dict[str, torch.Tensor],
                          trust_remote_code: bool = False) -> PreTrainedModel:
    """The base model named by the template with a checkpoint's adapters folded in."""
    from peft import PeftConfig, get_peft_model

    adapters = PeftConfig.from_pretrained(template)
    base = AutoModelForCausalLM.from_pretrained(adapters.base_model_name_or_path, dtype=torch.float32,
                                                trust_remote_code=trust_remote_code)
    model = get_peft_model(base, adapters)
    expected = {k for k in model.state_dict() if "lora_" in k}
    missing = sorted(expected - set(adapter_state))
    if missing:
        raise CheckpointError(f"the checkpoint lacks {len(missing)} adapter weights of {template / ADAPTER_CONFIG} "
                              f"(first: {missing[0]}): it does not belong to this LoRA run")
    model.load_state_dict({k: v for k, v in adapter_state.items() if k in expected}, strict=False)
    return model.merge_and_unload()


def export_checkpoint(checkpoint: Path, output: Path, dtype: torch.dtype, trust_remote_code: bool = False) -> Path:
    """A committed checkpoint (CPT or LoRA, any ZeRO stage and world size) -> an HF checkpoint, on one CPU process.

    The fp32 master weights are assembled by DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`.
    For CPT the model skeleton is built on the meta device from the run's saved config, so no second
    copy of the weights is allocated; for LoRA the base model is loaded and the adapters merged.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = Path(checkpoint)
    template = RunDir.of_checkpoint(checkpoint).template
    if not (checkpoint / METADATA).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a committed checkpoint (no {METADATA}): pass "
                                "<run>/checkpoints/step_N")
    if not (template / "config.json").is_file():
        raise FileNotFoundError(f"{template} is missing: the run directory must hold the model template "
                                "written at the start of training")
    check_trust_remote_code(template, trust_remote_code)
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    if (template / ADAPTER_CONFIG).is_file():
        model = merge_lora_checkpoint(template, state, trust_remote_code)
        state = model.state_dict()
    else:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(template),
                                                     trust_remote_code=trust_remote_code)
    saved = json.loads((checkpoint / METADATA).read_text())
    info = {"step": saved["step"], "tokens": saved.get("tokens"), "source_checkpoint": str(checkpoint),
            "fingerprints": saved.get("fingerprints")}
    return save_hf_checkpoint(model, state, AutoTokenizer.from_pretrained(template), output, dtype, info, template)
