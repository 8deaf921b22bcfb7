"""Resuming the optimizer from a checkpoint written by the other kind of optimizer (plain <-> distributed)
or with another main-weight layout, through megatron-core's own model-space optimizer format.

Both of megatron-core's optimizers describe their state per model parameter, keyed by the parameter's
sharded key (so any TP/PP/DP layout reshards it): ``optimizer.state.exp_avg.<key>`` and
``optimizer.state.exp_avg_sq.<key>`` are the same in both. They differ in two places:

* the fp32 main weights: the distributed optimizer's ``fully_reshardable`` format stores them as
  ``optimizer.state.param.<key>``, the plain mixed-precision optimizer as ``optimizer.state.fp32_param.<key>``
  (its ``load_parameter_state_from_fully_reshardable`` accepts either), and the plain fp32 optimizer not at
  all: its main weights are the model's, ``<key>``. ``alias_main_weights`` points a request for a main-weight
  key the checkpoint lacks at the one it has (``load_taken`` reads those that are model weights).
* the non-tensor state (param groups, Adam's step; per-parameter ``state`` ids for the plain one, the
  ``param_state`` of the distributed one). ``assemble`` builds the state dict the *loading* optimizer expects
  from its own structure, the loaded tensors and the checkpoint's step.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.dist_checkpointing.dict_utils import extract_matching_values, merge, nested_values
from megatron.core.dist_checkpointing.mapping import LocalNonpersistentObject, ShardedBase, ShardedTensorFactory
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_MAIN_WEIGHT_PREFIXES = ("optimizer.state.param.", "optimizer.state.fp32_param.")
SWITCH_KEY = "optimizer_switched"  # where the request goes in the loaded state (absent from any checkpoint)


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_distributed(optimizer) -> bool:
    return any(isinstance(o, DistributedOptimizer) for o in _optimizers(optimizer))


def saved_distributed(tensor_keys) -> bool:
    """Whether a checkpoint with these tensor keys was written by the distributed optimizer."""
    return any(k.startswith(_MAIN_WEIGHT_PREFIXES[0]) for k in tensor_keys)


def _sharded(v) -> bool:
    return isinstance(v, (ShardedBase, ShardedTensorFactory))


def _leaves(tree, path=()):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _leaves(v, path + (i,))
    else:
        yield path, tree


def _put(tree, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree[k]
    tree[path[-1]] = value


def alias_main_weights(request: dict, tensor_keys) -> dict:
    """Point each main-weight entry of the optimizer's load request whose key the checkpoint lacks at the
    checkpoint's own main weights: the other optimizer's key, else the model weight itself. megatron
    loads a key once per load, so the entries read from the model weights are taken out of ``request``
    (left as placeholders) and returned, {path in the request: entry}, for ``load_taken``."""
    taken = {}
    for path, sh in list(_leaves(request)):
        if not _sharded(sh) or sh.key in tensor_keys:
            continue
        prefix = next((p for p in _MAIN_WEIGHT_PREFIXES if sh.key.startswith(p)), None)
        if prefix is None:
            continue
        name = sh.key[len(prefix):]
        for candidate in (*(p + name for p in _MAIN_WEIGHT_PREFIXES), name):
            if candidate in tensor_keys:
                sh.key = candidate
                if candidate == name:
                    taken[path] = sh
                    _put(request, path, LocalNonpersistentObject(None))
                break
    return taken


def load_taken(taken: dict, checkpoint: str, loaded: dict) -> None:
    """Load the entries ``alias_main_weights`` took out (the model weights, as main weights) into their
    places in ``loaded`` (the loaded state of the request)."""
    if not taken:
        return
    from megatron.core import dist_checkpointing

    values = dist_checkpointing.load({SWITCH_KEY: {str(i): sh for i, sh in enumerate(taken.values())}}, checkpoint)
    for i, path in enumerate(taken):
        _put(loaded, path, values[SWITCH_KEY][str(i)])


def split(request: dict) -> dict:
    """The part of the optimizer's load request that the load does not produce (its own param groups and
    structure): what is neither sharded nor a local object the load hands back as it is."""
    return extract_matching_values(request, lambda v: _sharded(v) or isinstance(v, LocalNonpersistentObject))[1]


def find_step(tree) -> Optional[object]:
    """Adam's step in an optimizer's saved common state: the plain optimizer's ``common_step``, else the
    ``step`` of its param groups (the distributed optimizer; also TE/apex fused Adam)."""
    if isinstance(tree, dict):
        if "common_step" in tree:
            return tree["common_step"]
        groups = tree.get("param_groups")
        if isinstance(groups, list):
            steps = [g["step"] for g in groups if isinstance(g, dict) and "step" in g]
            if steps:
                return steps[0]
        values = tree.values()
    elif isinstance(tree, list):
        values = tree
    else:
        return None
    for v in values:
        found = find_step(v)
        if found is not None:
            return found
    return None


def _like(old, step):
    value = float(step.item() if torch.is_tensor(step) else step)
    if torch.is_tensor(old):
        return torch.tensor(value, dtype=old.dtype, device=old.device)
    return int(value) if isinstance(old, int) else value


def _set_step(tree, step) -> bool:
    found = False
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == "common_step":
                tree[k], found = _like(v, step), True
            elif k == "param_groups" and isinstance(v, list):
                for g in v:
                    if isinstance(g, dict) and "step" in g:
                        g["step"], found = _like(g["step"], step), True
            else:
                found = _set_step(v, step) or found
    elif isinstance(tree, list):
        for v in tree:
            found = _set_step(v, step) or found
    return found


def assemble(own: dict, loaded_tensors: dict, saved_common) -> dict:
    """The state dict for the loading optimizer's ``load_state_dict``: its own structure ``own``
    (``split`` of its request), the tensors loaded for that request, and Adam's step from the
    checkpoint's common optimizer state ``saved_common``."""
    state = merge(own, loaded_tensors)
    step = find_step(saved_common)
    if step is None:
        raise ValueError("the checkpoint's optimizer state has no Adam step")
    if not _set_step(state, step):
        # a plain optimizer never stepped keeps no step (megatron omits a zero ``common_step``): add it
        # to each torch-optimizer state dict, where the plain optimizer's load_state_dict reads it
        plain = [d for _, d in _dicts(state) if "state" in d and "param_groups" in d]
        if not plain:
            raise ValueError("the optimizer's state has no place for Adam's step")
        for d in plain:
            d["state"]["common_step"] = torch.tensor(float(step.item() if torch.is_tensor(step) else step))
    return state


def _dicts(tree, path=()):
    if isinstance(tree, dict):
        yield path, tree
        for k, v in tree.items():
            yield from _dicts(v, path + (k,))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from _dicts(v, path + (i,))
