"""CPU compatibility for megatron-core: the one place that lets it run without CUDA (tests, quickstart)."""
