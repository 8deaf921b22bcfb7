"""The resolved run configuration as a record: printed at start (``describe``, rank 0, one line per part)
and stored in every checkpoint (``run_config_record``: tri_meta.json's "run_config", JSON-safe)."""

from __future__ import annotations

import json

from tri_megatron.config.megatron_flags import ignored_note


def _plain(v):
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def run_config_record(cfg) -> dict:
    """``cfg.to_dict()`` (``cfg``: RunConfig) with only JSON types: what a checkpoint stores."""
    return _plain(cfg.to_dict())


def describe(cfg) -> str:
    """The resolved configuration, compactly: one line per part, ``name=value`` pairs (empty values left out)."""
    lines = ["tri_megatron: resolved configuration (stored in each checkpoint's tri_meta.json as run_config):"]
    for part, values in run_config_record(cfg).items():
        if isinstance(values, dict):
            shown = " ".join(f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"
                             for k, v in values.items() if v not in (None, [], {}, ""))
        else:
            shown = json.dumps(values)
        if shown and shown != "[]":
            lines.append(f"  {part}: {shown}")
    note = ignored_note(tuple(cfg.megatron_flags))
    return "\n".join(lines + ([note] if note else []))
