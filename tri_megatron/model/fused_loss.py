"""GPTModel whose training loss (main head + D MTP heads) runs through the fused chunked
softmax cross-entropy in ``tri_megatron.ops`` instead of output layer + vocab-parallel CE per head
(loss gradients computed in the forward, three GEMMs per token chunk, rescaled in the backward).

Only the loss computation changes: with labels and in training/eval with a loss, the hidden states
of all heads go through one ``fused_mtp_cross_entropy`` call against the shared output weight, so
no full-vocabulary logits are stored. MTP losses are logged and scaled exactly as megatron-core
does (``MTPLossLoggingHelper``, ``mtp_loss_scaling_factor / D`` per head divided by the tokens of
the micro-batch) and reach the backward pass through megatron's ``MTPLossAutoScaler`` attached to the main
loss. Without labels (inference, logits wanted) the stock path runs.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.models.gpt import GPTModel

from tri_megatron.mcore_internals import (attach_mtp_loss, in_ddp_grad_buffer, mtp_block_inputs, mtp_heads_detached,
                                          mtp_loss_for_log, mtp_roll_left, normalize_mtp_loss, record_mtp_loss)
from tri_megatron.ops.fused_cross_entropy import fused_mtp_cross_entropy


class FusedLossGPTModel(GPTModel):
    # overrides megatron-core's private _postprocess: the seam 'GPTModel._postprocess' in mcore_internals
    def _postprocess(self, hidden_states, input_ids, position_ids, labels, rotary_pos_emb, rotary_pos_cos,
                     rotary_pos_sin, mtp_in_postprocess=None, loss_mask=None, **kwargs):
        # Long because it mirrors megatron-core's _postprocess step by step (MTP block, label rolling, loss
        # scaling) with the fused loss in place of its output layer + CE; splitting it would hide that mapping.
        # megatron-core adds keyword arguments to _postprocess between releases (0.19: padding_mask,
        # output_processor...): the ones we do not use pass through untouched (see mcore_internals).
        if labels is None or kwargs.get("inference_context") is not None or not self.post_process \
                or mtp_heads_detached(self.config):
            return super()._postprocess(
                hidden_states, input_ids, position_ids, labels, rotary_pos_emb, rotary_pos_cos, rotary_pos_sin,
                mtp_in_postprocess=mtp_in_postprocess, loss_mask=loss_mask, **kwargs)

        packed_seq_params = kwargs.get("packed_seq_params")
        if mtp_in_postprocess:
            hidden_states = self.mtp(**mtp_block_inputs(
                kwargs, input_ids=input_ids, position_ids=position_ids, hidden_states=hidden_states,
                rotary_pos_emb=rotary_pos_emb, rotary_pos_cos=rotary_pos_cos, rotary_pos_sin=rotary_pos_sin,
                embedding=self.embedding))

        weight = (self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights
                  else self.output_layer.weight)
        depth = self.config.mtp_num_layers or 0
        heads = torch.chunk(hidden_states, 1 + depth, dim=0)
        if loss_mask is None:
            loss_mask = torch.ones_like(labels, dtype=torch.float)
        labels_list, masks, token_counts = [labels], [loss_mask], []
        mtp_labels, mtp_mask = labels, loss_mask
        for _ in range(depth):  # head i predicts the token i+1 further: roll labels and mask as megatron
            mtp_labels, _ = mtp_roll_left(mtp_labels, self.cp_group, packed_seq_params)
            mtp_mask, num_tokens = mtp_roll_left(mtp_mask, self.cp_group, packed_seq_params)
            labels_list.append(mtp_labels)
            masks.append(mtp_mask)
            token_counts.append(num_tokens)

        tp_group = parallel_state.get_tensor_model_parallel_group()
        if self.config.sequence_parallel:
            heads = [tensor_parallel.gather_from_sequence_parallel_region(h) for h in heads]
        else:
            heads = [tensor_parallel.copy_to_tensor_model_parallel_region(h) for h in heads]
        # Under megatron's DDP the weight gradient goes straight into its main_grad buffer (fp32 with
        # grad_reduce_in_fp32), as megatron's gradient-accumulation fusion does: exact accumulation over
        # the op's token chunks (added in the loss backward). DDP's hook then skips the dummy grad
        # (or adds the zeros megatron asks for on a tied embedding via zero_out_wgrad).
        into_main_grad = self.config.gradient_accumulation_fusion or in_ddp_grad_buffer(weight)
        # The op computes its gradients in forward, for the upstream gradient each head's per-token loss
        # will get up to one common factor (loss scale / micro-batches, known only in backward): the main
        # loss's from the loss function (loss_mask-weighted sum, divided by clamp(sum, 1) unless
        # calculate_per_token_loss), the MTP losses' from MTPLossAutoScaler below. Any other upstream stays
        # exact but recomputes the weight gradient (tri_megatron.ops.fused_cross_entropy).
        per_token = self.config.calculate_per_token_loss
        mtp_scale = self.config.mtp_loss_scaling_factor / depth if depth else 1.0
        original_tokens = loss_mask.sum()  # megatron normalises each depth's loss differently by release
        upstream = [1.0 if per_token else 1.0 / torch.clamp(loss_mask.float().sum().to(torch.int), min=1)]
        upstream += [normalize_mtp_loss(mtp_scale, per_token, token_counts[i], original_tokens) for i in range(depth)]
        losses = fused_mtp_cross_entropy(list(heads), weight, labels_list, loss_masks=masks, tp_group=tp_group,
                                         upstream_weights=upstream, accumulate_into_main_grad=into_main_grad)

        main_loss = losses[0]
        for i in range(depth):
            mtp_loss = masks[i + 1] * losses[i + 1]
            if self.training:
                record_mtp_loss(mtp_loss_for_log(torch.sum(mtp_loss), token_counts[i]), i, depth,
                                avg_group=parallel_state.get_data_parallel_group(with_context_parallel=True))
            main_loss = attach_mtp_loss(
                main_loss, normalize_mtp_loss(mtp_scale * mtp_loss, per_token, token_counts[i], original_tokens))
        return main_loss
