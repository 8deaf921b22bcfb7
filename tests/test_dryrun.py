"""``pretrain_tri.py --dry-run``: every production layout in examples/slurm and plan_layout's top three for
tri-7b / tri-21b / tri-70b at 512 and 2,048 GPUs, built by megatron-core at full world size on one CPU
(fake process group, meta device), and compared with plan_layout's analytic memory model.

All layouts run in one subprocess (a dry run needs a process without a process group); the checks are
on its JSON. The expectations come from megatron's layout rules and from perf.layout_model (an independent
analytic count), never from the dry run itself.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from test_slurm import _dry_run as sbatch_command  # the srun line the production scripts run
from test_slurm import _without

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SBATCH = [("tri-7b.sbatch", 64, {}), ("tri-21b.sbatch", 64, {}), ("tri-70b.sbatch", 64, {}),
          ("tri-70b.sbatch", 250, {"GLOBAL_BATCH_SIZE": "1000"})]
PLANS = [(m, g) for m in ("tri-7b", "tri-21b", "tri-70b") for g in (512, 2048)]

RUNNER = textwrap.dedent("""
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    from tri_megatron.dryrun import run, validate
    from tri_megatron.dryrun.compare import compare
    jobs, out = json.load(open(sys.argv[1])), {}
    for name, (argv, world) in jobs.items():
        try:
            cfg = validate(argv, world)
            reports = run(cfg, world, 79.6)
        except Exception as e:  # reported per layout by the test
            out[name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        out[name] = {"reports": [r.__dict__ for r in reports], "compare": compare(cfg, reports),
                     "layers": cfg.arch.num_layers, "vpp": cfg.parallel.model_chunks, "pp": cfg.parallel.pp}
    json.dump(out, open(sys.argv[2], "w"))
""")


def _sbatch_job(script, nodes, extra):
    words = sbatch_command(script, nodes, **extra)
    train = words[words.index("pretrain_tri.py") + 1:]
    return _without(train, ("--data-path", "--tokenizer", "--data-cache-path", "--split")) + ["--mock-data"], 8 * nodes


def _plan_jobs():
    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import plan_layout

    jobs = {}
    for model, gpus in PLANS:
        res = plan_layout.plan(plan_layout.build_parser().parse_args(["--model", model, "--gpus", str(gpus)]))
        for r in res["layouts"][:3]:
            assert r["fits"], f"{model} at {gpus}: plan_layout's top three should fit"
            jobs[f"{model}@{gpus} {r['layout']}"] = (plan_layout.pretrain_flags(res, r), gpus)
    return jobs


@pytest.fixture(scope="module")
def dry_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("dryrun")
    jobs = {f"{s}@{8 * n}": _sbatch_job(s, n, e) for s, n, e in SBATCH}
    jobs.update(_plan_jobs())
    (d / "jobs.json").write_text(json.dumps(jobs))
    (d / "run.py").write_text(RUNNER)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    env.pop("TRI_VIRTUAL_DEVICE", None)
    proc = subprocess.run([sys.executable, str(d / "run.py"), str(d / "jobs.json"), str(d / "out.json")],
                          capture_output=True, text=True, env=env, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((d / "out.json").read_text())


def test_every_layout_builds_at_full_scale_and_matches_the_projection(dry_runs):
    assert len(dry_runs) == len(SBATCH) + 3 * len(PLANS)
    errors = {name: res["error"] for name, res in dry_runs.items() if "error" in res}
    assert not errors, errors
    for name, res in dry_runs.items():
        reports, pp = res["reports"], res["pp"]
        # the roles cover every pipeline rank once, embedding first, output layer last
        assert sorted(r for rep in reports for r in rep["pp_ranks"]) == list(range(pp)), name
        assert "embedding" in reports[0]["chunks"][0] and "output layer" in reports[-1]["chunks"][-1], name
        assert all(len(rep["chunks"]) == res["vpp"] for rep in reports), name
        for rep, cmp in zip(reports, res["compare"]):
            # parameters exactly as the analytic count; buffers = that count x bytes, plus DDP padding only
            assert cmp["params"][0] == round(cmp["params"][1]), (name, cmp["params"])
            for key in ("weight_bytes", "grad_bytes", "optimizer_bytes"):
                got, projected = cmp[key]
                assert projected <= got <= projected * 1.002, (name, key, got, projected)
            got, projected = cmp["layer_activation_bytes"]
            assert abs(got / projected - 1) <= 0.10, (name, "activations", got / projected)
            assert rep["activation_bytes"] > 0 and rep["total_bytes"] > rep["weight_bytes"] + rep["grad_bytes"]


def test_production_layouts_fit_an_h100(dry_runs):
    for script, nodes, _ in SBATCH:
        reports = dry_runs[f"{script}@{8 * nodes}"]["reports"]
        worst = max(r["total_bytes"] for r in reports)
        assert all(r["fits"] for r in reports), (script, nodes, worst / 2**30)


def test_bad_launches_exit_2_with_one_line(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    valid = ["--model", "tri-70b", "--mock-data", "--tensor-model-parallel-size", "8", "--pipeline-model-parallel-size",
             "2", "--micro-batch-size", "1", "--global-batch-size", "1024"]
    for flags, message in ((valid + ["--world-size", "500"], "world size 500 is not divisible"),
                           (valid + ["--world-size", "512", "--load", str(tmp_path)], f"--load {tmp_path}"),
                           (valid, "--world-size N"),
                           (valid + ["--world-size", "512", "--gpu-memory", "0"], "--gpu-memory 0"),
                           ([f for f in valid if f != "--mock-data"] + ["--world-size", "512", "--data-path",
                                                                        str(tmp_path / "missing_text_document")],
                            "--data-path")):
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "pretrain_tri.py"), "--dry-run", *flags],
                              capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert proc.returncode == 2, (flags, proc.stdout[-2000:], proc.stderr[-2000:])
        errors = [ln for ln in proc.stderr.splitlines() if "error:" in ln]
        assert len(errors) == 1 and message in errors[0], (message, proc.stderr[-2000:])
        assert "dry run:" not in proc.stdout  # nothing was built


OLD_TORCH_RUNNER = textwrap.dedent("""
    import json, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    import torch.distributed as dist
    from tri_megatron.dryrun import run, validate
    argv = sys.argv[2:]

    def reports():
        return [r.__dict__ for r in run(validate(argv, 16), 16, 79.6)]

    native = reports()
    try:  # torch >= 2.11 registers c10d's meta kernels here; torch 2.6 has none
        import torch.distributed._meta_registrations as registered
        registered.lib_impl._destroy()
    except ImportError:
        pass
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        dist.broadcast(torch.empty(1, device="meta"), 0)
        raised = False
    except NotImplementedError:
        raised = True
    dist.destroy_process_group()
    old = reports()
    json.dump({"native": native, "old": old, "raised": raised}, open(sys.argv[1], "w"))
""")


def test_dry_run_on_a_torch_without_meta_collectives(tmp_path):
    # torch 2.6 (setup.py's floor) has no meta kernels for c10d's collectives (megatron DDP's parameter
    # broadcast raised): the fake world then registers them, and the dry run reports what it does natively
    (tmp_path / "run.py").write_text(OLD_TORCH_RUNNER)
    flags = ["--model", "tri-7b", "--mock-data", "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size",
             "2", "--use-distributed-optimizer", "--micro-batch-size", "1", "--global-batch-size", "64"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, CUDA_VISIBLE_DEVICES="")
    env.pop("TRI_VIRTUAL_DEVICE", None)
    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "out.json"), *flags],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["raised"]  # the meta kernels are gone, as on torch 2.6
    assert len(out["native"]) == 2 and out["old"] == out["native"]
