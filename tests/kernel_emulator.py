"""Runs the real csrc/kernels CUDA source on CPU: a g++ build against tests/cuda_emu + ctypes.

``EmulatedKernels`` has the bound functions of ``tri_megatron._cuda_kernels`` (same names, argument
order and preconditions as csrc/kernels/bindings.cpp) for CPU tensors, and calls the launchers of
``cross_entropy.cu`` / ``rope_ssmax.cu`` compiled for the CPU emulator in ``tests/cuda_emu`` (one OS
thread per CUDA thread, real barriers for ``__syncthreads`` and warp shuffles, bit-exact bf16 / fp16).
Patched in as the ops' kernel module, it runs the kernels' own indexing, reductions and rounding
under every op-level test that uses it, on machines without a GPU. The only source change is the
launch syntax ``k<<<grid, block, smem, stream>>>(args)``, rewritten to ``emu::launch(...)``.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KDIR = os.path.join(ROOT, "csrc", "kernels")
EMU = os.path.join(ROOT, "tests", "cuda_emu")

_DTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_LIB = None


def rewrite_launches(src: str) -> str:
    """``name<<<cfg>>>(args);`` -> ``::emu::launch(cfg, [&] { name(args); });``"""
    out, pos = [], 0
    for m in re.finditer(r"<<<(.*?)>>>", src, flags=re.S):
        if m.start() < pos:
            continue
        line_start = src.rfind("\n", 0, m.start()) + 1
        name_start = line_start + len(src[line_start:m.start()]) - len(src[line_start:m.start()].lstrip())
        name = src[name_start:m.start()].strip()
        i = m.end()
        while src[i].isspace():
            i += 1
        if src[i] != "(":
            raise ValueError(f"unexpected launch syntax near {src[m.start():m.end() + 20]!r}")
        depth, j = 0, i
        while True:
            depth += {"(": 1, ")": -1}.get(src[j], 0)
            if depth == 0:
                break
            j += 1
        out.append(src[pos:name_start])
        out.append(f"::emu::launch({m.group(1)}, [&] {{ {name}{src[i:j + 1]}; }})")
        pos = j + 1
    out.append(src[pos:])
    return "".join(out)


def build() -> ctypes.CDLL:
    """Compile (cached by source hash) and load the emulated kernels library."""
    global _LIB
    if _LIB is not None:
        return _LIB
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("the kernel emulator needs g++ (C++20)")
    sources = sorted(glob.glob(os.path.join(KDIR, "*.cu")))
    deps = sources + sorted(glob.glob(os.path.join(KDIR, "*.h*"))) + sorted(glob.glob(os.path.join(KDIR, "*.cuh"))) \
        + sorted(glob.glob(os.path.join(EMU, "include", "*.h"))) + [os.path.join(EMU, "driver.cpp"), __file__]
    digest = hashlib.sha256(b"".join(open(p, "rb").read() for p in deps)).hexdigest()[:16]
    out_dir = os.path.join(tempfile.gettempdir(), f"tri_cuda_emu_{digest}")
    lib_path = os.path.join(out_dir, "libtri_cuda_emu.so")
    if not os.path.exists(lib_path):
        work = os.path.join(out_dir, f"src.{os.getpid()}")  # per process: test workers may build at once
        os.makedirs(work, exist_ok=True)
        units = [os.path.join(EMU, "driver.cpp")]
        for src in sources:
            dst = os.path.join(work, os.path.basename(src)[:-3] + ".cpp")
            with open(src) as f, open(dst, "w") as g:
                g.write(rewrite_launches(f.read()))
            units.append(dst)
        tmp = lib_path + f".{os.getpid()}.tmp"
        cmd = [cxx, "-std=c++20", "-O2", "-pthread", "-shared", "-fPIC", "-Wno-unknown-pragmas",
               "-I", os.path.join(EMU, "include"), "-I", KDIR, *units, "-o", tmp]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError("building the kernel emulator failed:\n" + " ".join(cmd) + "\n" + res.stderr[-4000:])
        os.replace(tmp, lib_path)
    lib = ctypes.CDLL(lib_path)
    i64, i32, vp, f32 = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p, ctypes.c_float
    lib.emu_ce_forward_stats.argtypes = [i32, vp, i64, i64, i64, vp, i64, vp, vp, vp]
    lib.emu_ce_backward_inplace.argtypes = [i32, vp, i64, i64, i64, vp, i64, vp, vp, vp]
    lib.emu_rope_query_scale.argtypes = [i32, i64, i64, i32, i32, i32, i32, i32, i32, vp, vp, vp, vp, i64, i64,
                                         vp, i32, vp, i32, vp, f32, f32, vp]
    for fn in (lib.emu_ce_forward_stats, lib.emu_ce_backward_inplace, lib.emu_rope_query_scale):
        fn.restype = i32
    _LIB = lib
    return lib


def _ptr(t):
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str):
    if rc != 0:
        raise RuntimeError(f"{what} failed: emulated cudaError {rc}")


def _dtype_id(t: torch.Tensor) -> int:
    if t.dtype not in _DTYPE:
        raise RuntimeError(f"tri kernels support float32 / bfloat16 / float16, got {t.dtype}")
    return _DTYPE[t.dtype]


def _vector(t, dtype, numel, name):
    assert t.device.type == "cpu", name
    assert t.dtype == dtype, f"{name} must be {dtype}, got {t.dtype}"
    assert t.is_contiguous(), f"{name} must be contiguous"
    assert numel < 0 or t.numel() == numel, f"{name} must have {numel} elements, got {t.numel()}"


class EmulatedKernels:
    """The extension's three functions (bindings.cpp contract) over the emulated CUDA launchers."""

    def __init__(self):
        self.lib = build()
        self.calls = []

    @staticmethod
    def _ce_args(logits, labels, vocab_start, *fp32_rows):
        """bindings.cpp's checks of a cross-entropy call; the launcher's leading arguments."""
        assert logits.dim() == 2 and logits.stride(1) == 1, "logits must be [rows, vocab] with unit stride"
        rows = logits.shape[0]
        _vector(labels, torch.long, rows, "labels")
        for i, t in enumerate(fp32_rows):
            _vector(t, torch.float32, rows, f"per-row vector {i}")
        return (_dtype_id(logits), logits.data_ptr(), rows, logits.shape[1], logits.stride(0),
                labels.data_ptr(), int(vocab_start), *(t.data_ptr() for t in fp32_rows))

    def ce_forward_stats(self, logits, labels, vocab_start, row_max, row_sumexp, target_logit):
        self.calls.append("ce_forward_stats")
        args = self._ce_args(logits, labels, vocab_start, row_max, row_sumexp, target_logit)
        _check(self.lib.emu_ce_forward_stats(*args), "ce_forward_stats")

    def ce_backward_inplace(self, logits, labels, vocab_start, lse, p_coef, t_coef):
        self.calls.append("ce_backward_inplace")
        args = self._ce_args(logits, labels, vocab_start, lse, p_coef, t_coef)
        _check(self.lib.emu_ce_backward_inplace(*args), "ce_backward_inplace")

    def rope_query_scale(self, q_in, q_out, k_in, k_out, cos, sin, freq_batch, cu_seqlens, positions,
                         ssmax_scale, q_saved, ds_partial, mode, rotate, inverse, floor_scale, attn_scale):
        self.calls.append(("rope_query_scale", bool(inverse)))
        assert q_in is not None or k_in is not None, "rope_query_scale needs q or k"
        assert (q_in is None) == (q_out is None) and (k_in is None) == (k_out is None)
        like = q_in if q_in is not None else k_in
        assert like.dim() == 4
        views, strides = [], []
        for name, t in (("q_in", q_in), ("q_out", q_out), ("k_in", k_in), ("k_out", k_out), ("q_saved", q_saved)):
            if t is None:
                views.append(None)
                strides += [0, 0, 0]
                continue
            assert t.dim() == 4 and t.stride(3) == 1, f"{name} must be [S, B, H, D] with unit stride on D"
            assert t.dtype == like.dtype and t.device == like.device, name
            assert (t.shape[0], t.shape[1], t.shape[3]) == (like.shape[0], like.shape[1], like.shape[3]), name
            views.append(t.data_ptr())
            strides += [t.stride(0), t.stride(1), t.stride(2)]
        S, B, D = like.shape[0], like.shape[1], like.shape[3]
        hq = q_in.shape[2] if q_in is not None else 0
        hk = k_in.shape[2] if k_in is not None else 0
        rows = S * B
        rot_dim = freq_rows = 0
        if rotate:
            assert cos is not None and sin is not None and cos.dim() == 2 and cos.shape == sin.shape
            _vector(cos, torch.float32, -1, "cos")
            _vector(sin, torch.float32, -1, "sin")
            rot_dim, freq_rows = cos.shape[1], cos.shape[0]
            assert rot_dim % 2 == 0 and rot_dim <= D
            assert freq_batch in (1, B)
        num_docs = 0
        if cu_seqlens is not None:
            assert B == 1
            _vector(cu_seqlens, torch.int32, -1, "cu_seqlens")
            num_docs = cu_seqlens.numel() - 1
        if positions is not None:
            _vector(positions, torch.int32, rows, "positions")
        if mode == 1 and q_in is not None:
            _vector(ssmax_scale, torch.float32, hq, "ssmax_scale")
        if ds_partial is not None:
            assert inverse and mode == 1 and q_in is not None and q_saved is not None
            _vector(ds_partial, torch.float32, rows * hq, "ds_partial")
        ptrs = (ctypes.c_void_p * 5)(*views)
        strd = (ctypes.c_int64 * 15)(*strides)
        _check(self.lib.emu_rope_query_scale(
            _dtype_id(like), S, B, hq, hk, D, rot_dim, int(bool(rotate)), int(bool(inverse)), ptrs, strd,
            _ptr(cos) if rotate else None, _ptr(sin) if rotate else None, freq_rows, int(freq_batch),
            _ptr(cu_seqlens), num_docs, _ptr(positions), int(mode),
            _ptr(ssmax_scale) if mode == 1 and q_in is not None else None, float(floor_scale),
            float(attn_scale), _ptr(ds_partial)), "rope_query_scale")
