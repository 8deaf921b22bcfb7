"""Conversions stream tensor by tensor: the safetensors writer against safetensors' own ``save_file`` (byte
for byte), the plain-read HF reader against ``safe_open``, and peak memory that does not grow with the
number of tensors (measured in a subprocess: resident-set high-water mark, not time).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tri_megatron.convert.hf_io import HFCheckpoint, ShardWriter, TensorSpec, safetensors_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int8, torch.uint8,
          torch.bool, torch.float64, torch.int16]


def _tensors(n, seed=0, dtypes=DTYPES):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(n):
        dt = dtypes[i % len(dtypes)]
        shape = [(3 * i) % 7 + 1, (5 * i) % 4 + 1][: 1 + i % 2] if i % 9 else []  # includes 0-dim tensors
        x = torch.randn(shape, generator=g) * 50
        out[f"model.layers.{(7 * i) % n}.w{i}"] = x.to(dt) if dt.is_floating_point else x.to(torch.int64).to(dt)
    return out


def _save_file_bytes(tensors, tmp_path, name):
    from safetensors.torch import save_file

    path = os.path.join(tmp_path, name)
    save_file(tensors, path, metadata={"format": "pt"})
    return open(path, "rb").read()


def test_layout_and_writer_match_safetensors_save_file_byte_for_byte(tmp_path):
    tensors = _tensors(40)
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    header, offsets = safetensors_layout(specs, {"format": "pt"})
    reference = _save_file_bytes(tensors, tmp_path, "ref.safetensors")
    assert reference[: len(header)] == header
    for k, v in tensors.items():
        assert reference[offsets[k]: offsets[k] + TensorSpec(k, tuple(v.shape), v.dtype).nbytes] == \
            v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    # the writer: several shards (the greedy split of the plan order), tensors added out of order
    max_shard = 200
    out = tmp_path / "out"
    out.mkdir()
    writer = ShardWriter(str(out), max_shard, specs)
    for k in reversed(list(tensors)):
        writer.add(k, tensors[k])
    weight_map = writer.finish()
    shards, size = [], 0  # the split rule, written out independently
    for s in specs:
        if not shards or (shards[-1] and size + s.nbytes > max_shard):
            shards.append([])
            size = 0
        shards[-1].append(s.name)
        size += s.nbytes
    assert len(shards) > 3
    n = len(shards)
    for k, names in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        assert {name for name, f in weight_map.items() if f == fname} == set(names)
        expected = _save_file_bytes({name: tensors[name] for name in names}, tmp_path, f"ref{k}.safetensors")
        assert (out / fname).read_bytes() == expected, fname
        assert oct(os.stat(out / fname).st_mode & 0o777) == oct(0o644)
    index = json.load(open(out / "model.safetensors.index.json"))
    assert index["metadata"]["total_size"] == sum(s.nbytes for s in specs)
    assert list(index["weight_map"]) == sorted(tensors)

    # the reader (plain reads) returns what safetensors' own reader returns
    json.dump({}, open(out / "config.json", "w"))
    hf = HFCheckpoint(str(out))
    from safetensors import safe_open

    for k, v in tensors.items():
        with safe_open(str(out / weight_map[k]), "pt") as f:
            ref = f.get_tensor(k)
        got = hf.get(k)
        assert got.dtype == ref.dtype == v.dtype and torch.equal(got, ref) and hf.shape(k) == tuple(v.shape)


def test_writer_rejects_what_the_plan_does_not_hold(tmp_path):
    specs = [TensorSpec("a", (2, 3), torch.float32), TensorSpec("b", (4,), torch.bfloat16)]
    writer = ShardWriter(str(tmp_path), 1 << 20, specs)
    with pytest.raises(ValueError, match="not in the plan"):
        writer.add("c", torch.zeros(1))
    with pytest.raises(ValueError, match=r"tensor a: \[3, 2\] torch.float32, planned \[2, 3\]"):
        writer.add("a", torch.zeros(3, 2))
    writer.add("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="written twice"):
        writer.add("a", torch.zeros(2, 3))
    with pytest.raises(ValueError, match="never written, e.g. b"):
        writer.finish()


PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from tri_megatron.convert.hf_io import ShardWriter, TensorSpec
    n, mib = int(sys.argv[2]), int(sys.argv[3])
    shape = (mib * 2**18,)  # fp32: mib MiB per tensor
    specs = [TensorSpec(f"t{i}", shape, torch.float32) for i in range(n)]
    w = ShardWriter(sys.argv[1], 1 << 40, specs)  # one shard holding every tensor
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for i in range(n):
        w.add(f"t{i}", torch.full(shape, float(i)))
    w.finish()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
""")


