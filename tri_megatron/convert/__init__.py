"""Checkpoint conversion between megatron-core distributed checkpoints and Hugging Face format."""
