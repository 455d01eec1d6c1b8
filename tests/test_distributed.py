"""Data parallelism: sharding and synced BatchNorm in one process, the launcher, and real
torchrun jobs of 2 CPU processes (gloo) on a tiny Split Fashion-MNIST chain (the smoke profile
on 96 training images, pretrain off)."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import ROOT, load_profile, needs_fashion, run, smoke_copy
from freezecache import pipeline
from freezecache.cache.format import open_cache
from freezecache.cache.loader import ChunkShuffleSampler, ShardedChunkBatches
from freezecache.core.yamlio import dump_yaml, load_yaml
from freezecache.training import distributed
from freezecache.training.train import Images

WORKER = ROOT / "tests" / "dist_worker.py"
PY = sys.executable
TIMING = ("epoch_time_s", "stage_wall_s", "peak_rss_mb")  # what may differ between two runs


# -- one process ---------------------------------------------------------------------------------
@pytest.mark.parametrize("n,world", [(19, 2), (1, 2), (7, 3), (64, 4), (5, 1)])
def test_shares_cover_the_batch_once_and_rank_0_is_never_empty(n, world):
    parts = [distributed.share(n, r, world) for r in range(world)]
    covered = [i for p in parts for i in range(n)[p]]
    assert covered == list(range(n))
    sizes = [len(range(n)[p]) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes[0] == max(sizes)


def test_sharded_chunk_batches_make_the_one_process_batches():
    order = ChunkShuffleSampler(41, seed=3)
    sharded = [ShardedChunkBatches(ChunkShuffleSampler(41, seed=3), 8, r, 3) for r in range(3)]
    for epoch in (0, 1):
        order.set_epoch(epoch)
        ids = list(order)
        whole = [ids[i : i + 8] for i in range(0, 41, 8)]
        for s in sharded:
            s.set_epoch(epoch)
        per_rank = [list(s) for s in sharded]
        # 41 = 5 x 8 + 1: the last global batch has one chunk, so ranks 1 and 2 skip that step
        assert [len(p) for p in per_rank] == [6, 5, 5]
        assert [s.empty_tail for s in sharded] == [False, True, True]
        assert all(len(s) == 6 for s in sharded)
        for step, batch in enumerate(whole):
            got = [c for p in per_rank if step < len(p) for c in p[step]]
            assert got == batch
    with pytest.raises(Exception, match="cannot be shared by 3 processes"):
        ShardedChunkBatches(order, 2, 0, 3)


def test_sharded_image_batches_make_the_one_process_batches():
    g = np.random.default_rng(0)
    split = Images(
        torch.from_numpy(g.integers(0, 255, (21, 1, 4, 4), dtype=np.uint8)),
        torch.arange(21),
        torch.tensor([0.5]),
        torch.tensor([0.25]),
    )

    def labels(shard):
        gen = torch.Generator().manual_seed(5)
        return [y.tolist() for _, y in split.batches(5, g=gen, shard=shard)]

    whole = labels((0, 1))
    ranks = [labels((r, 2)) for r in range(2)]
    assert [a + b for a, b in zip(*ranks, strict=True)] == whole
    assert ranks[1][-1] == []  # 21 = 4 x 5 + 1: rank 1 steps on an empty share at the end
    assert split.shard(1, 2).labels.tolist() == list(range(11, 21))


def test_synced_batchnorm_computes_batchnorm_exactly():
    """The synced forward (one process: no reduction) gives torch's BatchNorm: outputs, input
    and parameter gradients, running statistics (fp64, so only the formula can differ)."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double()
    synced = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).double()
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64) * 3 + 5
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with distributed.synced_batchnorm(synced):
        for _ in range(2):
            ya, yb = plain(xa), synced(xb)
            (ya * ya.detach().cos()).sum().backward()
            (yb * yb.detach().cos()).sum().backward()
    assert torch.allclose(ya, yb, atol=1e-12)
    assert torch.allclose(xa.grad, xb.grad, atol=1e-12)
    for (name, a), b in zip(plain.named_parameters(), synced.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10), name
    for name, a in plain.state_dict().items():
        assert torch.allclose(a.double(), synced.state_dict()[name].double(), atol=1e-12), name
    assert "forward" not in vars(synced[1])  # restored after the block


# -- the launcher ---------------------------------------------------------------------------------
def _params(folder: Path, **distributed_) -> Path:
    raw = load_profile("smoke")
    raw["distributed"].update(distributed_)
    path = folder / "params.yaml"
    path.write_text(dump_yaml(raw))
    return path


def _launch(*args: str, env: dict | None = None, cwd: Path = ROOT):
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("FREEZECACHE_", "PET_"))}
    return subprocess.run(
        [PY, "-m", "freezecache.pipeline.launch", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**keep, "PYTHONPATH": str(ROOT / "src"), **(env or {})},
    )


