"""GSM8K accuracy per allreduce backend: a tensor-parallel Llama/Qwen2 decoder whose every
row-parallel reduce goes through an injected reducer, greedy generation with it, the lm-eval
glue that scores GSM8K, and the paired statistics that compare a backend's run with the
reference's.

Nothing here is imported by the plugin at start-up: torch, numpy, transformers, gguf and
lm-eval are imported by the modules that need them.
"""
