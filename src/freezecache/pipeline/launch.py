"""Run a stage script in this process, or on torchrun, as params.yaml's ``distributed`` says.

    python -m freezecache.pipeline.launch [--max-restarts K] [--node-rank R] [--rdzv-endpoint
    HOST:PORT]
                                 [--dry-run] stages/<stage>.py [STAGE ARGS ...]

dvc.yaml runs the data-parallel stages (pretrain, train_prefix, baseline, cache, train_suffix)
this way, since a templated DVC command cannot branch on a param. With
``distributed.nproc_per_node x distributed.nnodes`` = 1 the script runs in this process,
exactly as ``python stages/<stage>.py ARGS`` would. With more, this process becomes::

    python -m torch.distributed.run --nproc-per-node N --max-restarts K \\
        (--standalone | --nnodes M --node-rank R --rdzv-backend c10d \\
                        --rdzv-endpoint HOST:PORT --rdzv-id ID) stages/<stage>.py ARGS

The params file is the stage's own ``--params`` (default ``params.yaml``). Inside a torchrun
worker (``LOCAL_RANK`` set) the script always runs in this process.

**One machine, N GPUs (or N CPU processes):** ``distributed.nproc_per_node: N``, then
``dvc repro`` or ``dvc exp run -S distributed.nproc_per_node=N``. The global batch stays
``train.batch_size`` (each rank takes a share of it), so results keep their meaning.

**Several machines:** ``distributed.nnodes: M``; ``data/``, the cache folder, ``runs/`` and
``.ckpt/`` on a filesystem every node sees. On every node, the same environment:

- ``FREEZECACHE_RDZV_ENDPOINT=HOST:PORT`` (required): one node's address and a free port, the
  same on every node (torchrun's ``PET_RDZV_ENDPOINT`` is read too);
- ``FREEZECACHE_NODE_RANK=R``: 0 on the node that runs DVC, 1..M-1 on the others (or
  torchrun's ``PET_NODE_RANK``; the c10d rendezvous orders the nodes itself when unset);
- ``FREEZECACHE_RDZV_ID``: the job's name, the same on every node (default: derived from the
  stage's command, so every node running the same stage agrees).

Node 0 runs ``dvc repro``, which records the results; each other node runs the same stage
commands in the same order (``dvc repro --dry`` lists them), each of which waits at the
rendezvous for all M nodes. Stages that do not train (check, prepare, plan, tradeoffs,
report) run on node 0 alone, as before.

**Restarts:** ``FREEZECACHE_MAX_RESTARTS=K`` (or ``--max-restarts K``; default 0): when a rank
dies, torchrun restarts every rank up to K times and training resumes from the last epoch
checkpoint. ``FREEZECACHE_TORCHRUN_ARGS`` adds any other torchrun options verbatim.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import runpy
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

ENV_PREFIX = "FREEZECACHE_"


def _params_file(args: list[str]) -> Path:
    """The ``--params`` a stage script was given (its default: params.yaml)."""
    for i, arg in enumerate(args):
        if arg == "--params" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--params="):
            return Path(arg.split("=", 1)[1])
    return Path("params.yaml")


def read_distributed(params: Path):
    """The ``distributed`` section of a params file, validated (defaults when the file or the
    section is missing: the stage itself then reports what is wrong)."""
    from freezecache.config import Distributed
    from freezecache.core.errors import FreezecacheError
    from freezecache.core.yamlio import load_yaml

    raw = load_yaml(params) if params.is_file() else None
    section = (raw or {}).get("distributed") if isinstance(raw, dict) else None
    try:
        return Distributed.model_validate(section or {})
    except ValueError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise FreezecacheError(f"{params}: distributed: {problems} — fix the section") from None


def torchrun_command(
    script: str,
    args: list[str],
    *,
    nproc_per_node: int,
    nnodes: int,
    max_restarts: int = 0,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The torchrun command line that runs ``script args`` on ``nproc_per_node`` x ``nnodes``
    processes (a c10d rendezvous at ``rdzv_endpoint`` when ``nnodes`` > 1)."""
    from freezecache.core.errors import FreezecacheError

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc_per_node)]
    cmd += ["--max-restarts", str(max_restarts)]
    if nnodes == 1:
        cmd.append("--standalone")  # a free local port: stages may run side by side
    else:
        if not rdzv_endpoint:
            raise FreezecacheError(
                f"distributed.nnodes = {nnodes} needs a rendezvous: set "
                "FREEZECACHE_RDZV_ENDPOINT=host:port (the same on every node)"
            )
        job = (
            rdzv_id or "fc-" + hashlib.sha256(shlex.join([script, *args]).encode()).hexdigest()[:12]
        )
        cmd += ["--nnodes", str(nnodes), "--rdzv-backend", "c10d"]
        cmd += ["--rdzv-endpoint", rdzv_endpoint, "--rdzv-id", job]
        if node_rank is not None:
            cmd += ["--node-rank", str(node_rank)]
    return [*cmd, *extra, script, *args]


