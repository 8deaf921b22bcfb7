"""Every contact with megatron-core internals that are not a stable public API, across the releases we support.

We support megatron-core 0.16 (our lock) through 0.19 (current NGC containers). Each seam below is one
small function (or context) that the rest of tri_megatron calls instead of touching the internal itself;
``tests/test_mcore_internals.py`` pins what each one relies on in the installed release (signatures,
attribute names, behaviour), so an upgrade fails in CI with a message naming the seam instead of
misbehaving in a long run. Verified with 0.16.1 and 0.19.0. One package owns every contact: this module
re-exports the seams of ``mtp.py``, ``model.py``, ``checkpoint.py`` and ``host.py`` (one per section
of the list below; ``release.py`` holds the installed release and ``SeamError``).

Model (``model/fused_loss.py``, ``model/config.py``, ``model/attention.py``):

* ``GPTModel._postprocess`` (private, overridden by ``FusedLossGPTModel``): positional arguments up to
  ``rotary_pos_sin``, the keyword arguments in ``POSTPROCESS_KWARGS``, and ``GPTModel.forward`` calling it
  by keyword; ``mtp_block_inputs`` builds the MTP block call as ``_postprocess`` does (0.19 added
  ``padding_mask``, ``output_processor``, ``output_processor_context``).
* ``roll_tensor`` / ``MTPLossAutoScaler`` (module internals of ``multi_token_prediction``): ``mtp_roll_left``
  (returns the rolled tensor and the token count of the rolled mask) and ``attach_mtp_loss``. Unchanged
  0.16 -> 0.19.
* the MTP loss arithmetic the fused loss reproduces: 0.19 moved it to ``process_mtp_loss`` and changed it --
  with ``calculate_per_token_loss`` each depth's loss is multiplied by (tokens before the roll / tokens
  after it), token counts are clamped to >= 1 and the logged mean is 0 without tokens; ``mtp_detach_heads``
  is new. ``normalize_mtp_loss``, ``mtp_loss_for_log``, ``mtp_heads_detached``.
* the class-global MTP loss tracker (``MTPLossLoggingHelper.tracker``): 0.16 stores per-depth losses
  under ``"values"`` via ``save_loss_to_tracker``; 0.19 under ``"loss_values"`` (plus acceptance counts)
  via ``save_metrics_to_tracker``. ``record_mtp_loss``, ``take_mtp_losses``, ``clear_mtp_tracker``.
* ``no_rope_freq`` for MTP (``TriTransformerConfig.__post_init__``): megatron expands an int to a list of
  ``num_layers`` entries. Up to 0.18 the MTP block's transformer layers are numbered after the decoder's
  (``num_layers + d``) and index that list past its end; 0.19 numbers them ``d`` (1, 2, ...), so they read
  the first decoder layers' entries. ``extend_no_rope_freq_for_mtp`` appends RoPE entries (used up to
  0.18, unused on 0.19); ``mtp_transformer_layer_number`` says which number a release gives.
* gradient-accumulation fusion (``model/config.py``): ``tensor_parallel.layers._grad_accum_fusion_available``,
  the module flag ``ColumnParallelLinear`` checks at construction; ``wgrad_fusion_available``.
* RoPE interception (``model/attention.py``'s ``TriSelfAttention.forward``): ``TransformerLayer`` calls its
  self-attention with ``rotary_pos_emb=`` by keyword, ``Attention.forward`` rotates q and k only when it is
  not None, and calls the core attention as ``(q, k, v, mask, attn_mask_type=, attention_bias=,
  packed_seq_params=)``. ``divert_rotary_pos_emb`` takes the frequencies out of the keyword arguments,
  ``is_inference_call`` reads either KV-cache keyword (``inference_context``, ``inference_params``).
* the GPT layer spec's layout (``model/specs.py``): ``spec.submodules.self_attention.module`` and
  ``.submodules.core_attention``: ``set_attention_modules``; its norm slots ``input_layernorm`` and
  ``pre_mlp_layernorm``: ``set_norm_modules``; the MTP block spec's ``layer_specs[i].submodules.enorm`` /
  ``hnorm`` / ``layer_norm``: ``set_mtp_norm_modules``; the decoder block spec megatron derives from a layer
  spec (``TransformerBlockSubmodules``, ``get_num_layers_to_build``) with our final norm: ``decoder_block_spec``.

Distributed data parallel and optimizer (``ops/fused_cross_entropy.py``, ``training/checkpointing.py``,
``training/fault.py``):

* DDP's gradient buffer attributes written on each parameter: ``main_grad`` (the buffer view),
  ``grad_added_to_main_grad`` (set by a layer that accumulated into it; DDP's backward hook then skips
  adding ``.grad``, unless ``zero_out_wgrad``), reset by ``zero_grad_buffer``. ``main_grad``,
  ``in_ddp_grad_buffer``, ``wgrad_placeholder``.
* ``DistributedOptimizer._set_main_param_and_optimizer_states(model_param, tensors)`` (private, wrapped
  per instance while loading without apex/TE) and ``init_state_fn(optimizer, config)``:
  ``torch_adam_step_passthrough``, ``prime_optimizer_state``.
* the global virtual-pipeline rank (``parallel_state.set_virtual_pipeline_model_parallel_rank``) set per
  model chunk around ``sharded_state_dict``, with the metadata's DP/CP group
  (``transformer.utils.ensure_metadata_has_dp_cp_group``): ``model_sharded_state_dicts``.
* an asynchronous sharded save (``dist_checkpointing.save(..., async_sharded_save=True)`` and its
  ``AsyncRequest``): 0.19 added ``async_strategy`` defaulting to nvidia-resiliency-ext's writer:
  ``async_sharded_save`` asks for megatron's own. The writer's results queue (the module global
  ``strategies.filesystem_async._results_queue``, a spawned manager's queue, created on first use unless
  set): ``own_write_results_queue`` starts that manager so that it dies with the trainer.
* the distributed checkpoint's common state: up to 0.18 ``common.pt`` (``CheckpointingConfig`` has
  ``common_backend``), 0.19 a ``ShardedObject`` in the checkpoint: ``common_state_in_common_pt``, and
  that object's key for the single-process reader (``convert/megatron_ckpt.py``): ``common_state_object_key``.

Training loop (``training/loop.py``):

* ``utils.get_batch_on_this_cp_rank``: 0.19 added a required ``is_hybrid_cp`` and reads the CP size and
  rank from ``cp_group`` only (None: the whole world): ``batch_on_this_cp_rank``.

Host stand-ins (``compat/cpu.py``, ``dryrun/fake_world.py``, ``tools/bench_kernels.py``):

* ``tensor_parallel.random._set_cuda_rng_state`` / ``_get_cuda_rng_state`` (private module functions the
  RNG tracker calls) and its "CPU RNG state changed" warning: ``route_rng_tracker_to_host``.
* ``parallel_state.get_data_parallel_group_gloo`` / ``get_expert_data_parallel_group_gloo`` (read through the
  module by megatron's optimizer) answered with the main (non-gloo) groups on a fake world: ``gloo_groups_as_main``.
* ``vocab_parallel_cross_entropy`` on a given group: 0.16 reads the TP group/rank/size through getters
  bound in ``tensor_parallel.cross_entropy`` (rebound here); 0.19 takes ``tp_group=``:
  ``vocab_parallel_cross_entropy_on``. ``rope_utils._apply_rotary_pos_emb_bshd`` (private; 0.19 added
  ``mla_rotary_interleaved``): ``megatron_rope_bshd``.

Pinned only (the caller's owner is changing that file): ``datasets.helpers.build_exhaustive_blending_indices``
(``data/datasets.py``).

Imports of megatron-core happen inside the functions: ``compat`` calls this module before megatron builds
anything, and importing it costs nothing.
"""

