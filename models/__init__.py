"""Models: the frozen LLM and CLIP loaders, the V2L tokenizer, losses and metrics."""
