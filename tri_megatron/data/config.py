"""The data subsystem's typed configuration and its command-line flags.

``DataConfig`` is the data part of the run configuration (``tri_megatron.config.RunConfig.data``):
``add_flags`` declares the flags, ``from_args`` reads them once from the parsed command line. The
provider (``tri_megatron.data.provider``) builds datasets from it; ``with_training`` adds the few
numbers the data path needs from other parts (sequence length, micro-batch size, seed, vocabulary);
``validate`` holds the checks that need no file (ValueError, one line naming the flag and the fix).

Packed samples (Megatron's meaning; a document ends with the EOD token): ``--reset-position-ids``
restarts position ids after each EOD; ``--reset-attention-mask`` keeps attention inside each document;
``--eod-mask-loss`` puts no loss on positions whose input token is EOD. The documents reach attention
as megatron-core's packed (THD) parameters, whose RoPE restarts at each document, so
``--reset-attention-mask`` asks for ``--reset-position-ids`` (one meaning of a position for RoPE, SSMax's
n and the temperature-tuning position); ``--reset-position-ids`` alone would change nothing in a RoPE
model (megatron-core takes RoPE positions from the sequence index, not from position ids), so it asks
for ``--reset-attention-mask``. ``--mock-data`` then packs EOD-delimited synthetic documents.
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

    @property
    def packed(self) -> bool:
        """Micro-batches carry document boundaries and attention stays inside documents (THD)."""
        return self.reset_attention_mask

    @property
    def needs_eod(self) -> bool:
        return self.eod_mask_loss or self.reset_position_ids or self.reset_attention_mask

    def validate(self, *, context_parallel_size: int = 1) -> None:
        """The checks that need no file (the file checks are provider.validate_data_args's)."""
        if self.num_workers < 0:
            raise ValueError(f"--num-workers {self.num_workers}: must be >= 0")
        if self.reset_attention_mask and not self.reset_position_ids:
            raise ValueError("--reset-attention-mask: packed (THD) attention restarts RoPE at each document; "
                             "add --reset-position-ids")
        if self.reset_position_ids and not self.reset_attention_mask:
            raise ValueError("--reset-position-ids: RoPE takes positions from the sequence, not position ids; "
                             "add --reset-attention-mask to restart them with the attention")
        if self.reset_attention_mask and context_parallel_size > 1:
            raise ValueError("--reset-attention-mask: packed sequences with --context-parallel-size > 1 are not "
                             "supported yet; drop one of them")
        if self.needs_eod and not self.mock_data and not self.tokenizer:
            flag = "--eod-mask-loss" if self.eod_mask_loss else "--reset-attention-mask"
            raise ValueError(f"{flag}: needs --tokenizer to know the EOD id; pass the tokenizer.json")
