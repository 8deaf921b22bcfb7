"""torch.distributed.checkpoint save / load inside this one process (no collectives, whether or not a
process group is up: the converters also run inside a training job's export), on every torch setup.py
declares: ``no_dist=True`` where ``dcp.save`` / ``dcp.load`` take it (torch >= 2.7), else the older
``save_state_dict`` / ``load_state_dict``, which take it (torch 2.6). The state dicts written and read
here hold tensors and plain objects only (no ``Stateful``), for which the two entry points do the same."""

from __future__ import annotations

import inspect
import warnings

import torch.distributed.checkpoint as dcp


def _takes_no_dist(fn) -> bool:
    return "no_dist" in inspect.signature(fn).parameters


def save_local(state_dict, storage_writer, planner) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _takes_no_dist(dcp.save):
            dcp.save(state_dict, storage_writer=storage_writer, planner=planner, no_dist=True)
        else:
            dcp.save_state_dict(state_dict, storage_writer, no_dist=True, planner=planner)


def load_local(state_dict, storage_reader, planner) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if _takes_no_dist(dcp.load):
            dcp.load(state_dict, storage_reader=storage_reader, planner=planner, no_dist=True)
        else:
            dcp.load_state_dict(state_dict, storage_reader, no_dist=True, planner=planner)
