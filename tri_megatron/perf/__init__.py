"""Performance modelling: what a layout of the Tri model costs, estimated and measured on a proxy.

* ``flops``: FLOP counts of a ``ModelArch`` at a sequence length (model, hardware, per pipeline stage).
* ``devices``: dense bf16 peaks of known GPUs and the device figures the layout model uses.
* ``layout_model``: analytic memory / time / MFU projection of a parallel layout (tools/plan_layout.py).
* ``proxy``: one GPU's shard of a large layout, built and run in one process (tools/bench_mfu.py).

Training uses only ``flops`` and ``devices`` (for its MFU / TFLOP/s figures); nothing here is on the
training path otherwise.
"""
