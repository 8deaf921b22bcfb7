"""The Tri model on megatron-core: layer specs, query scaling (SSMax / temperature tuning), MTP wiring."""
