"""The data-mixture schedule: per-domain weights as a piecewise-linear function of training progress.

YAML (see examples/data/mixture_schedule.yaml)::

    unit: tokens            # knot positions count consumed tokens (= consumed samples * seq_length) or `samples`
    domains:                # optional; a domain groups --data-path prefixes by name (basename without
      web: [en, ko, ja]     # `_text_document`) or by full prefix. Without it a prefix's name is its domain.
    knots:                  # strictly increasing positions; numbers or 1.5K/20M/300B/2T strings
      - at: 0
        weights: {web: 0.85, math: 0.075, code: 0.075}   # >= 0, sum to 1; an omitted domain weighs 0
      - at: 1T
        weights: {web: 0.60, math: 0.20, code: 0.20}

Between knots weights are interpolated linearly; before the first and after the last they are constant.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

FLAG = "--data-mixture-schedule"
_SUFFIX = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}
SUM_TOLERANCE = 1e-6


def parse_amount(value, where: str) -> float:
    """12, 1.5e9, '300B', '2T', '10M', '4k' -> float."""
    if isinstance(value, bool):
        raise ValueError(f"{where}: position {value!r} is not a number")
    if isinstance(value, (int, float)):
        out = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMbBgGtT]?)\s*", str(value))
        if not m:
            raise ValueError(f"{where}: position {value!r} is not a number like 0, 2.5e11, 300B or 2T")
        out = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not np.isfinite(out) or out < 0:
        raise ValueError(f"{where}: position {value!r} must be a finite number >= 0")
    return out


def domain_name_of_prefix(prefix: str) -> str:
    """data/ko_text_document -> 'ko' (Megatron-LM's preprocess names outputs <prefix>_<key>_document)."""
    name = os.path.basename(prefix.rstrip("/"))
    for suffix in ("_text_document", "_text_sentence", "_document"):
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return name


@dataclass
class MixtureSchedule:
    unit: str
    positions: np.ndarray  # [M] knot positions in `unit`
    domains: List[str]  # column order of `weights`
    weights: np.ndarray  # [M, K]
    groups: Dict[str, List[str]] = field(default_factory=dict)
    source: str = "<schedule>"

    def positions_in_samples(self, seq_length: int) -> np.ndarray:
        return self.positions / seq_length if self.unit == "tokens" else self.positions.copy()

    def weights_at(self, consumed_samples: float, seq_length: int) -> Dict[str, float]:
        """Scheduled weight of every domain at a position given in samples."""
        pos = self.positions_in_samples(seq_length)
        return {d: float(np.interp(consumed_samples, pos, self.weights[:, k])) for k, d in enumerate(self.domains)}

    def check_domains(self, known: Sequence[str]) -> None:
        """Every scheduled domain must exist among `known` (the domains --data-path provides)."""
        unknown = [d for d in self.domains if d not in known]
        if unknown:
            raise ValueError(f"{FLAG} {self.source}: domain(s) {', '.join(unknown)} not found in --data-path "
                             f"(its domains: {', '.join(known)}); fix the name or add the prefix")


def load_schedule(path: str) -> MixtureSchedule:
    """Parses and checks the YAML; raises ValueError with one line naming the problem."""
    import yaml

    if not os.path.isfile(path):
        raise ValueError(f"{FLAG} {path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except yaml.YAMLError as exc:
        raise ValueError(f"{FLAG} {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return schedule_from_dict(doc, source=path)


def schedule_from_dict(doc, source: str = "<schedule>") -> MixtureSchedule:
    where = f"{FLAG} {source}"
    if not isinstance(doc, dict) or "knots" not in doc:
        raise ValueError(f"{where}: expected a mapping with a `knots:` list (see examples/data/mixture_schedule.yaml)")
    unknown_keys = set(doc) - {"unit", "domains", "knots"}
    if unknown_keys:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown_keys)}; allowed: unit, domains, knots")
    unit = str(doc.get("unit", "tokens")).lower()
    if unit not in ("tokens", "samples"):
        raise ValueError(f"{where}: unit must be `tokens` or `samples`, not {doc.get('unit')!r}")
    groups_raw = doc.get("domains") or {}
    if not isinstance(groups_raw, dict):
        raise ValueError(f"{where}: `domains:` must map a domain name to a list of prefixes or prefix names")
    groups: Dict[str, List[str]] = {}
    for name, members in groups_raw.items():
        members = [members] if isinstance(members, str) else members
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise ValueError(f"{where}: domains.{name} must be a non-empty list of prefix names")
        groups[str(name)] = members
    knots = doc["knots"]
    if not isinstance(knots, list) or not knots:
        raise ValueError(f"{where}: `knots:` must be a non-empty list of {{at, weights}}")
    positions: List[float] = []
    rows: List[Dict[str, float]] = []
    for i, knot in enumerate(knots, start=1):
        kw = f"{where}: knot {i}"
        if not isinstance(knot, dict) or "at" not in knot or not isinstance(knot.get("weights"), dict):
            raise ValueError(f"{kw} must be a mapping with `at:` and `weights: {{domain: weight}}`")
        at = parse_amount(knot["at"], kw)
        if positions and at <= positions[-1]:
            raise ValueError(f"{kw} (at {knot['at']}) must come after knot {i - 1}: positions strictly increase")
        row = {}
        for name, w in knot["weights"].items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
                raise ValueError(f"{kw}: weight of {name!r} must be a number >= 0, not {w!r}")
            row[str(name)] = float(w)
        total = sum(row.values())
        if abs(total - 1.0) > SUM_TOLERANCE:
            raise ValueError(f"{kw} (at {knot['at']}): weights sum to {total:.6g}, they must sum to 1")
        positions.append(at)
        rows.append(row)
    domains: List[str] = []
    for row in rows:
        domains += [d for d in row if d not in domains]
    for name in groups:
        if name not in domains:
            raise ValueError(f"{where}: domains.{name} is defined but no knot gives it a weight")
    weights = np.array([[row.get(d, 0.0) for d in domains] for row in rows], dtype=np.float64)
    return MixtureSchedule(unit, np.array(positions, dtype=np.float64), domains, weights, groups, source)


def static_schedule(domain_weights: Dict[str, float], source: str = "--data-path weights") -> MixtureSchedule:
    """A one-knot schedule (constant weights), e.g. the static Megatron blend from --data-path."""
    total = float(sum(domain_weights.values()))
    if total <= 0:
        raise ValueError(f"{source}: weights must be positive")
    domains = list(domain_weights)
    weights = np.array([[domain_weights[d] / total for d in domains]], dtype=np.float64)
    return MixtureSchedule("samples", np.zeros(1), domains, weights, {}, source)


def resolve_domains(prefixes: Sequence[str], schedule: Optional[MixtureSchedule]) -> List[str]:
    """Domain of each --data-path prefix: by the schedule's `domains:` groups, else by the prefix's name."""
    out = []
    for prefix in prefixes:
        name = domain_name_of_prefix(prefix)
        domain = name
        if schedule is not None:
            hits = [d for d, members in schedule.groups.items()
                    if name in members or prefix in members or os.path.normpath(prefix) in
                    [os.path.normpath(m) for m in members]]
            if len(hits) > 1:
                raise ValueError(f"{FLAG} {schedule.source}: prefix {prefix} is in several domains ({', '.join(hits)})")
            if hits:
                domain = hits[0]
            elif domain not in schedule.domains:
                raise ValueError(f"{FLAG} {schedule.source}: --data-path prefix {prefix} (domain '{name}') is not "
                                 "in the schedule; give it a weight in the knots (0 is allowed) or list it under "
                                 "`domains:`")
        out.append(domain)
    return out
