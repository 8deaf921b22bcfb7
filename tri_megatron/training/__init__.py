"""Training: loop, optimizer/scheduler, checkpointing, logging, FLOP/MFU accounting."""
