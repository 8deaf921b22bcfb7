"""Megatron-LM compatibility: the ``pretrain_gpt.py`` flags a typical launch script passes that are not
tri_megatron flags of their own, each with what it does here.

Every entry of ``MEGATRON_FLAGS`` is one of

* ``accepted``  -- Megatron's meaning is what tri_megatron does (always, or by converting the value);
* ``checked``   -- it restates the Tri architecture: a value that agrees is accepted, one that contradicts
                   the preset is an ``ArgumentError`` naming the preset;
* ``ignored``   -- a performance or host knob whose choice belongs to the layer implementation here; no effect;
* ``refused``   -- not supported: an ``ArgumentError`` with one line saying why and what to do instead.

Sample-based schedules (``--train-samples``, ``--lr-decay-samples``, ``--lr-warmup-samples``,
``--lr-wsd-decay-samples``) and ``--lr-warmup-fraction`` are converted into the iteration counts the run
is configured with, exactly, or refused when they do not divide into whole iterations.

``apply(ns)`` runs before the run configuration is resolved (conversions and the value-only checks);
``check_arch(ns, arch, tp)`` after (the checks against the preset). Flags that are tri_megatron flags too
(``--attention-backend``, ``--lr-wsd-decay-style``, ``--async-save``, ...) are declared by their part.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Callable, Dict, Optional, Tuple

from tri_megatron.config.arch import VOCAB_MULTIPLE, ModelArch
from tri_megatron.config.errors import ArgumentError


@dataclasses.dataclass(frozen=True)
class MegatronFlag:
    flag: str
    kind: str
    """accepted | checked | ignored | refused"""
    reason: str
    """What it does here (accepted, ignored), what it must agree with (checked), or why not (refused)."""
    kwargs: Tuple[Tuple[str, object], ...] = (("action", "store_true"),)
    """How argparse reads it (default: a switch)."""
    check: Optional[Callable[[object], Optional[str]]] = None
    """For a valued flag: the value -> None when fine, else why it is refused (one line)."""

    @property
    def dest(self) -> str:
        return "megatron_" + self.flag.lstrip("-").replace("-", "_")


def _value(**kw) -> Tuple[Tuple[str, object], ...]:
    return tuple(dict(default=None, **kw).items())


def _only(*allowed: str, why: str) -> Callable[[object], Optional[str]]:
    return lambda v: None if v in allowed else why


def _zero(name: str) -> Callable[[object], Optional[str]]:
    return lambda v: None if v == 0 else f"{name} {v}: Tri models pretrain without dropout; pass 0.0 or drop the flag"


_TOKENIZER_TYPES = ("HuggingFaceTokenizer", "NullTokenizer")

MEGATRON_FLAGS: Tuple[MegatronFlag, ...] = (
    # ---- accepted: what tri_megatron always does
    MegatronFlag("--use-mcore-models", "accepted", "the model is always megatron-core's GPTModel"),
    MegatronFlag("--use-flash-attn", "accepted",
                 "core attention is Transformer Engine's (flash/fused backends) or torch SDPA (flash kernels on GPU)"),
    MegatronFlag("--use-dist-ckpt", "accepted", "checkpoints are always megatron-core dist_checkpointing (torch_dist)"),
    MegatronFlag("--distributed-backend", "accepted",
                 "the runtime picks the backend: NCCL on GPU, gloo on CPU",
                 _value(choices=["nccl", "gloo", "ucc"])),
    MegatronFlag("--ckpt-format", "accepted", "checkpoints are torch_dist (megatron-core dist_checkpointing)",
                 _value(), _only("torch_dist", why="only torch_dist (megatron-core dist_checkpointing) is written and "
                                                   "read; pass --ckpt-format torch_dist or drop the flag")),
    MegatronFlag("--tokenizer-type", "accepted",
                 "HuggingFaceTokenizer: --tokenizer-model is a tokenizer.json (or a directory holding one); "
                 "NullTokenizer: --mock-data with --vocab-size",
                 _value(), _only(*_TOKENIZER_TYPES, why="tri_megatron reads a Hugging Face tokenizer.json: pass "
                                 "--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR (tools/train_tokenizer.py "
                                 "makes one)")),
    MegatronFlag("--optimizer", "accepted", "Adam(W) with --weight-decay, as Megatron's adam",
                 _value(), _only("adam", why="only adam (AdamW) is supported")),
    MegatronFlag("--no-create-attention-mask-in-dataloader", "accepted", "no attention mask is ever materialised"),
    MegatronFlag("--recompute-activations", "accepted", "= --recompute-granularity selective"),
    MegatronFlag("--dataloader-type", "accepted", "single: each sample once per epoch, resumable from the position",
                 _value(), _only("single", why="only the single (resumable, Megatron's default) order is supported")),
    MegatronFlag("--lr-warmup-init", "accepted", "warm-up starts from 0, as Megatron's default",
                 _value(type=float), lambda v: None if v == 0 else "warm-up starts from 0 here; pass 0 or drop it"),
    MegatronFlag("--weight-decay-incr-style", "accepted", "constant --weight-decay",
                 _value(), _only("constant", why="weight decay is constant (--weight-decay); pass constant")),
    # ---- sample-based schedules, converted into iterations exactly
    MegatronFlag("--train-samples", "accepted", "converted: --train-iters = samples / --global-batch-size (exactly)",
                 _value(type=int)),
    MegatronFlag("--lr-decay-samples", "accepted", "converted: --lr-decay-iters = samples / --global-batch-size",
                 _value(type=int)),
    MegatronFlag("--lr-warmup-samples", "accepted", "converted: --lr-warmup-iters = samples / --global-batch-size",
                 _value(type=int)),
    MegatronFlag("--lr-wsd-decay-samples", "accepted",
                 "converted: --lr-wsd-decay-iters = samples / --global-batch-size", _value(type=int)),
    MegatronFlag("--lr-warmup-fraction", "accepted",
                 "converted: --lr-warmup-iters = fraction x --lr-decay-iters (a whole number of iterations)",
                 _value(type=float)),
    # ---- checked: restates the Tri architecture
    MegatronFlag("--group-query-attention", "checked", "Tri uses grouped-query attention (--num-query-groups)"),
    MegatronFlag("--swiglu", "checked", "Tri's MLP is SwiGLU"),
    MegatronFlag("--disable-bias-linear", "checked", "Tri's linear layers have no bias"),
    MegatronFlag("--normalization", "checked", "Tri uses RMSNorm", _value()),
    MegatronFlag("--position-embedding-type", "checked", "Tri uses RoPE (iRoPE: some layers NoPE)", _value()),
    MegatronFlag("--untie-embeddings-and-output-weights", "checked", "Tri presets have an untied output layer"),
    MegatronFlag("--attention-dropout", "checked", "Tri pretrains without dropout: 0 only",
                 _value(type=float), _zero("--attention-dropout")),
    MegatronFlag("--hidden-dropout", "checked", "Tri pretrains without dropout: 0 only",
                 _value(type=float), _zero("--hidden-dropout")),
    MegatronFlag("--rotary-percent", "checked", "RoPE on the whole head dimension: 1.0 only", _value(type=float),
                 lambda v: None if v == 1.0 else f"--rotary-percent {v}: Tri applies RoPE to the whole head; pass 1.0"),
    MegatronFlag("--make-vocab-size-divisible-by", "checked",
                 f"the vocabulary is padded to a multiple of {VOCAB_MULTIPLE} whatever the layout (so checkpoints "
                 f"reshard); a value is accepted when Megatron's padding (a multiple of it x TP) gives the same size",
                 _value(type=int)),
    # ---- ignored: performance knobs whose choice belongs to the layer implementation here
    *(MegatronFlag(f, "ignored", "fusions are chosen by the runtime (where their kernels exist)")
      for f in ("--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-gelu-fusion",
                "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-gradient-accumulation-fusion",
                "--cross-entropy-loss-fusion")),
    MegatronFlag("--cross-entropy-fusion-impl", "ignored", "the fused loss is --fused-loss", _value()),
    *(MegatronFlag(f, "ignored", "megatron-core's dist_checkpointing defaults are used")
      for f in ("--ckpt-fully-parallel-save", "--ckpt-fully-parallel-load", "--ckpt-assume-constant-structure")),
    MegatronFlag("--use-cpu-initialization", "ignored", "the runtime decides (CPU initialisation on CPU only)"),
    MegatronFlag("--manual-gc", "ignored", "Python's garbage collector is left as is"),
    MegatronFlag("--manual-gc-interval", "ignored", "Python's garbage collector is left as is", _value(type=int)),
    MegatronFlag("--accumulate-allreduce-grads-in-fp32", "ignored",
                 "gradients accumulate in fp32 main_grad (megatron-core DDP) already"),
    MegatronFlag("--attention-softmax-in-fp32", "ignored", "the attention kernels compute softmax in fp32"),
    MegatronFlag("--no-mmap-bin-files", "ignored", "the .bin files are always memory-mapped"),
    MegatronFlag("--no-save-rng", "ignored", "RNG states are always saved (restored under the same layout only)"),
    *(MegatronFlag(f, "ignored", "the console, --tensorboard-dir and --log-json record what they record")
      for f in ("--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard")),
    *(MegatronFlag(f, "ignored", "the console, --tensorboard-dir and --log-json record what they record",
                   _value(type=int)) for f in ("--timing-log-level", "--tensorboard-queue-size")),
    # ---- refused
    MegatronFlag("--fp16", "refused", "fp16 training (with loss scaling) is not supported; use --bf16"),
    MegatronFlag("--use-legacy-models", "refused", "only megatron-core models are supported"),
    MegatronFlag("--qk-layernorm", "refused", "Tri models have no QK normalisation"),
    MegatronFlag("--add-qkv-bias", "refused", "Tri models have no QKV bias"),
    MegatronFlag("--apply-layernorm-1p", "refused", "Tri norms store gamma itself (not gamma - 1)"),
    MegatronFlag("--num-experts", "refused", "Tri models are dense (no MoE)", _value()),
    MegatronFlag("--expert-model-parallel-size", "refused", "Tri models are dense (no MoE): expert parallelism is 1",
                 _value(type=int), lambda v: None if v == 1 else "Tri models are dense (no MoE); pass 1 or drop it"),
    MegatronFlag("--rampup-batch-size", "refused", "batch-size ramp-up is not supported; use a fixed "
                 "--global-batch-size", _value(nargs="*")),
    MegatronFlag("--vocab-file", "refused", "GPT-2 BPE vocab/merge files are not read; use a Hugging Face "
                 "tokenizer.json with --tokenizer-type HuggingFaceTokenizer --tokenizer-model", _value()),
    MegatronFlag("--merge-file", "refused", "GPT-2 BPE vocab/merge files are not read; use a Hugging Face "
                 "tokenizer.json with --tokenizer-type HuggingFaceTokenizer --tokenizer-model", _value()),
    MegatronFlag("--use-torch-fsdp2", "refused", "FSDP is not supported; use --use-distributed-optimizer (ZeRO-1)"),
    MegatronFlag("--use-custom-fsdp", "refused", "FSDP is not supported; use --use-distributed-optimizer (ZeRO-1)"),
    MegatronFlag("--num-layers-per-virtual-pipeline-stage", "refused",
                 "give the number of stages per rank instead: --virtual-pipeline-model-parallel-size", _value(type=int)),
    MegatronFlag("--rotary-seq-len-interpolation-factor", "refused", "RoPE interpolation is not supported",
                 _value(type=float)),
    MegatronFlag("--tp-comm-overlap", "refused", "TE userbuffer TP overlap is not wired in; drop the flag"),
    MegatronFlag("--use-checkpoint-args", "refused", "the model comes from --model and its flags; a checkpoint's "
                 "tri_meta.json is checked against them"),
)

_BY_FLAG: Dict[str, MegatronFlag] = {f.flag: f for f in MEGATRON_FLAGS}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Declare every Megatron-LM flag of ``MEGATRON_FLAGS`` and ``--tokenizer-model`` (an alias of
    ``--tokenizer``, as in tools/preprocess_data.py)."""
    g = parser.add_argument_group("Megatron-LM compatibility (README: Coming from Megatron-LM)")
    g.add_argument("--tokenizer-model", dest="tokenizer", default=None, help="alias of --tokenizer (as Megatron-LM)")
    for f in MEGATRON_FLAGS:
        g.add_argument(f.flag, dest=f.dest, help=f"[{f.kind}] {f.reason}", **dict(f.kwargs))


