"""Several nodes: `rwkvforge train` on each node under torch.distributed.run's static
rendezvous (or once with a DeepSpeed hostfile), tested as "two nodes" on one machine: two
separate launchers (2 nodes x 1 process, gloo over loopback) against 1 node x 2 processes and
one process with the same global batch; a resume after one node's processes are killed; the
launcher commands; the shared-run-folder check.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rwkvforge.adapter import read_adapter
from test_train import _train_cmd, metrics, sub_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")
DS = ("--micro-bsz=1", "--deepspeed-stage=2")


def free_port() -> int:
    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        return sk.getsockname()[1]


def node_cmd(model, prefix, runs, name, rank: int, port: int, *extra) -> list[str]:
    """`rwkvforge train` as node `rank` of 2 (one process each), rendezvous on loopback."""
    return _train_cmd(model, prefix, runs, name, *DS, "--num-gpus=1", "--num-nodes=2",
                      f"--node-rank={rank}", "--master-addr=127.0.0.1",
                      f"--master-port={port}", *extra)


def start_nodes(cmds: list[list[str]], env: dict) -> list[subprocess.Popen]:
    # each node in its own session: killing one "machine" kills its launcher and workers
    return [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True) for c in cmds]


def finish(procs: list[subprocess.Popen], timeout: float = 900) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            text, _ = p.communicate()
        out.append((p.returncode, text))
    return out


def kill_node(proc: subprocess.Popen) -> None:
    """kill -9 every process of a "node": its `rwkvforge train`, the torch.distributed.run
    agent under it and the training worker (which the agent starts in a session of its own)."""
    import psutil

    tree = psutil.Process(proc.pid).children(recursive=True)
    for p in reversed(tree):  # the worker first: it must not train on alone
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(tree, timeout=30)


def two_nodes(model, prefix, runs, name, *extra, resume: bool = False) -> list[tuple[int, str]]:
    port = free_port()
    if resume:
        cmds = [[sys.executable, "-m", "rwkvforge.train", "--no-progress", "--resume",
                 str(runs / name), "--node-rank", str(r), "--master-port", str(port)]
                for r in (0, 1)]
    else:
        cmds = [node_cmd(model, prefix, runs, name, r, port, *extra) for r in (0, 1)]
    return finish(start_nodes(cmds, sub_env()))


def losses(run: Path) -> list[float]:
    return [r["loss"] for r in metrics(run) if "loss" in r]


# ---- units ---------------------------------------------------------------------------------------
def _print(argv: list[str], capsys) -> tuple[int, str, str]:
    from rwkvforge import train as T

    rc = T.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out.strip(), cap.err


def test_print_command_names_the_launcher_each_node_runs(tmp_path, capsys, monkeypatch):
    """Per node: torch.distributed.run's static rendezvous at MASTER_ADDR:MASTER_PORT with this
    node's rank; with a hostfile: DeepSpeed's multi-node runner (pdsh / ssh), once. Nothing is
    started and no run folder is made."""
    for k in ("NUM_NODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE", "NUM_GPUS"):
        monkeypatch.delenv(k, raising=False)
    base = ["--runs-dir", str(tmp_path / "runs"), "--deepspeed-stage", "2", "--num-gpus", "8",
            "--run-name", "big", "--print-command"]
    rc, out, _ = _print([*base, "--num-nodes", "2", "--node-rank", "1", "--master-addr",
                         "10.0.0.1", "--master-port", "29600"], capsys)
    assert rc == 0
    cmd = shlex.split(out)
    i = cmd.index("torch.distributed.run")
    assert cmd[i + 1:cmd.index("-m", i)] == ["--nnodes", "2", "--node_rank", "1",
                                             "--master_addr", "10.0.0.1", "--master_port",
                                             "29600", "--nproc_per_node", "8"]
    tail = cmd[cmd.index("rwkvforge.train") + 1:]
    assert "--print-command" not in tail and tail[tail.index("--run-name") + 1] == "big"
    hosts = tmp_path / "hostfile"
    hosts.write_text("node-a slots=8\nnode-b slots=8\n")
    rc, out, _ = _print([*base, "--num-nodes", "2", "--hostfile", str(hosts)], capsys)
    cmd = shlex.split(out)
    assert rc == 0 and cmd[1:3] == ["-m", "deepspeed.launcher.runner"]
    opts = cmd[3:cmd.index("--module")]
    assert opts[opts.index("--hostfile") + 1] == str(hosts)
    assert opts[opts.index("--num_nodes") + 1] == "2" and opts[opts.index("--num_gpus") + 1] == "8"
    assert "--no_local_rank" in opts and "--master_addr" not in opts  # the hostfile's first host
    assert cmd[cmd.index("--module") + 1] == "rwkvforge.train"
    # one node: the standalone rendezvous, as before
    rc, out, _ = _print(base, capsys)
    assert rc == 0 and "--standalone" in shlex.split(out)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("flags,message", [
    (["--num-nodes", "2", "--master-addr", "10.0.0.1"], "give every node the same --run-name"),
    (["--num-nodes", "2", "--run-name", "r"], "set MASTER_ADDR"),
    (["--num-nodes", "2", "--node-rank", "2", "--master-addr", "h", "--run-name", "r"],
     "node ranks are 0 ... 1"),
    (["--num-nodes", "2", "--deepspeed-stage", "0", "--run-name", "r"], "DEEPSPEED_STAGE=0"),
    (["--hostfile", "/nonexistent/hosts", "--run-name", "r"], "HOSTFILE=/nonexistent/hosts: no such"),
])
def test_cluster_settings_are_checked_before_anything_starts(flags, message, tmp_path, capsys,
                                                              monkeypatch):
    for k in ("NUM_NODES", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "HOSTFILE"):
        monkeypatch.delenv(k, raising=False)
    argv = ["--runs-dir", str(tmp_path), "--deepspeed-stage", "2", *flags, "--print-command"]
    rc, out, err = _print(argv, capsys)
    assert rc == 2 and out == "" and message in err, err


# ---- real processes ------------------------------------------------------------------------------
STEPS = ("--max-steps=4", "--save-every=2", "--grad-clip=1.0")


@pytest.fixture(scope="module")
def two_node_run(tiny_model_path, sft_prefix, tmp_path_factory) -> tuple[Path, list]:
    """An uninterrupted 2 nodes x 1 process run of STEPS (both tests below compare to it)."""
    runs = tmp_path_factory.mktemp("two_nodes")
    res = two_nodes(tiny_model_path, sft_prefix, runs, "nodes", *STEPS)
    for rc, text in res:
        assert rc == 0, text[-4000:]
    return runs / "nodes", res


@pytest.mark.slow
def test_two_nodes_match_one_node_and_one_process(tiny_model_path, sft_prefix, tmp_path,
                                                  two_node_run):
    """The same global batch of 2 sequences as 1 process x MICRO_BSZ 2, 1 node x 2 processes
    and 2 nodes x 1 process (separate launchers and rendezvous over loopback, gloo): every
    step's loss within 1e-4 relative and the final adapters within 1e-5 (the tolerance of
    test_distributed's DeepSpeed test): the data order of a global batch does not depend on
    the split into nodes x GPUs x micro-batches."""
    env = sub_env()
    one = subprocess.run(_train_cmd(tiny_model_path, sft_prefix, tmp_path, "one", *STEPS,
                                    "--micro-bsz=2"),
                         env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    node = subprocess.run(_train_cmd(tiny_model_path, sft_prefix, tmp_path, "node", *STEPS,
                                     *DS, "--num-gpus=2"),
                          env=env, capture_output=True, text=True, timeout=900)
    assert node.returncode == 0, node.stderr[-3000:]
    nodes, res = two_node_run
    assert "node 1 of 2" in res[1][1]
    cfg = json.loads((nodes / "config.json").read_text())
    assert cfg["training"]["world_size"] == 2 and cfg["settings"]["num_nodes"] == 2
    want = losses(tmp_path / "one")
    adapter = read_adapter(tmp_path / "one" / "adapter").factors
    assert len(want) == 4
    for run in (tmp_path / "node", nodes):
        assert losses(run) == pytest.approx(want, rel=1e-4), run
        got = read_adapter(run / "adapter").factors
        assert got.keys() == adapter.keys()
        for k in adapter:
            torch.testing.assert_close(got[k].A, adapter[k].A, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[k].B, adapter[k].B, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_two_node_run_resumes_after_one_node_is_killed(tiny_model_path, sft_prefix, tmp_path,
                                                       two_node_run):
    """kill -9 node 1 (its launcher, agent and worker) after the step-2 checkpoint; node 0
    stops too (its peer is gone: gloo's connection closes, its worker fails); `train --resume` on both nodes continues from step 2, and every
    step's loss equals the uninterrupted two-node run's."""
    want = losses(two_node_run[0])
    port = free_port()
    procs = start_nodes([node_cmd(tiny_model_path, sft_prefix, tmp_path, "cut", r, port, *STEPS)
                         for r in (0, 1)], sub_env())
    run = tmp_path / "cut"
    try:
        deadline = time.time() + 600
        while not (run / "checkpoints" / "step-2" / "COMPLETE").exists():
            assert all(p.poll() is None for p in procs), "a node ended before the kill"
            assert time.time() < deadline
            time.sleep(0.05)
        kill_node(procs[1])
        try:  # node 0 notices its peer is gone (gloo: connection closed) and stops
            procs[0].wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("node 0 kept running after node 1 died")
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    assert procs[0].returncode != 0
    assert json.loads((run / "status.json").read_text())["state"] in ("running", "failed")
    assert not (run / "adapter").exists() and max(r["step"] for r in metrics(run)) < 4
    res = two_nodes(tiny_model_path, sft_prefix, tmp_path, "cut", resume=True)
    for rc, text in res:
        assert rc == 0, text[-4000:]
    assert "resumed from" in res[0][1] and "step-2" in res[0][1]
    assert [r["step"] for r in metrics(run) if "loss" in r] == list(range(1, 5))
    assert losses(run) == want
    assert json.loads((run / "status.json").read_text())["state"] == "finished"


@pytest.mark.slow
def test_a_run_folder_the_other_node_cannot_see_is_refused(tiny_model_path, sft_prefix,
                                                           tmp_path):
    """Node 1 pointed at another RUNS_DIR (as if the storage were not shared): both nodes stop
    at start with the error naming the folder, the rank that cannot see it, and the fix."""
    port = free_port()
    cmds = [node_cmd(tiny_model_path, sft_prefix, tmp_path / ("a" if r == 0 else "b"), "r", r,
                     port, "--max-steps=2") for r in (0, 1)]
    res = finish(start_nodes(cmds, sub_env()), timeout=600)
    for rc, text in res:
        assert rc != 0
        assert "is not shared: rank 1 on" in text and "shared storage" in text, text[-3000:]
    assert not (tmp_path / "a" / "r" / "checkpoints").exists()