def test_launcher_commands(tmp_path):
    for name in ("one", "two", "nodes"):
        (tmp_path / name).mkdir()
    one = _params(tmp_path / "one", nproc_per_node=1)
    done = _launch("--dry-run", "stages/x.py", "--seed", "0", "--params", str(one))
    assert done.stdout.strip() == f"python stages/x.py --seed 0 --params {one}"

    two = _params(tmp_path / "two", nproc_per_node=2)
    restarts = {"FREEZECACHE_MAX_RESTARTS": "1"}
    done = _launch("--dry-run", "stages/x.py", f"--params={two}", env=restarts)
    assert done.stdout.startswith(
        "python -m torch.distributed.run --nproc-per-node 2 --max-restarts 1 --standalone "
        "stages/x.py"
    ), done.stdout

    nodes = _params(tmp_path / "nodes", nproc_per_node=2, nnodes=3)
    done = _launch("--dry-run", "stages/x.py", "--params", str(nodes))
    assert done.returncode == 2 and "FREEZECACHE_RDZV_ENDPOINT" in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    env = {"FREEZECACHE_RDZV_ENDPOINT": "10.0.0.1:29400", "FREEZECACHE_NODE_RANK": "2"}
    done = _launch("--dry-run", "stages/x.py", "--params", str(nodes), env=env)
    assert "--nnodes 3 --rdzv-backend c10d --rdzv-endpoint 10.0.0.1:29400" in done.stdout
    assert "--node-rank 2" in done.stdout and "--rdzv-id fc-" in done.stdout
    same = _launch("--dry-run", "stages/x.py", "--params", str(nodes), env=env).stdout
    assert same == done.stdout  # every node derives the same rendezvous id