def run_here(script: str, args: list[str]) -> None:
    """Runs the script in this process as ``python script args`` would (its folder first on
    the import path, ``__name__ == "__main__"``)."""
    sys.argv = [script, *args]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


def _options(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    parser = argparse.ArgumentParser(
        prog="python -m freezecache.pipeline.launch",
        description="Run a stage script in this process or on torchrun (params.yaml's "
        "distributed section).",
    )
    parser.add_argument(
        "--max-restarts", type=int, default=int(env(ENV_PREFIX + "MAX_RESTARTS", "0"))
    )
    rank = env(ENV_PREFIX + "NODE_RANK")
    parser.add_argument("--node-rank", type=int, default=int(rank) if rank else None)
    parser.add_argument(
        "--rdzv-endpoint",
        default=env(ENV_PREFIX + "RDZV_ENDPOINT") or env("PET_RDZV_ENDPOINT"),
    )
    parser.add_argument("--rdzv-id", default=env(ENV_PREFIX + "RDZV_ID"))
    parser.add_argument("--dry-run", action="store_true", help="print the command, run nothing")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


def _command(opts: argparse.Namespace) -> list[str] | None:
    """The torchrun command line, or None to run the script in this process."""
    d = read_distributed(_params_file(opts.args))
    if d.world_size == 1 or "LOCAL_RANK" in os.environ:  # a torchrun worker never nests
        return None
    return torchrun_command(
        opts.script,
        opts.args,
        nproc_per_node=d.nproc_per_node,
        nnodes=d.nnodes,
        max_restarts=opts.max_restarts,
        node_rank=opts.node_rank,
        rdzv_endpoint=opts.rdzv_endpoint,
        rdzv_id=opts.rdzv_id,
        extra=shlex.split(os.environ.get(ENV_PREFIX + "TORCHRUN_ARGS", "")),
    )


def main(argv: list[str] | None = None) -> None:
    from freezecache.core.errors import FreezecacheError
    from freezecache.core.interrupts import exit_on_signal

    exit_on_signal()  # a signal before the stage's guard ends it at once, without a traceback
    opts = _options(sys.argv[1:] if argv is None else argv)
    try:
        cmd = _command(opts)
    except ModuleNotFoundError as err:  # said as stages/_env.py says it
        print(
            f"error: {sys.executable} has no module {err.name!r} — activate the project's venv "
            "(`source .venv/bin/activate`) or run `make repro`",
            file=sys.stderr,
        )
        raise SystemExit(2) from None
    except FreezecacheError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    shown = shlex.join(["python", *(cmd[1:] if cmd else [opts.script, *opts.args])])
    if opts.dry_run:
        print(shown)
        return
    if cmd is None:
        run_here(opts.script, opts.args)
        return
    print(f"freezecache.pipeline.launch: {shown}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