def given(ns: argparse.Namespace) -> Dict[str, object]:
    """The Megatron flags present on this command line, flag -> value."""
    out = {}
    for f in MEGATRON_FLAGS:
        v = getattr(ns, f.dest, None)
        if v is not None and v is not False:
            out[f.flag] = v
    return out


def _iters(flag: str, samples: int, gbs: int, target: str) -> int:
    if samples < 0:
        raise ArgumentError(f"{flag} {samples}: must be >= 0")
    if samples % gbs:
        raise ArgumentError(f"{flag} {samples} is not a whole number of iterations of --global-batch-size {gbs} "
                            f"({samples / gbs:g}); pass a multiple of {gbs} or {target} directly")
    return samples // gbs


def apply(ns: argparse.Namespace) -> None:
    """Refuse what is not supported and convert the sample-based schedules into iterations on ``ns``
    (in place), before the run configuration is resolved. Raises ArgumentError (one line)."""
    flags = given(ns)
    for flag, v in flags.items():
        spec = _BY_FLAG[flag]
        if spec.kind == "refused" and spec.check is None:
            raise ArgumentError(f"{flag}: refused: {spec.reason}")
        if spec.check is not None:
            why = spec.check(v)
            if why:
                raise ArgumentError(f"{flag} {v}: {why}" if not why.startswith(flag) else why)
    if flags.get("--tokenizer-type") == "NullTokenizer" and ns.tokenizer:
        raise ArgumentError("--tokenizer-type NullTokenizer takes no --tokenizer-model; pass HuggingFaceTokenizer")
    if flags.get("--tokenizer-type") == "HuggingFaceTokenizer" and not ns.tokenizer:
        raise ArgumentError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR|tokenizer.json")
    if "--recompute-activations" in flags and ns.recompute_granularity is None:
        ns.recompute_granularity = "selective"
    gbs = ns.global_batch_size
    pairs = (("--train-samples", "train_iters", "--train-iters"),
             ("--lr-decay-samples", "lr_decay_iters", "--lr-decay-iters"),
             ("--lr-warmup-samples", "lr_warmup_iters", "--lr-warmup-iters"),
             ("--lr-wsd-decay-samples", "lr_wsd_decay_iters", "--lr-wsd-decay-iters"))
    for flag, dest, iters_flag in pairs:
        if flag not in flags:
            continue
        if getattr(ns, dest) not in (None, 0):
            raise ArgumentError(f"{flag} and {iters_flag} both given; pass one of them")
        setattr(ns, dest, _iters(flag, flags[flag], gbs, iters_flag))
    if "--lr-warmup-fraction" in flags:
        fraction = flags["--lr-warmup-fraction"]
        if ns.lr_warmup_iters:
            raise ArgumentError("--lr-warmup-fraction and --lr-warmup-iters/--lr-warmup-samples both given; pass one")
        if not 0.0 <= fraction <= 1.0:
            raise ArgumentError(f"--lr-warmup-fraction {fraction}: must be within [0, 1]")
        from tri_megatron.config.training import TrainingConfig

        decay = next(v for v in (ns.lr_decay_iters, ns.train_iters, TrainingConfig.train_iters) if v is not None)
        warm = fraction * decay
        if abs(warm - round(warm)) > 1e-6 * max(1.0, warm):
            raise ArgumentError(f"--lr-warmup-fraction {fraction} x {decay} decay iterations = {warm:g} is not a "
                                f"whole number of iterations; pass --lr-warmup-iters {round(warm)}")
        ns.lr_warmup_iters = int(round(warm))


