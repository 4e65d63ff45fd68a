"""HF → GGUF conversion for the Qwen2ForCausalLM family (Qwen1.5, Qwen2, Qwen2.5), without torch.

Data flow: ``hf_source`` (download or local folder) → ``safetensors_reader`` (headers, streamed
tensors) + ``vocab`` (BPE tokenizer) + ``tensor_names`` (HF → GGUF names) → ``gguf_writer``
(F32, one tensor at a time) → ``quantize`` (llama.cpp) → ``verify`` → ``manifest``.
``pipeline.run_conversion`` strings them together.
"""
from edge.convert.errors import ConversionError

__all__ = ["ConversionError"]
