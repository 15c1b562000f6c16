"""The quantization stage: 4-bit weight-only GPTQ of any checkpoint the pipeline writes (pruned, CPT
export, merged LoRA), through GPTQModel, in the GPTQ format transformers loads (launch/quantize.py)."""
