"""tri_megatron: Megatron-style 3D-parallel pretraining of the Tri LLM family on megatron-core.

Data flows one way: arguments -> config -> (model, data, optimizer) -> training loop -> checkpoint/logs.
"""

__version__ = "0.1.0"
