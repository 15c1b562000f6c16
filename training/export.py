"""Hugging Face checkpoints from training state: from the live engine, or from a committed checkpoint.

Both paths end in `save_hf_checkpoint`: the model's own `save_pretrained` with an explicit state
dict (tied weights handled by transformers), safetensors, the tokenizer beside it, and
`export_info.json` saying which step and run produced it. Written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from data.artifacts import atomic_directory, library_versions, write_json_atomic
from training.checkpoint import METADATA
from training.distributed import barrier

TEMPLATE_DIR = "hf_template"  # the run's model config + tokenizer, saved at start, used by offline exports
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def save_hf_checkpoint(model: PreTrainedModel, state_dict: dict[str, torch.Tensor], tokenizer, output: Path,
                       dtype: torch.dtype, info: dict) -> Path:
    state = {k: v.detach().to("cpu", dtype if v.is_floating_point() else v.dtype).contiguous()
             for k, v in state_dict.items()}
    model.config.dtype = dtype
    with atomic_directory(output, overwrite=True) as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / "export_info.json", {**info, "dtype": str(dtype).removeprefix("torch."),
                                                     "versions": library_versions()})
    return output


def export_from_engine(engine, zero_stage: int, rank: int, tokenizer, output: Path, dtype: torch.dtype,
                       info: dict) -> Path:
    """Collective. ZeRO-3 gathers the partitioned weights to rank 0; ZeRO-1/2 hold them whole."""
    if zero_stage == 3:
        state = engine._zero3_consolidated_16bit_state_dict()  # rank 0 only; None elsewhere
    else:
        state = engine.module.state_dict() if rank == 0 else None
    if rank == 0:
        save_hf_checkpoint(engine.module, state, tokenizer, output, dtype, info)
    barrier()
    return output


def export_checkpoint(checkpoint: Path, output: Path, dtype: torch.dtype) -> Path:
    """A committed checkpoint (any ZeRO stage, any world size) -> an HF checkpoint, on one CPU process.

    The fp32 master weights are assembled by DeepSpeed's `get_fp32_state_dict_from_zero_checkpoint`;
    the model skeleton is built on the meta device from the run's saved config, so no second copy of
    the weights is allocated.
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    checkpoint = Path(checkpoint)
    template = checkpoint.parent.parent / TEMPLATE_DIR
    if not (checkpoint / METADATA).is_file():
        raise FileNotFoundError(f"{checkpoint} is not a committed checkpoint (no {METADATA}): pass "
                                "<run>/checkpoints/step_N")
    if not (template / "config.json").is_file():
        raise FileNotFoundError(f"{template} is missing: the run directory must hold the model template "
                                "written at the start of training")
    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(template))
    saved = json.loads((checkpoint / METADATA).read_text())
    info = {"step": saved["step"], "tokens": saved.get("tokens"), "source_checkpoint": str(checkpoint),
            "fingerprints": saved.get("fingerprints")}
    return save_hf_checkpoint(model, state, AutoTokenizer.from_pretrained(template), output, dtype, info)
