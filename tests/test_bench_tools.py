"""Smoke tests of tools/bench_mfu.py (run and per-GPU proxy modes) and tools/plan_layout.py on CPU at tiny
sizes: they run, their JSON has the documented structure, and its figures agree with one another.
Nothing here judges speed (CPU timings mean nothing for MFU)."""

import json
import os
import subprocess
import sys

import pytest

from launcher import ROOT, free_port

BENCH = os.path.join(ROOT, "tools", "bench_mfu.py")
PLAN = os.path.join(ROOT, "tools", "plan_layout.py")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    return env


def _run(cmd, check=True):
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def bench(tmp_path, name, *args, nproc=1):
    out = tmp_path / f"{name}.json"
    if nproc == 1:
        cmd = [sys.executable, BENCH]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(free_port()), BENCH]
    proc = _run([*cmd, *args, "--json", str(out)])
    return json.loads(out.read_text()), proc.stdout


def plan(tmp_path, name, *args):
    out = tmp_path / f"{name}.json"
    proc = _run([sys.executable, PLAN, *args, "--json", str(out)])
    return json.loads(out.read_text()), proc.stdout


def _check_metrics(res, tokens, flops_model, flops_hw, gpus_sharing):
    r, peak = res["results"], res["peak_tflops"]
    step = r["step_time_s"]
    assert step == pytest.approx(sorted(r["step_times_s"])[len(r["step_times_s"]) // 2]) or len(r["step_times_s"]) % 2 == 0
    assert r["tokens_per_s_per_gpu"] == pytest.approx(tokens / step / gpus_sharing)
    assert r["model_tflops_per_gpu"] == pytest.approx(flops_model / step / 1e12)
    assert r["hardware_tflops_per_gpu"] == pytest.approx(flops_hw / step / 1e12)
    assert r["mfu"] == pytest.approx(r["model_tflops_per_gpu"] / peak)
    assert r["hfu"] == pytest.approx(r["hardware_tflops_per_gpu"] / peak)
    assert r["mfu_full_attention"] > r["mfu"]  # the PaLM convention does not halve causal attention
    assert r["peak_memory_gib"] > 0
    b = res["breakdown"]
    for key in ("forward_s", "backward_s", "optimizer_s", "pipeline_p2p_s", "grad_sync_s", "exposed_comm_s", "other_s"):
        assert key in b
    assert b["forward_s"] > 0 and b["backward_s"] > 0 and b["optimizer_s"] > 0
    parts = b["forward_s"] + b["backward_s"] + b["optimizer_s"] + b["pipeline_p2p_s"] + b["grad_sync_s"] + b["other_s"]
    assert parts == pytest.approx(b["step_s"])
    assert b["exposed_comm_s"] == pytest.approx(b["pipeline_p2p_s"] + b["grad_sync_s"])
    cal = res["calibration"]
    assert cal["compute_efficiency"] == pytest.approx(cal["hardware_tflops_per_gpu_compute"] / peak)
    assert cal["hardware_tflops_per_gpu_compute"] == pytest.approx(
        flops_hw / (b["forward_s"] + b["backward_s"]) / 1e12, rel=1e-9)


@pytest.fixture(scope="module")
def run_result(tmp_path_factory):
    """The CI smoke command, once: tri-tiny on this machine, one process."""
    return bench(tmp_path_factory.mktemp("bench"), "run", "--model", "tri-tiny", "--warmup", "1", "--iters", "2",
                 "--peak-tflops", "1")


def test_bench_mfu_run_mode(run_result):
    res, stdout = run_result
    assert res["tool"] == "bench_mfu" and res["mode"] == "run"
    assert res["peak_tflops"] == 1.0 and res["peak_source"] == "flag"
    assert res["machine"]["device"] in ("cpu", "cuda") and res["machine"]["num_processes"] == 1
    lay = res["layout"]
    assert (lay["tp"], lay["pp"], lay["dp"], lay["gpus"]) == (1, 1, 1, 1)
    tokens = lay["global_batch_size"] * lay["seq_length"]
    assert res["flops"]["tokens_per_iteration"] == tokens
    assert res["results"]["tokens_per_s"] == pytest.approx(tokens / res["results"]["step_time_s"])
    assert len(res["results"]["step_times_s"]) == 2
    _check_metrics(res, tokens, res["flops"]["model_flops_per_iteration"], res["flops"]["hardware_flops_per_iteration"], 1)
    assert "MFU" in stdout and "tokens/s per GPU" in stdout


def test_bench_mfu_run_mode_pipeline_two_processes(tmp_path):
    res, _ = bench(tmp_path, "pp2", "--model", "tri-tiny", "--pipeline-model-parallel-size", "2", "--seq-length", "64",
                   "--warmup", "0", "--iters", "1", "--breakdown-iters", "1", "--peak-tflops", "1",
                   "--recompute-granularity", "full", nproc=2)
    lay = res["layout"]
    assert (lay["pp"], lay["dp"], lay["gpus"]) == (2, 1, 2)
    tokens = lay["global_batch_size"] * lay["seq_length"]
    f = res["flops"]
    assert f["hardware_flops_per_iteration"] > f["model_flops_per_iteration"]  # full recomputation
    _check_metrics(res, tokens, f["model_flops_per_iteration"] / 2, f["hardware_flops_per_iteration"] / 2, 2)
    assert res["breakdown"]["pipeline_p2p_s"] > 0  # pipeline send / receive measured


@pytest.mark.parametrize("stage,layout", [
    ("last", ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--pipeline-model-parallel-size", "2",
              "--mtp-num-layers", "1", "--proxy-optimizer", "megatron"]),
    ("middle", ["--pipeline-model-parallel-size", "4", "--recompute-granularity", "selective",
                "--use-distributed-optimizer"]),
])
def test_bench_mfu_proxy_mode(tmp_path, stage, layout):
    from tri_megatron.config.arch import ModelArch
    from tri_megatron.perf.flops import model_flops_per_token, stage_flops_per_token

    res, stdout = bench(tmp_path, f"proxy-{stage}", "--model", "tri-tiny", "--warmup", "1", "--iters", "2",
                        "--peak-tflops", "1", "--proxy-gpus", "8", "--proxy-stage", stage, "--micro-batch-size", "1",
                        "--global-batch-size", "8", *layout)
    assert res["mode"] == "proxy" and "proxy" in stdout
    p, lay = res["proxy"], res["layout"]
    tp, pp = lay["tp"], lay["pp"]
    assert lay["sequence_parallel"] == ("--sequence-parallel" in layout)  # the target layout's, as requested
    assert lay["gpus"] == 8 and lay["dp"] == 8 // (tp * pp) and lay["num_microbatches"] == 8 // lay["dp"]
    assert p["run_microbatches"] == p["layout_microbatches"] == lay["num_microbatches"]
    assert p["pre_process"] == (stage == "first") and p["post_process"] == (stage == "last")
    m = res["model"]
    # the shard: 1/TP of heads, groups, FFN and vocabulary, num_layers/PP layers
    sh = p["shard"]
    assert (sh["num_layers"], sh["num_attention_heads"], sh["num_query_groups"], sh["ffn_hidden_size"], sh["vocab_size"]) == \
        (m["num_layers"] // pp, m["num_attention_heads"] // tp, m["num_query_groups"] // tp, m["ffn_hidden_size"] // tp,
         m["padded_vocab_size"] // tp)
    if stage == "last":  # layers + final norm + output layer + MTP (+ the embedding MTP uses), untied
        expected = ModelArch(num_layers=sh["num_layers"], hidden_size=m["hidden_size"],
                             ffn_hidden_size=sh["ffn_hidden_size"], num_attention_heads=sh["num_attention_heads"],
                             num_query_groups=sh["num_query_groups"], kv_channels=m["kv_channels"],
                             vocab_size=sh["vocab_size"], mtp_num_layers=1, context_length=lay["seq_length"],
                             ).num_parameters()
        assert p["shard_parameters"] == expected
    else:  # middle: decoder layers only
        h = m["hidden_size"]
        q, kv = sh["num_attention_heads"] * m["kv_channels"], sh["num_query_groups"] * m["kv_channels"]
        layer = h * (q + 2 * kv) + q * h + 3 * h * sh["ffn_hidden_size"] + 2 * h
        assert p["shard_parameters"] == sh["num_layers"] * layer
    if stage == "last":  # megatron-core's optimizer over the whole shard
        assert p["optimizer"] == "megatron" and p["optimizer_parameters"] == p["shard_parameters"]
    else:  # AdamW over this GPU's distributed-optimizer share
        assert p["optimizer"] == "emulated" and p["optimizer_parameters"] == -(-p["shard_parameters"] // lay["dp"])
    # the shard's FLOPs are its pipeline rank's share of the model at 1/TP
    arch = ModelArch(num_layers=m["num_layers"], hidden_size=m["hidden_size"], ffn_hidden_size=m["ffn_hidden_size"],
                     num_attention_heads=m["num_attention_heads"], num_query_groups=m["num_query_groups"],
                     kv_channels=m["kv_channels"], vocab_size=m["vocab_size"], context_length=lay["seq_length"],
                     mtp_num_layers=m["mtp_num_layers"])
    f = res["flops"]
    st = stage_flops_per_token(arch, lay["seq_length"], pp, 1, p["pipeline_rank"], tp=tp)
    assert f["shard_model_flops_per_token"] == pytest.approx(st["model"])
    assert f["model_flops_per_token"] == pytest.approx(model_flops_per_token(arch, lay["seq_length"]))
    tokens = f["tokens_through_shard_per_iteration"]
    assert tokens == lay["num_microbatches"] * lay["micro_batch_size"] * lay["seq_length"]
    _check_metrics(res, tokens, f["shard_model_flops_per_iteration"], f["shard_hardware_flops_per_iteration"], tp * pp)
    pe = p["pipeline_estimate"]
    assert pe["iteration_s"] > pe["microbatch_s"] * lay["num_microbatches"]  # the bubble
    assert p["estimated_layout_memory_gib"] > 0 and p["not_modelled"]


@pytest.mark.parametrize("extra,message", [
    (["--proxy-gpus", "8", "--context-parallel-size", "2"], "context parallelism"),
    (["--proxy-gpus", "8", "--proxy-stage", "middle", "--pipeline-model-parallel-size", "2"], "middle"),
    (["--tensor-model-parallel-size", "3", "--proxy-gpus", "6"], "--num-attention-heads"),
])
def test_bench_mfu_bad_layouts_exit_2(extra, message, capsys, monkeypatch):
    """Refused with one line and exit code 2 before anything is built (in-process: nothing starts)."""
    import importlib.util

    for var in ("RANK", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)
    spec = importlib.util.spec_from_file_location("bench_mfu", BENCH)
    bench_mfu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_mfu)
    with pytest.raises(SystemExit) as exc:
        bench_mfu.main(["--model", "tri-tiny", "--iters", "1", *extra])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("bench_mfu.py: error:")


def test_plan_layout_smoke_and_consistency(tmp_path):
    res, stdout = plan(tmp_path, "plan", "--model", "tri-21b", "--gpus", "512")
    assert res["tool"] == "plan_layout" and res["projection"] is True
    assert "PROJECTION" in stdout and "Tri team" in stdout
    assert res["reference"]["mfu"] == 0.43 and res["reference"]["hfu"] == 0.47
    assert res["model"]["model_flops_per_token"] == pytest.approx(130.6e9, rel=5e-4)
    assert res["candidates_fitting"] > 0 and len(res["layouts"]) == min(100, res["candidates_evaluated"])
    peak, gpus = res["cluster"]["peak_tflops"], res["cluster"]["gpus"]
    tokens = res["model"]["tokens_per_iteration"]
    fits = [r["fits"] for r in res["layouts"]]
    assert fits == sorted(fits, reverse=True)  # fitting layouts first
    mfus = [r["mfu"] for r in res["layouts"] if r["fits"]]
    assert all(a >= b - 1e-4 for a, b in zip(mfus, mfus[1:]))  # then by MFU
    for r in res["layouts"]:
        t = r["times"]
        assert r["tp"] * r["pp"] * r["cp"] * r["dp"] == gpus
        assert r["num_microbatches"] * r["micro_batch_size"] * r["dp"] == res["model"]["global_batch_size"]
        assert t["iteration_s"] == pytest.approx(t["pipeline_steady_s"] + t["bubble_s"] + t["dp_comm_exposed_s"]
                                                 + t["optimizer_s"])
        assert r["mfu"] == pytest.approx(r["model_flops_per_iteration"] / (gpus * t["iteration_s"] * peak * 1e12))
        assert r["mfu"] == pytest.approx(r["model_tflops_per_gpu"] / peak)
        assert r["tokens_per_s_per_gpu"] == pytest.approx(tokens / gpus / t["iteration_s"])
        assert r["hfu"] >= r["mfu"] and (r["hfu"] > r["mfu"]) == (r["recompute"] is not None)
        assert r["fits"] == (r["memory"]["total_gib"] <= 0.95 * res["cluster"]["memory_gib"])
        if r["pp"] == 1:
            assert t["bubble_s"] == 0


def test_plan_layout_memory_falls_with_tp_pp_and_recomputation(tmp_path):
    res, _ = plan(tmp_path, "mem", "--model", "tri-21b", "--gpus", "512", "--tp", "1", "2", "4", "8", "--pp", "1", "2", "4",
                  "--vpp", "1", "--cp", "1", "--mbs", "1", "--recompute", "none", "full", "--json-top", "0")
    mem = {(r["tp"], r["pp"], r["recompute"]): r["memory"]["total_gib"] for r in res["layouts"]}
    assert len(mem) == 4 * 3 * 2
    for pp in (1, 2, 4):
        for rc in (None, "full"):
            by_tp = [mem[(tp, pp, rc)] for tp in (1, 2, 4, 8)]
            assert by_tp == sorted(by_tp, reverse=True) and len(set(by_tp)) == 4
    for tp in (1, 2, 4, 8):
        assert mem[(tp, 1, None)] > mem[(tp, 2, None)] > mem[(tp, 4, None)]
        assert mem[(tp, 1, "full")] < mem[(tp, 1, None)]


def test_plan_layout_fused_loss_workspace_follows_the_op_tiling():
    """The fused loss's projected workspace uses the op's own tiling (the constants are pinned together):
    one bf16 tile of the op's chunk rows x V/tp, one hidden gradient per head, and with SP the gathered inputs."""
    import torch

    from tri_megatron.config.presets import PRESETS
    from tri_megatron.ops import ce_chunks
    from tri_megatron.perf import layout_model as lm

    assert (lm.FUSED_LOSS_TILE_BYTES, lm.FUSED_LOSS_MIN_CHUNK_ROWS) == (ce_chunks.TILE_BYTES,
                                                                       ce_chunks.MIN_GRAD_CHUNK_ROWS)
    arch = PRESETS["tri-21b"].arch
    tokens = 8192
    for tp, sp in ((1, False), (8, True)):
        vocab = arch.padded_vocab_size(tp) // tp
        rows = ce_chunks.default_chunk_size(vocab, torch.bfloat16, tokens, grads=True, device="cuda")
        heads = 1 + arch.mtp_num_layers
        gathered = heads * 2 * arch.hidden_size * tokens * (1 - 1 / tp) if sp else 0
        want = 2 * rows * vocab + heads * 2 * arch.hidden_size * tokens + gathered
        layout = lm.Layout(tp=tp, pp=1, cp=1, dp=1, sequence_parallel=sp)
        assert lm.fused_loss_workspace_bytes(arch, layout, tokens) == pytest.approx(want)


def test_plan_layout_uses_bench_mfu_calibration(tmp_path, run_result):
    bench_res, _ = run_result
    cal_file = tmp_path / "cpu-bench.json"
    cal_file.write_text(json.dumps(bench_res))
    args = ["--model", "tri-21b", "--gpus", "64", "--tp", "4", "--pp", "1", "--cp", "1", "--mbs", "1",
            "--recompute", "full"]
    default, _ = plan(tmp_path, "default", *args)
    ignored, _ = plan(tmp_path, "ignored", *args, "--calibration", str(cal_file))
    assert ignored["calibration"]["results_ignored_other_device"] == 1  # a CPU result never calibrates an H100
    assert ignored["layouts"][0]["mfu"] == pytest.approx(default["layouts"][0]["mfu"])
    assert default["layouts"][0]["compute_efficiency"] == 0.60
    used, _ = plan(tmp_path, "used", *args, "--calibration", str(cal_file), "--allow-calibration-from-other-devices")
    eff = bench_res["calibration"]["compute_efficiency"]
    assert used["layouts"][0]["compute_efficiency"] == pytest.approx(eff)
    assert "bench_mfu" in used["layouts"][0]["compute_efficiency_source"]
    # an H100 proxy result of exactly this layout beats a same-model result of another layout
    h100 = [dict(calibration=dict(model="tri-21b", tp=4, micro_batch_size=1, seq_length=8192, compute_efficiency=0.5,
                                  device_name="NVIDIA H100 80GB HBM3")),
            dict(calibration=dict(model="tri-21b", tp=8, micro_batch_size=1, seq_length=8192, compute_efficiency=0.3,
                                  device_name="NVIDIA H100 80GB HBM3"))]
    h100_file = tmp_path / "h100.json"
    h100_file.write_text(json.dumps(h100))
    cal, _ = plan(tmp_path, "h100", *args, "--calibration", str(h100_file))
    row = cal["layouts"][0]
    assert row["compute_efficiency"] == 0.5 and "same model, TP" in row["compute_efficiency_source"]
    assert row["mfu"] < default["layouts"][0]["mfu"]
