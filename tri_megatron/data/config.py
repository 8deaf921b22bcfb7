"""The data subsystem's typed configuration and its command-line flags.

``DataConfig`` is the data part of the run configuration (``tri_megatron.config.RunConfig.data``):
``add_flags`` declares the flags, ``from_args`` reads them once from the parsed command line. The
provider (``tri_megatron.data.provider``) builds datasets from it; ``with_training`` adds the few
numbers the data path needs from other parts (sequence length, micro-batch size, seed, vocabulary).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from typing import List, Optional


@dataclasses.dataclass(frozen=True)
class DataConfig:
    mock_data: bool = False
    data_path: Optional[List[str]] = None
    data_mixture_schedule: Optional[str] = None
    split: str = "98,2,0"
    data_cache_path: Optional[str] = None
    tokenizer: Optional[str] = None
    num_workers: int = 0
    eod_mask_loss: bool = False
    reset_position_ids: bool = False
    reset_attention_mask: bool = False

    @staticmethod
    def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        g = parser.add_argument_group("data pipeline (tri_megatron.data)")
        g.add_argument("--mock-data", action="store_true", help="synthetic learnable sequences, no files")
        g.add_argument("--data-path", nargs="*", default=None,
                       help="Megatron blend: 'w1 prefix1 w2 prefix2 ...' or 'prefix1 prefix2 ...' (.bin/.idx prefixes "
                            "from tools/preprocess_data.py)")
        g.add_argument("--data-mixture-schedule", default=None, metavar="FILE.yaml",
                       help="per-domain weights over consumed tokens, piecewise linear (examples/data/)")
        g.add_argument("--split", default="98,2,0", help="train,valid,test document split per prefix, as Megatron")
        g.add_argument("--data-cache-path", default=None,
                       help="where dataset and mixture indices are cached (default: <dir of first prefix>/cache)")
        g.add_argument("--tokenizer", default=None, help="tokenizer.json or a directory holding one")
        g.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes per rank")
        g.add_argument("--eod-mask-loss", action="store_true", help="no loss on positions whose input token is EOD")
        g.add_argument("--reset-position-ids", action="store_true",
                       help="packed samples: positions restart at 0 after each EOD (as Megatron)")
        g.add_argument("--reset-attention-mask", action="store_true",
                       help="packed samples: tokens attend only within their own document (as Megatron)")
        return parser

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> "DataConfig":
        return cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)})

    def with_training(self, *, seq_length: int, micro_batch_size: int, seed: int,
                      vocab_size: Optional[int]) -> types.SimpleNamespace:
        """The flat view the provider's functions read (data flags plus the training numbers they need)."""
        return types.SimpleNamespace(**dataclasses.asdict(self), seq_length=seq_length,
                                     micro_batch_size=micro_batch_size, seed=seed, vocab_size=vocab_size)
