"""Intermediate Hugging Face exports during training (``--export-hf-interval N --export-hf-dir DIR``): the
export part of the run configuration, its flags and checks; ``tri_megatron.convert.export_hook`` acts on it."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """--export-hf-interval N --export-hf-dir DIR (the export part of the run configuration)."""

    export_hf_interval: int = 0
    export_hf_dir: Optional[str] = None

    @staticmethod
    def add_flags(parser) -> None:
        g = parser.add_argument_group("Hugging Face exports")
        g.add_argument("--export-hf-interval", type=int, default=0,
                       help="write a Hugging Face snapshot of every N-th iteration's checkpoint, in the background "
                            "(0 = off)")
        g.add_argument("--export-hf-dir", default=None, help="where the snapshots go: DIR/iter_NNNNNNN")

    @classmethod
    def from_args(cls, ns) -> "ExportConfig":
        return cls(export_hf_interval=ns.export_hf_interval or 0, export_hf_dir=ns.export_hf_dir)

    def validate(self, save: Optional[str], save_interval: int) -> None:
        """Raise ValueError (one line, the flag and the fix) for inconsistent export flags."""
        n = self.export_hf_interval
        if n < 0:
            raise ValueError(f"--export-hf-interval {n}: must be >= 0")
        if not n:
            return
        if not self.export_hf_dir:
            raise ValueError("--export-hf-interval needs --export-hf-dir DIR")
        if not save or not save_interval:
            raise ValueError("--export-hf-interval exports saved checkpoints: add --save DIR --save-interval M")
        if n % save_interval:
            raise ValueError(f"--export-hf-interval {n} is not a multiple of --save-interval {save_interval}; "
                             f"only saved iterations can be exported")
