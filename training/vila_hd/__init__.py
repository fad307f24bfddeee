"""VILA-HD: PS3 + a downsampling projector + a Qwen2 LLM, with prompt-driven patch selection (spec section 5)."""
