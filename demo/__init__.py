"""The offline demo: a generated image world and stand-ins for LLaMA-2 and CLIP."""