def test_writer_peak_memory_does_not_grow_with_the_number_of_tensors(tmp_path):
    """Write 48 tensors of 4 MiB (192 MiB) into one shard: the process's resident high-water mark grows
    by about one tensor, not by the shard (the writer that held a whole shard grew by all 192 MiB)."""
    script = tmp_path / "peak.py"
    script.write_text(PEAK_SCRIPT)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), "48", "4"], capture_output=True, text=True,
                          env=env, timeout=300, check=True)
    grew = int(proc.stdout.split()[-1])
    assert grew < 24 * 2**20, f"peak RSS grew by {grew / 2**20:.1f} MiB while writing 192 MiB in 4 MiB tensors"
    out = tmp_path / "model-00001-of-00001.safetensors"
    assert out.stat().st_size > 48 * 4 * 2**20
    hf_dir = tmp_path
    json.dump({}, open(hf_dir / "config.json", "w"))
    hf = HFCheckpoint(str(hf_dir))
    assert hf.get("t47")[0].item() == 47.0 and hf.get("t0").abs().sum() == 0


def test_import_and_export_hold_one_tensor_at_a_time(tmp_path, megatron_single_process):
    """--from-hf builds each chunk from the source when the writer asks and drops it; --to-hf's reader
    frees each layer's tensors as soon as the caller releases them (no reference cycle waiting for the gc)."""
    import gc
    import weakref

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench_convert_memory import WIDTH, synthesize_hf

    from tri_megatron.convert import megatron_writer
    from tri_megatron.convert.from_hf import from_hf
    from tri_megatron.convert.megatron_ckpt import MegatronCheckpoint

    m = dict(WIDTH, num_layers=6, hidden_size=128, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
             kv_channels=32, vocab_size=1000)
    hf = str(tmp_path / "hf")
    synthesize_hf(m, hf)
    live, most = [], [0]
    orig = megatron_writer.ChunkSource.chunk

    def counting_chunk(self, st):  # count canonical tensors alive whenever a new one is asked for
        get = self.get_canonical

        def tracked(name):
            alive = sum(r() is not None for r in live)
            most[0] = max(most[0], alive)
            t = get(name)
            live.append(weakref.ref(t))
            return t

        self.get_canonical = tracked
        try:
            return orig(self, st)
        finally:
            self.get_canonical = get

    megatron_writer.ChunkSource.chunk = counting_chunk
    gc.disable()
    try:
        from_hf(hf, str(tmp_path / "meg"))
        # 6 layers x 6 canonical tensors + embedding, final norm, output layer; at most the previous one alive
        assert len(live) == 6 * 6 + 3 and most[0] <= 1, (len(live), most[0])
        refs = []
        for name, t in MegatronCheckpoint(str(tmp_path / "meg")).iter_canonical():
            refs.append(weakref.ref(t._base if t._base is not None else t))  # a layer's tensor is a view
            del t
            assert sum(r() is not None for r in refs) <= 6, name  # at most the current layer's tensors
        assert sum(r() is not None for r in refs) <= 1
    finally:
        gc.enable()
        megatron_writer.ChunkSource.chunk = orig


def test_checkpoint_io_on_a_torch_whose_dcp_save_load_lack_no_dist(tmp_path, megatron_single_process, monkeypatch):
    """torch 2.6 (setup.py's floor) has no ``no_dist`` on dcp.save / dcp.load: the converters then use
    save_state_dict / load_state_dict. A checkpoint written that way reads back through the modern
    entry point identically to one written through it, and the other way round."""
    import torch.distributed.checkpoint as dcp

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    from bench_convert_memory import WIDTH, synthesize_hf

    from tri_megatron.convert import dcp_local
    from tri_megatron.convert.from_hf import from_hf
    from tri_megatron.convert.megatron_ckpt import MegatronCheckpoint

    m = dict(WIDTH, num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
             kv_channels=16, vocab_size=300)
    hf = str(tmp_path / "hf")
    synthesize_hf(m, hf)
    from_hf(hf, str(tmp_path / "modern"))
    modern = dict(MegatronCheckpoint(str(tmp_path / "modern")).iter_canonical())

    calls = []
    for name in ("save_state_dict", "load_state_dict"):
        real = getattr(dcp, name)
        monkeypatch.setattr(dcp, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    monkeypatch.setattr(dcp_local, "_takes_no_dist", lambda fn: False)
    from_hf(hf, str(tmp_path / "old"))
    old_read_of_old = dict(MegatronCheckpoint(str(tmp_path / "old")).iter_canonical())
    old_read_of_modern = dict(MegatronCheckpoint(str(tmp_path / "modern")).iter_canonical())
    assert "save_state_dict" in calls and "load_state_dict" in calls
    monkeypatch.undo()
    modern_read_of_old = dict(MegatronCheckpoint(str(tmp_path / "old")).iter_canonical())
    assert len(modern) == 2 * 6 + 3
    for got in (old_read_of_old, old_read_of_modern, modern_read_of_old):
        assert got.keys() == modern.keys()
        for key, t in modern.items():
            assert torch.equal(got[key], t), key