from tri_megatron.mcore_internals.release import SeamError, _release, _version  # noqa: F401
from tri_megatron.mcore_internals.mtp import (  # noqa: F401
    POSTPROCESS_KWARGS,
    _MTP_BLOCK_KWARGS,
    _TRACKER_LOSS_KEYS,
    _mtp_logging_helper,
    attach_mtp_loss,
    clear_mtp_tracker,
    mtp_block_inputs,
    mtp_heads_detached,
    mtp_loss_for_log,
    mtp_roll_left,
    mtp_tracker_api,
    normalize_mtp_loss,
    record_mtp_loss,
    take_mtp_losses,
)
from tri_megatron.mcore_internals.model import (  # noqa: F401
    ROPE_KWARG,
    batch_on_this_cp_rank,
    decoder_block_spec,
    divert_rotary_pos_emb,
    extend_no_rope_freq_for_mtp,
    in_ddp_grad_buffer,
    is_inference_call,
    main_grad,
    mtp_transformer_layer_number,
    set_attention_modules,
    set_mtp_norm_modules,
    set_norm_modules,
    wgrad_fusion_available,
    wgrad_placeholder,
)
from tri_megatron.mcore_internals.checkpoint import (  # noqa: F401
    _optimizers,
    async_sharded_save,
    common_state_in_common_pt,
    common_state_object_key,
    model_sharded_state_dicts,
    own_write_results_queue,
    prime_optimizer_state,
    torch_adam_step_passthrough,
)
from tri_megatron.mcore_internals.host import (  # noqa: F401
    RNG_TRACKER_HOOKS,
    _HOST_RNG_WARNING,
    gloo_groups_as_main,
    megatron_rope_bshd,
    route_rng_tracker_to_host,
    vocab_parallel_cross_entropy_on,
)
