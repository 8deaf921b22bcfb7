"""Performance modelling: what a layout of the Tri model costs, on paper (nothing here builds a model).

* ``flops``: FLOP counts of a ``ModelArch`` at a sequence length (model, hardware, per pipeline stage).
* ``devices``: dense bf16 peaks of known GPUs and the device figures the layout model uses.
* ``layout_model``: analytic memory / time / MFU projection of a parallel layout (tools/plan_layout.py).

Training uses ``flops`` and ``devices`` for its MFU / TFLOP/s figures; the measured counterpart, one GPU's
shard of a large layout run in one process, is ``tri_megatron.training.proxy`` (tools/bench_mfu.py).
"""