def test_launcher_runs_one_process_in_place(tmp_path):
    script = tmp_path / "stage.py"
    (tmp_path / "_helper.py").write_text("VALUE = 7\n")
    script.write_text(
        "import os, sys\nimport _helper\n"
        "if __name__ == '__main__':\n"
        "    print(os.getpid(), _helper.VALUE, sys.argv[1:])\n    sys.exit(3)\n"
    )
    params = _params(tmp_path)
    proc = subprocess.Popen(
        [PY, "-m", "freezecache.pipeline.launch", str(script), "--params", str(params), "--x"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3  # the script's own exit status
    assert out.strip().split(maxsplit=2) == [str(proc.pid), "7", f"['--params', '{params}', '--x']"]


def test_training_stages_launch_and_list_the_distributed_params():
    stages = load_yaml(ROOT / "dvc.yaml")["stages"]
    for name, stage in stages.items():
        launched = stage["cmd"].startswith("python -m freezecache.pipeline.launch stages/")
        assert launched == (name in pipeline.LAUNCHED), name
        if name != "check":  # check validates every section
            assert ("distributed" in stage["params"]) == bool(pipeline.LAUNCHED.get(name)), name
        if launched:
            assert "${lib}/pipeline/launch.py" in stage["deps"]


# -- torchrun jobs --------------------------------------------------------------------------------
def _tiny(folder: Path, **changes) -> Path:
    """A project folder with the tiny chain's params.yaml and its prepared data.

    batch 19 over 96 images: shares of 10 and 9, and a last step of 1 sample that rank 1 takes
    as an empty share. Freeze point at epoch 2 of 3: train_prefix has two epochs to resume in.
    """
    folder.mkdir(parents=True)
    raw = load_profile("smoke")
    raw["data"].update(train_size=96, val_size=32, test_size=48)
    raw["pretrain"] = None
    raw["rank"]["samples"] = 32
    raw["train"].update(batch_size=19, epochs=3)
    raw["freeze"]["points"] = [{"block": 2, "epoch": 2}]
    for key, value in changes.items():
        section, name = key.split("__")
        raw[section][name] = value
    (folder / "params.yaml").write_text(dump_yaml(raw))
    code = "from freezecache.config import load_config as l; from freezecache.steps.prepare " \
        "import prepare; prepare(l('params.yaml'))"  # fmt: skip
    _run([PY, "-c", code], folder)
    return folder


def _run(cmd: list[str], cwd: Path, timeout: int = 300, **env) -> subprocess.CompletedProcess:
    done = subprocess.run(
        cmd,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", **env},
    )
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    return done


def _torchrun(folder: Path, *args: str, nproc: int = 2, restarts: int = 0):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd += ["--max-restarts", str(restarts), str(WORKER), "--params", "params.yaml"]
    return _run([*cmd, "--dump", "dump", *args], folder)


def _metrics(folder: Path, run: str) -> dict:
    found = json.loads((folder / "runs/s0" / run / "live/metrics.json").read_text())
    return {k: v for k, v in found.items() if k not in TIMING}


def _weights(folder: Path, name: str, rank: int = 0) -> dict:
    return torch.load(folder / "dump" / f"{name}.rank{rank}.pt", weights_only=False)


def _max_diff(a: dict, b: dict) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


TRAINED = ("train_prefix@0", "baseline@0-freezeout", "train_suffix@0-discard_aug-p0")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """The chain (pretrain, prefix, FreezeOut, cache, suffix) run once on 2 processes."""
    folder = _tiny(tmp_path_factory.mktemp("dist") / "two")
    _torchrun(folder, "--baseline", "freezeout")
    return folder


@needs_fashion
def test_two_ranks_end_with_identical_weights_and_write_once(two_ranks):
    for name in TRAINED:
        a, b = _weights(two_ranks, name, 0), _weights(two_ranks, name, 1)
        for part in ("model", "momentum"):
            assert a[part].keys() == b[part].keys() and a[part], (name, part)
            for k in a[part]:
                assert torch.equal(a[part][k], b[part][k]), (name, part, k)
    run = two_ranks / "runs/s0/discard_aug/p0"
    assert json.loads((run / "costs.json").read_text())["train_flops"] > 0
    assert json.loads((run / "ranking.json").read_text())["kind"] == "cnn"
    assert _metrics(two_ranks, "discard_aug/p0")["step"] == 3
    leftovers = [p for p in two_ranks.rglob("*.tmp")] + list((two_ranks / ".ckpt").rglob("*.pt"))
    assert not leftovers, leftovers


@needs_fashion
def test_a_rank_killed_mid_epoch_restarts_and_ends_like_an_uninterrupted_run(two_ranks, tmp_path):
    folder = _tiny(tmp_path / "killed")
    # rank 1 SIGKILLs itself at step 3 of train_prefix's second epoch, on the first attempt
    args = ("--baseline", "freezeout", "--kill-rank", "1", "--kill-epoch", "1", "--kill-step", "2")
    done = _torchrun(folder, *args, restarts=1)
    log = done.stdout + done.stderr
    assert "exitcode: -9" in log and "resuming train_prefix@0 from its checkpoint at epoch 1" in log
    for folder_name in ("prefix", "freezeout", "discard_aug/p0"):
        assert _metrics(folder, folder_name) == _metrics(two_ranks, folder_name), folder_name
    for name in TRAINED:
        assert _max_diff(_weights(folder, name)["model"], _weights(two_ranks, name)["model"]) == 0


@needs_fashion
def test_with_sync_batchnorm_two_ranks_match_one_at_the_same_global_batch(tmp_path):
    """Tolerance: max |weight difference| <= 1e-3 after train_prefix (2 steps) and <= 5e-3 after
    the suffix (4 more), and at most a tenth of what 2 ranks without sync_batchnorm differ by.
    Augmentation off (its draws are per rank) and a lossless cache (a quantized cache of slightly
    different features differs by whole quantization steps)."""
    same = {
        "train__lr": 0.01, "train__batch_size": 48, "train__flip_p": 0.0, "train__crop_pad": 0,
        "augment__crop_pad": 0, "augment__noise_std": 0.0,
        "cache__codec": "none", "freeze__points": [{"block": 2, "epoch": 1}],
    }  # fmt: skip
    one = _tiny(tmp_path / "one", distributed__sync_batchnorm=True, **same)
    two = _tiny(tmp_path / "two", distributed__sync_batchnorm=True, **same)
    plain = _tiny(tmp_path / "plain", distributed__sync_batchnorm=False, **same)
    _run([PY, str(WORKER), "--params", "params.yaml", "--dump", "dump", "--method", "discard"], one)
    for folder in (two, plain):
        _torchrun(folder, "--method", "discard")
    for name, tol in (("train_prefix@0", 1e-3), ("train_suffix@0-discard-p0", 5e-3)):
        synced = _max_diff(_weights(one, name)["model"], _weights(two, name)["model"])
        unsynced = _max_diff(_weights(one, name)["model"], _weights(plain, name)["model"])
        assert synced <= tol and synced * 10 <= unsynced, (name, synced, unsynced)
    a, b = _metrics(one, "discard/p0"), _metrics(two, "discard/p0")
    assert (
        abs(a["train_loss"] - b["train_loss"]) <= 1e-2
        and abs(a["val_acc"] - b["val_acc"]) <= 1 / 32
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_fashion
def test_two_simulated_nodes_train_the_suffix(two_ranks, tmp_path):
    """Two launches of the stage command, one per "node" (1 process each), meet at a c10d
    rendezvous on 127.0.0.1 and train the same suffix the 2-process job trained."""
    folder = tmp_path / "nodes"
    shutil.copytree(two_ranks, folder, ignore=shutil.ignore_patterns("dump", ".ckpt"))
    for out in ("state.pt", "costs.json", "live"):
        target = folder / "runs/s0/discard_aug/p0" / out
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    raw = load_yaml(folder / "params.yaml")
    raw["distributed"].update(nproc_per_node=1, nnodes=2)
    (folder / "params.yaml").write_text(dump_yaml(raw))
    cmd = [PY, "-m", "freezecache.pipeline.launch", str(ROOT / "stages/train_suffix.py")]
    cmd += ["--seed", "0", "--method", "discard_aug", "--point", "0", "--params", "params.yaml"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    env["FREEZECACHE_RDZV_ENDPOINT"] = f"127.0.0.1:{_free_port()}"
    nodes = [
        subprocess.Popen(
            cmd,
            cwd=folder,
            env={**env, "FREEZECACHE_NODE_RANK": str(r)},
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        for r in (0, 1)
    ]
    outs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outs
    assert all("--nnodes 2 --rdzv-backend c10d" in out for out in outs)
    assert _metrics(folder, "discard_aug/p0") == _metrics(two_ranks, "discard_aug/p0")


@pytest.mark.slow
@pytest.mark.extended  # a pipeline of its own on two processes; the torchrun tests above: CI
@needs_fashion
def test_dvc_exp_run_on_two_processes_produces_the_report(smoke_run, tmp_path):
    """On the finished smoke run (what does not train is restored), every launched stage kind
    once on 2 processes: one baseline and one discard method."""
    repo = smoke_copy(smoke_run, tmp_path / "repo")
    done = run(["dvc", "exp", "run", "-S", "distributed.nproc_per_node=2",
                "-S", "methods.baselines=[normal]", "-S", "methods.discard=[discard_aug]"],
               repo)  # fmt: skip
    log = done.stdout + done.stderr
    assert "freezecache.pipeline.launch: python -m torch.distributed.run --nproc-per-node 2" in log
    ran = set(re.findall(r"Running stage '([^'@]+)", log))
    assert ran >= {"pretrain", "train_prefix", "baseline", "cache", "train_suffix", "report"}
    report = json.loads((repo / "results/report.json").read_text())
    assert set(report["methods"]) == {"normal", "discard_aug"}
    assert load_yaml(repo / "params.yaml")["distributed"]["nproc_per_node"] == 2


@needs_fashion
def test_two_ranks_build_the_cache_one_process_builds(tmp_path):
    """600 training images: rank 0 encodes samples 0..511, rank 1 the rest, rank 0 writes the
    file. A relative rANS codec, whose calibration rank 0 measures and shares, so the ranks'
    chunks decode alike: the file is byte for byte the one-process file."""
    one = _tiny(
        tmp_path / "one",
        data__train_size=600,
        cache__relative=True,
        cache__coding="rans",
        cache__tolerance=0.25,
    )
    for script, args in (("pretrain", []), ("train_prefix", ["--seed", "0"])):
        _run([PY, str(ROOT / f"stages/{script}.py"), *args, "--params", "params.yaml"], one)
    two = tmp_path / "two"
    shutil.copytree(one, two)
    raw = load_yaml(two / "params.yaml")
    raw["distributed"]["nproc_per_node"] = 2
    (two / "params.yaml").write_text(dump_yaml(raw))
    cmd = [PY, "-m", "freezecache.pipeline.launch", str(ROOT / "stages/cache.py"), "--seed", "0"]
    cmd += ["--method", "discard_aug", "--point", "0", "--params", "params.yaml"]
    _run(cmd, one)
    done = _run(cmd, two)
    log = done.stdout + done.stderr
    assert "--nproc-per-node 2" in log and "rank 1 encodes samples 512..600 of 600" in log
    cache = "data/cache/s0/discard_aug/p0.h5"
    assert (one / cache).read_bytes() == (two / cache).read_bytes()
    info = open_cache(two / cache, full=True)
    assert info.num_samples == 600 and info.codec_options["coding"] == "rans"
    stats = json.loads((two / "runs/s0/discard_aug/p0/cache.json").read_text())
    assert stats["stored_bytes"] == info.stats["stored_bytes"]
    assert not list((two / ".ckpt").rglob("journal.bin"))  # every rank's spool removed


@pytest.mark.parametrize(
    "n,chunk,world", [(600, 1, 2), (96, 1, 2), (10_000, 3, 4), (1000, 512, 3), (5000, 2, 7)]
)
def test_cache_build_ranges_cover_the_chunks_from_resume_points(n, chunk, world):
    from freezecache.cache.build import BUILD_BATCH, build_ranges

    ranges = build_ranges(n, chunk, world)
    chunks = -(-n // chunk)
    assert 1 <= len(ranges) <= world and ranges[0][0] == 0 and ranges[-1][1] == chunks
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    assert all(lo < hi and lo * chunk % BUILD_BATCH == 0 for lo, hi in ranges)
    if n // BUILD_BATCH >= world and chunk <= BUILD_BATCH:
        assert len(ranges) == world
