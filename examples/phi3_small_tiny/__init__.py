"""A Phi-3-small-shaped decoder served through blocksparse_attn (see serve.py)."""