def _contradicts(flag: str, value, arch: ModelArch, what: str) -> ArgumentError:
    return ArgumentError(f"{flag} {value} contradicts the {arch.name} preset (--model {arch.name}), which {what}; "
                         f"drop the flag or restate the preset's value")


def check_arch(ns: argparse.Namespace, arch: ModelArch, tp: int) -> None:
    """The flags restating the architecture against the resolved ``arch`` (exit 2 naming the preset)."""
    flags = given(ns)
    norm = flags.get("--normalization")
    if norm is not None and norm != "RMSNorm":
        raise _contradicts("--normalization", norm, arch, "uses RMSNorm")
    pos = flags.get("--position-embedding-type")
    if pos is not None and pos != "rope":
        raise _contradicts("--position-embedding-type", pos, arch, "uses RoPE (rope)")
    if "--untie-embeddings-and-output-weights" in flags and not arch.untie_embeddings_and_output_weights:
        raise _contradicts("--untie-embeddings-and-output-weights", "", arch, "ties the output layer to the embedding")
    if "--group-query-attention" in flags and arch.num_query_groups > arch.num_attention_heads:
        raise _contradicts("--group-query-attention", "", arch, "has more query groups than heads")
    divisor = flags.get("--make-vocab-size-divisible-by")
    if divisor is not None:
        if divisor < 1:
            raise ArgumentError(f"--make-vocab-size-divisible-by {divisor}: must be >= 1")
        multiple = divisor * tp
        megatron = -(-arch.vocab_size // multiple) * multiple
        ours = -(-arch.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        if megatron != ours:
            raise ArgumentError(
                f"--make-vocab-size-divisible-by {divisor}: Megatron would pad the vocabulary {arch.vocab_size} to "
                f"{megatron} (a multiple of {divisor} x TP {tp}); tri_megatron pads to a multiple of {VOCAB_MULTIPLE} "
                f"whatever the layout ({ours}); pass {VOCAB_MULTIPLE // tp if VOCAB_MULTIPLE % tp == 0 else VOCAB_MULTIPLE}"
                f" or drop the flag")


def record(ns: argparse.Namespace) -> Tuple[str, ...]:
    """The Megatron flags of this command line as ``"--flag value"`` strings (kept in the RunConfig)."""
    return tuple(f if v is True else f"{f} {v}" for f, v in given(ns).items())


def ignored_note(given_flags: Tuple[str, ...]) -> Optional[str]:
    """One line listing the ignored Megatron flags among ``record()``'s (None when there are none)."""
    names = [g.split()[0] for g in given_flags if _BY_FLAG[g.split()[0]].kind == "ignored"]
    return ("pretrain_tri.py: note: Megatron-LM flags without effect here: " + ", ".join(names)) if names else None


def megatron_lm_checkpoint(path: str) -> bool:
    """Whether ``path`` (a save directory or one iteration) holds a checkpoint written by Megatron-LM: the
    iteration its tracker names has dist_checkpointing's metadata.json but no tri_meta.json (which
    tri_megatron writes before its tracker names an iteration)."""
    import os

    tracker = os.path.join(path, "latest_checkpointed_iteration.txt")
    it_dir = path
    if os.path.isfile(tracker):
        it = open(tracker).read().strip()
        it_dir = os.path.join(path, "release" if it == "release" else f"iter_{int(it):07d}") if (
            it == "release" or it.isdigit()) else path
    return os.path.isfile(os.path.join(it_dir, "metadata.json")) and not os.path.isfile(
        os.path.join(it_dir, "tri_meta.json"))


def check_load(load: Optional[str]) -> None:
    """A Megatron-LM checkpoint given to --load: ArgumentError saying how to convert it (one line)."""
    if load and megatron_lm_checkpoint(load):
        raise ArgumentError(
            f"--load {load}: written by Megatron-LM (no tri_meta.json), which --load does not read directly; convert "
            f"it once: python tools/convert_checkpoint.py --to-hf {load} HF_DIR, then --from-hf HF_DIR TRI_DIR "
            f"--target-tp T --target-pp P, and --load TRI_DIR (README: Coming from Megatron-LM)")
