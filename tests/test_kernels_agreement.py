"""Issue 12 item 7: the kernel decision is one for all ranks, and the JIT fallback finds its sources
in a non-editable install.

* Two gloo ranks whose own load attempts differ (rank 1 "loaded", rank 0 did not): after
  ``agree_on_kernels`` both use the references, rank 0 says so loudly naming rank 0, and asking
  for the kernels before the agreement raises instead of letting one rank decide alone.
* The model builder runs that agreement before building (so every layer sees the agreed value).
* ``setup.py build_py`` ships csrc/kernels inside the package; the loader imported from that
  build (no checkout next to it) finds every source the checkout has.
"""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from launcher import ROOT, free_port

_RANK_SCRIPT = textwrap.dedent("""
    import os, sys, types
    sys.path.insert(0, {root!r})
    import torch.distributed as dist
    from tri_megatron.ops import _kernels

    rank = int(os.environ["RANK"])
    ok_ranks = {ok_ranks!r}
    fake = types.ModuleType("fake_tri_kernels")
    _kernels._load = (lambda: fake) if rank in ok_ranks else (lambda: None)
    dist.init_process_group("gloo")
    try:
        _kernels.kernels_available()
        print(f"rank{{rank}} early=allowed", flush=True)
    except RuntimeError as exc:
        print(f"rank{{rank}} early=raised", flush=True)
    on = _kernels.agree_on_kernels()
    again = _kernels.agree_on_kernels()  # no second collective: only the decision
    print(f"rank{{rank}} agreed={{on}} again={{again}} available={{_kernels.kernels_available()}}", flush=True)
    dist.destroy_process_group()
""")


def _two_ranks(tmp_path, ok_ranks):
    script = tmp_path / "ranks.py"
    script.write_text(_RANK_SCRIPT.format(root=ROOT, ok_ranks=tuple(ok_ranks)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script)],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, proc.stderr


def test_ranks_that_disagree_all_use_the_references(tmp_path):
    out, err = _two_ranks(tmp_path, ok_ranks=[1])
    for r in (0, 1):
        assert f"rank{r} early=raised" in out
        assert f"rank{r} agreed=False again=False available=False" in out
    assert "loaded on 1 of 2 ranks only (not on ranks 0" in err and "ALL ranks now use the PyTorch reference" in err
    assert err.count("tri_megatron WARNING") == 1  # rank 0 only


def test_ranks_that_agree_keep_the_kernels(tmp_path):
    out, err = _two_ranks(tmp_path, ok_ranks=[0, 1])
    for r in (0, 1):
        assert f"rank{r} agreed=True again=True available=True" in out
    assert "tri_megatron WARNING" not in err


def test_model_builder_agrees_before_building(megatron_single_process, monkeypatch):
    from tri_megatron.config import load_run_config
    from tri_megatron.model.builder import build_gpt_model
    from tri_megatron.model.config import transformer_config
    from tri_megatron.ops import _kernels

    monkeypatch.setattr(_kernels, "_state", {"tried": False, "module": None, "error": None, "agreed": False})
    args = load_run_config(["--mock-data", "--vocab-size", "1024"], world_size=1, rank=0)
    build_gpt_model(transformer_config(args, False), args, False, True, True)
    assert _kernels._state["agreed"]


def test_non_editable_install_ships_the_kernel_sources(tmp_path):
    """The wheel's content is what build_py leaves in build/lib: built from a copy of the tree, loaded
    from a directory with no csrc/ next to the package."""
    src, lib = tmp_path / "src", tmp_path / "lib"
    src.mkdir()
    shutil.copy(os.path.join(ROOT, "setup.py"), src / "setup.py")
    shutil.copytree(os.path.join(ROOT, "csrc"), src / "csrc")
    shutil.copytree(os.path.join(ROOT, "tri_megatron"), src / "tri_megatron",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "_csrc"))
    env = dict(os.environ, TRI_SKIP_CUDA_BUILD="1", PYTHONWARNINGS="ignore")
    res = subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=src,
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert not (lib / "csrc").exists()
    probe = "import tri_megatron.ops._kernels as k; print(k.__file__); print('\\n'.join(k.kernel_sources()))"
    res = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(env, PYTHONPATH=str(lib)))
    assert res.returncode == 0, res.stderr[-2000:]
    module, *sources = res.stdout.split()
    assert module.startswith(str(lib))  # the built package, not the checkout
    assert sources and all(s.startswith(str(lib)) for s in sources), sources
    expected = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "kernels")) if f.endswith((".cu", ".cpp")))
    assert sorted(map(os.path.basename, sources)) == expected
    kdir = os.path.dirname(sources[0])
    headers = sorted(f for f in os.listdir(os.path.join(ROOT, "csrc", "kernels")) if f.endswith((".h", ".cuh")))
    assert headers and all(os.path.isfile(os.path.join(kdir, h)) for h in headers)  # what the .cu include
