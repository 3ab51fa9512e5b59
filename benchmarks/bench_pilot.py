"""Side by side on the single-node Slurm: the sbatch floor, ccat-dagster one job per sub-group, ccat-dagster
packed, Parsl's HighThroughputExecutor on its own, Snakemake's Slurm executor and dagster-slurm, for the same
trivial payload (`/bin/true`).

Ways, interleaved within each N (same load for all):
- floor, loop: N × `sbatch --wrap true`, then `squeue` once a second until none is left;
- floor, array: one `sbatch --array=1-N --wrap true`, the same wait;
- ccat-dagster one job per sub-group: StepRunner + SlurmBackend at the default pacing (20 calls per minute);
- ccat-dagster packed: StepRunner + PackedBackend + ParslEngine (PACKED_* defaults: 2 allocations of 2 cores);
- Parsl HTEX alone: the same engine settings driven by Parsl directly;
- Snakemake 9 + snakemake-executor-plugin-slurm, one Slurm job per item: a generated Snakefile of N instances of
  a rule running `true`, `--executor slurm` at the plugin's default pacing (first status query 40 s after
  submitting, then every 40 s, longer while nothing finishes);
- Snakemake, group jobs: the same with `--groups` / `--group-components`, 20 items per Slurm job;
- dagster-slurm, one Slurm job per item (its default mode "slurm"): N assets through its ComputeResource and
  BashLauncher, `dagster asset materialize` with the multiprocess executor, its default status polling (2 s,
  growing by 1.5× to 5 s). It reaches Slurm only over SSH to a login node: the script sets one up on this host
  (OpenSSH from apt where missing, a throwaway key pair and an sshd on 127.0.0.1:2222 from /tmp/ccat-bench-ssh,
  stopped at the end) and uses the peers' venv as dagster-slurm's "pre-deployed" cluster-side environment;
- dagster-slurm, session mode: the same assets as srun steps in one allocation for the run (its "slurm-session"
  mode), with the in-process executor, the only one under which it completes here: the items run in series.

The peers (Parsl, Snakemake and its plugin, dagster-slurm) live in a venv of their own, created and filled from
PyPI on first use (`--peers-venv`). Snakemake and dagster-slurm take seconds per item, so they run only up to
`--slow-peers-max-items` (50); their rows for a bigger N say "not run".

The StepRunner ways use the in-memory attempt store and no container (the loop and the backend are measured,
not ops-db or Apptainer). squeue, sacct and scontrol are shims on PATH that log every call, for all ways (the
peers run with the shims ahead of their venv and of the real commands; dagster-slurm's remote commands get that
PATH from the sshd's configuration).

Run:  .venv/bin/python benchmarks/bench_pilot.py [--items 50 200] [--rounds 1] [--slow-peers-max-items 50]
      [--write-docs]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import machine, write_section  # noqa: E402
from bench_slurm_polling import TruePreparation, calls_since, floor, runner_batch, shims  # noqa: E402

from ccat_dagster.execution.attempts import InMemoryAttemptStore  # noqa: E402
from ccat_dagster.execution.hpc.packed.backend import PackedBackend  # noqa: E402
from ccat_dagster.execution.hpc.packed.engine import ParslEngine, PilotSettings  # noqa: E402
from ccat_dagster.execution.runner import OutcomeKind, RunnerConfig, StepRunner  # noqa: E402
from tests.loop_fakes import STEP, plan  # noqa: E402

SECTION = "## Many sub-groups per allocation: packed execution against the floor and Parsl"
# The shape of the tasks TruePreparation submits (0.25 GB): the packed engine sizes its allocations for it.
SMALL = STEP.__class__(
    **{**STEP.__dict__, "resources": STEP.resources.__class__(cpu=1, memory_gb=0.25, time_hours=0.1)}
)
PARSL_ALONE = textwrap.dedent(
    """
    import subprocess, sys, time
    began = time.time()  # importing Parsl is part of a batch's cost, as it is in ccat-dagster's packed way
    import parsl
    from parsl.config import Config
    from parsl.dataflow.dflow import DataFlowKernel
    from parsl.executors import HighThroughputExecutor
    from parsl.launchers import SingleNodeLauncher
    from parsl.providers import SlurmProvider

    def run_task(argv):
        import subprocess
        return subprocess.run(argv, check=False).returncode

    n, run_dir = int(sys.argv[1]), sys.argv[2]
    provider = SlurmProvider(nodes_per_block=1, cores_per_node=2, init_blocks=0, min_blocks=0, max_blocks=2,
                             walltime="00:30:00", exclusive=False, scheduler_options="#SBATCH --mem=1280M",
                             launcher=SingleNodeLauncher(), cmd_timeout=60)
    config = Config(executors=[HighThroughputExecutor(label="peer", address="127.0.0.1", cores_per_worker=1,
                                                      max_workers_per_node=2, provider=provider)],
                    strategy="htex_auto_scale", strategy_period=0.2, max_idletime=60.0, run_dir=run_dir,
                    initialize_logging=False)
    dfk = DataFlowKernel(config=config)
    app = parsl.python_app(run_task, executors=["peer"], data_flow_kernel=dfk)
    codes = [f.result() for f in [app(["/bin/true"]) for _ in range(n)]]
    dfk.cleanup()
    assert codes.count(0) == n, codes
    print(time.time() - began)
    """
)
SNAKEFILE = textwrap.dedent(
    """
    localrules: all

    rule all:
        input: expand("done/{{i}}", i=range({items}))

    rule item:
        output: touch("done/{{i}}")
        shell: "true"
    """
)
SNAKEMAKE_DEFAULT = "Snakemake 9 + Slurm plugin, one job per item"
SNAKEMAKE_GROUP_SIZE = 20
SNAKEMAKE_GROUPED = f"Snakemake 9 + Slurm plugin, group jobs of {SNAKEMAKE_GROUP_SIZE} items"
DAGSTER_SLURM = "dagster-slurm, one job per item"
DAGSTER_SLURM_SESSION = "dagster-slurm, session mode (one allocation, items one after another)"
SLOW_PEERS = (SNAKEMAKE_DEFAULT, SNAKEMAKE_GROUPED, DAGSTER_SLURM, DAGSTER_SLURM_SESSION)
PARSL_ALONE_WAY = "Parsl HTEX alone (own venv)"
PEER_WAYS = (PARSL_ALONE_WAY, *SLOW_PEERS)
PEERS = {
    "parsl": "parsl",
    "snakemake": "snakemake>=9,<10",
    "snakemake_executor_plugin_slurm": "snakemake-executor-plugin-slurm",
    "dagster_slurm": "dagster-slurm",
}


WHY = """Why, where a target is not met:
- Packed against Parsl alone: the packed way runs on Parsl's HighThroughputExecutor with the same settings, so
  it can only match Parsl alone, never beat it; the difference is ccat-dagster's own cost per sub-group (each
  task's spec and status records written to the shared file system, the job wrapper forked by the worker's
  launcher, the runner's attempt bookkeeping and polling), reported above against its 30 ms target.
- Packed ≥ 10× faster than the floor: a batch pays once for its first allocation (sbatch, slurmd starting the
  job, Parsl's manager and workers each starting Python and connecting: about 4 s here); against a floor of
  about 0.45 s per item that allows 10× only from some 100 items on, for Parsl alone as much as for packing.
- One job per sub-group within 1.2× of the floor: the runner sends at most SCHEDULER_QUERIES_PER_MINUTE (20)
  status calls a minute, a pause of 3-6 s between polls, so the end of a batch is seen up to one pause late;
  the floor asks squeue every second, at about 60 calls a minute.
- ccat-dagster's own cost per sub-group: most of the difference is paid once per batch, not per sub-group
  (starting the engine inside the run worker, writing the first specs: about 2 s here), so divided by a small
  N it reads high; what grows with N is a few ms per sub-group.
- ≤ 20 scheduler calls per minute on the one-job path at small N: a batch shorter than a minute reads high in
  calls per minute (its first polls right after submitting count for the whole batch); no 60 s holds more
  than 20."""


class NotRun(Exception):
    """A way that cannot run on this machine; its message says why, and the table shows it instead of a figure."""


def array_floor(work: Path, jobs: int, index: int) -> float:
    began = time.time()
    out = subprocess.run(
        ["sbatch", "--parsable", f"--array=1-{jobs}", "--mem=256M", "--time=5", f"--output={work}/array-{index}-%a.out"]
        + ["--wrap", "true"],
        capture_output=True,
        text=True,
        check=True,
    )
    job_id = out.stdout.strip().split(";")[0]
    while subprocess.run(
        ["squeue", "--noheader", f"--jobs={job_id}", "--format=%i"], capture_output=True, text=True
    ).stdout.strip():
        time.sleep(1.0)
    return time.time() - began


def packed_batch(work: Path, jobs: int, index: int) -> float:
    name = f"packed-{jobs}-{index}"
    engine = ParslEngine(PilotSettings(address="127.0.0.1", run_dir=work / name / "runinfo"))
    backend = PackedBackend(work / name / "tasks", engine, max_task_hours=1)
    runner = StepRunner(
        engine=None,
        backend=backend,
        runtime=None,
        stager=None,
        config=RunnerConfig(pipeline_base_dir=work, processing_location_id=1, sif_cache_dir=work, max_in_flight=jobs),
        store=InMemoryAttemptStore(),
        preparation=TruePreparation(work / name, name),
    )
    began = time.time()
    try:
        outcomes = runner.execute(
            step=SMALL, plans=[plan(f"{name}-item-{i}") for i in range(jobs)], dagster_run_id=f"bench-{name}"
        )
    finally:
        backend.close()
    elapsed = time.time() - began
    bad = [o for o in outcomes.values() if o.kind is not OutcomeKind.COMPLETED]
    if bad:
        raise SystemExit(f"{len(bad)} packed task(s) did not complete: {bad[0]}")
    return elapsed


def peers_python(venv: Path) -> Path:
    """The peers' interpreter: a venv of their own, so that none of them shares the project's dependencies."""
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    missing = [
        requirement
        for module, requirement in PEERS.items()
        if subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode != 0
    ]
    if missing:
        subprocess.run([str(python), "-m", "pip", "install", "-q", *missing], check=True)
    return python


def peers_env(python: Path) -> dict[str, str]:
    """The environment a peer runs in: its venv's bin first (its jobs inherit it, Slurm exports the submitter's
    environment), then PATH as it is, so the squeue / sacct / scontrol shims stay ahead of the real commands."""
    return {**os.environ, "PATH": f"{python.parent}{os.pathsep}{os.environ['PATH']}"}


def parsl_alone(python: Path, work: Path, jobs: int, index: int) -> float:
    out = subprocess.run(
        [str(python), "-c", PARSL_ALONE, str(jobs), str(work / f"parsl-{jobs}-{index}")],
        capture_output=True,
        text=True,
        env=peers_env(python),
        check=False,
    )
    if out.returncode != 0:
        raise SystemExit(f"Parsl alone failed: {out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def snakemake_batch(python: Path, work: Path, jobs: int, index: int, *, group_size: int | None = None) -> float:
    """N instances of one rule running `true`, through Snakemake's Slurm executor at its default pacing; with
    ``group_size``, the instances are grouped so that one Slurm job runs up to that many of them."""
    name = f"snakemake-{'grouped' if group_size else 'default'}-{jobs}-{index}"
    run_dir = work / name
    run_dir.mkdir(parents=True)
    (run_dir / "Snakefile").write_text(SNAKEFILE.format(items=jobs))
    argv = [
        str(python.parent / "snakemake"),
        "--snakefile",
        str(run_dir / "Snakefile"),
        "--directory",
        str(run_dir),
        "--executor",
        "slurm",
        "--jobs",
        str(jobs),
        "--default-resources",
        "slurm_partition=debug",
        "mem_mb=256",
        "runtime=1",
        "--slurm-no-account",
    ]
    if group_size:
        # A group job asks for the sum of its members' CPUs (20 on a 2-CPU node, which sbatch refuses); --cores 1
        # makes Snakemake stack them in series within one CPU instead, so two group jobs run side by side.
        argv += ["--groups", "item=items", "--group-components", f"items={group_size}", "--cores", "1"]
    began = time.time()
    out = subprocess.run(argv, capture_output=True, text=True, env=peers_env(python), check=False)
    elapsed = time.time() - began
    (run_dir / "snakemake.log").write_text(out.stdout + out.stderr)
    done = len(list((run_dir / "done").glob("*"))) if (run_dir / "done").exists() else 0
    if out.returncode != 0 or done != jobs:
        raise NotRun(f"failed, {done} of {jobs} done: {out.stderr.strip().splitlines()[-1:] or ['no output']}")
    return elapsed


SSH_DIR = Path(tempfile.gettempdir()) / "ccat-bench-ssh"
SSH_PORT = 2222
SSH_PACKAGES = {"/usr/sbin/sshd": "openssh-server", "/usr/bin/ssh": "openssh-client", "/usr/bin/scp": "openssh-client"}
AUTHORIZED_KEYS = Path("/root/.ssh/authorized_keys")
SSH_CONTROL_DIR = SSH_DIR / "control"
# The sshd this script started, stopped at the end (empty when none was started or one was running before).
_started_sshd: list[int] = []
DAGSTER_SLURM_DEFS = textwrap.dedent(
    """
    import dagster as dg
    from dagster_slurm import (BashLauncher, ComputeResource, SlurmQueueConfig, SlurmResource, SlurmSessionResource,
                               SSHConnectionResource)

    ITEMS, PAYLOAD = {items}, {payload!r}


    def item(i):
        @dg.asset(name=f"item_{{i}}")
        def _item(context: dg.AssetExecutionContext, compute: ComputeResource):
            return compute.run(context=context, payload_path=PAYLOAD).get_materialize_result()

        return _item


    ssh = SSHConnectionResource(host="127.0.0.1", port={port}, user="root", key_path={key!r},
                                known_hosts_file={known_hosts!r})
    slurm = SlurmResource(ssh=ssh, remote_base={remote_base!r},
                          queue=SlurmQueueConfig(partition="debug", cpus=1, mem="256M", time_limit="00:05:00"))
    session = SlurmSessionResource(slurm=slurm, num_nodes=1, partition="debug", cpus_per_task=2, mem="1280M",
                                   time_limit="00:10:00", max_concurrent_jobs={concurrency})
    defs = dg.Definitions(
        assets=[item(i) for i in range(ITEMS)],
        resources={{"compute": ComputeResource(mode={mode!r}, slurm=slurm, default_launcher=BashLauncher(),
                                              pre_deployed_env_path={env!r}, **{session_args})}},
        executor={executor},
    )
    """
)
DAGSTER_SLURM_PAYLOAD = textwrap.dedent(
    """
    import subprocess
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        code = subprocess.run(["/bin/true"], check=False).returncode
        pipes.report_asset_materialization(metadata={"returncode": code})
        if code:
            raise SystemExit(code)
    """
)


def _sshd_running(pid_file: Path) -> int | None:
    """The pid of the sshd that ``pid_file`` names, if it is alive and is an sshd."""
    try:
        pid = int(pid_file.read_text().split()[0])
        return pid if "sshd" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") else None
    except (OSError, ValueError, IndexError):
        return None


def local_sshd(shims_dir: Path, peers_bin: Path) -> tuple[Path, Path]:
    """An SSH "login node" on this host, for dagster-slurm: sshd on 127.0.0.1:SSH_PORT, key authentication only,
    with its own host key, config and pid file in SSH_DIR, and a throwaway client key there that root@localhost
    accepts. Idempotent: installs OpenSSH only where it is missing, appends the key to root's authorized_keys only
    once, and reuses an sshd already running from SSH_DIR (left running at the end, as it was found).

    PATH of the remote commands: dagster-slurm runs each as ``bash --noprofile --norc -c ...`` over SSH, so it
    is what sshd hands the session (its ``SetEnv``; a client's PATH is not taken) plus what root's ~/.bashrc
    prepends (bash reads it when sshd starts it; nothing there is a Slurm command), and Slurm exports it to the
    jobs. It starts with SSH_DIR/shims and SSH_DIR/peers-bin, links to this run's squeue / sacct / scontrol shims
    and to the peers' venv, so that the shims stay ahead of the real commands as for the other ways, also for
    an sshd started by an earlier run. Returns the client key and the known_hosts file that pins the host key."""
    missing = sorted({package for path, package in SSH_PACKAGES.items() if not Path(path).exists()})
    if missing:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        for argv in (["apt-get", "update", "-qq"], install):
            out = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                detail = (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]
                raise NotRun(f"dagster-slurm needs an SSH server; `{' '.join(argv)}` failed here ({detail})")
    SSH_DIR.mkdir(mode=0o700, exist_ok=True)
    host_key, client_key = SSH_DIR / "host_ed25519", SSH_DIR / "client_ed25519"
    for key in (host_key, client_key):
        if not key.exists():
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ccat-bench", "-f", str(key)], check=True
            )
        key.chmod(0o600)
    public = (SSH_DIR / "client_ed25519.pub").read_text().strip()
    AUTHORIZED_KEYS.parent.mkdir(mode=0o700, exist_ok=True)
    present = AUTHORIZED_KEYS.read_text().splitlines() if AUTHORIZED_KEYS.exists() else []
    if public not in (line.strip() for line in present):
        with AUTHORIZED_KEYS.open("a") as keys:
            keys.write(("\n" if present and not AUTHORIZED_KEYS.read_text().endswith("\n") else "") + public + "\n")
        AUTHORIZED_KEYS.chmod(0o600)
    known_hosts = SSH_DIR / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{SSH_PORT} {(SSH_DIR / 'host_ed25519.pub').read_text().strip()}\n")
    for link, target in ((SSH_DIR / "shims", shims_dir), (SSH_DIR / "peers-bin", peers_bin)):
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    pid_file = SSH_DIR / "sshd.pid"
    if _sshd_running(pid_file):
        return client_key, known_hosts
    config = SSH_DIR / "sshd_config"
    config.write_text(
        f"Port {SSH_PORT}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {pid_file}\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nX11Forwarding no\nAllowUsers root\n"
        # dagster-slurm opens a session per step and command, up to N at once on its shared connection.
        "MaxSessions 512\nMaxStartups 512:30:1024\n"
        f"SetEnv PATH={SSH_DIR / 'shims'}:{SSH_DIR / 'peers-bin'}:/usr/local/bin:/usr/bin:/bin\n"
        "Subsystem sftp internal-sftp\n"
    )
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    subprocess.run(["/usr/sbin/sshd", "-t", "-f", str(config)], check=True)
    subprocess.run(["/usr/sbin/sshd", "-f", str(config), "-E", str(SSH_DIR / "sshd.log")], check=True)
    for _ in range(50):
        pid = _sshd_running(pid_file)
        if pid:
            _started_sshd.append(pid)
            return client_key, known_hosts
        time.sleep(0.1)
    raise NotRun(f"sshd did not start on 127.0.0.1:{SSH_PORT} (see {SSH_DIR / 'sshd.log'})")


def stop_local_sshd() -> None:
    """Closes dagster-slurm's SSH ControlMasters (it keeps one per host for 10 minutes after its last command,
    here with its sockets in SSH_CONTROL_DIR) and stops the sshd that local_sshd started, if any (not one that
    was running before)."""
    for socket in sorted(SSH_CONTROL_DIR.glob("*")) if SSH_CONTROL_DIR.exists() else []:
        subprocess.run(
            ["ssh", "-O", "exit", "-o", f"ControlPath={socket}", "-p", str(SSH_PORT), "root@127.0.0.1"],
            capture_output=True,
            check=False,
        )
    # Steps that start at once each start a master; those that lose the race for the socket keep running
    # without one, so they are found by the control directory on their command line.
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[0] == "ssh" and "-M" in argv and any(a.startswith(f"ControlPath={SSH_CONTROL_DIR}/") for a in argv):
            os.kill(int(proc.name), signal.SIGTERM)
    while _started_sshd:
        pid = _started_sshd.pop()
        if _sshd_running(SSH_DIR / "sshd.pid") == pid:
            os.kill(pid, signal.SIGTERM)


def dagster_slurm_batch(python: Path, work: Path, jobs: int, index: int, *, session: bool = False) -> float:
    """N assets, each running the payload through dagster-slurm's ComputeResource in its default mode ("slurm",
    one sbatch job per asset) with its BashLauncher, materialized with `dagster asset materialize` in the peers'
    venv (Dagster's multiprocess executor, up to N steps at a time). dagster-slurm reaches Slurm only over SSH to
    a login node, here the local sshd of local_sshd. The Python environment on the cluster side is a
    "pre-deployed" one (its production setting, instead of packing one with pixi for each run): the cluster is
    this host, so the peers' venv serves, laid out as dagster-slurm expects (activate.sh and env/bin/python).
    Wall = the `dagster` process from start to exit.

    With ``session``, its "slurm-session" mode instead: one allocation (SlurmSessionResource, the node's 2 CPUs)
    for the run, each asset an srun step in it. That needs Dagster's in-process executor, so the items run one
    after another: with the multiprocess executor, every step process attaches to the allocation, and the one
    that created it cancels it as soon as its own step is done, which kills the others' steps."""
    key, known_hosts = local_sshd(work / "bin", python.parent)
    name = f"dagster-slurm-{'session' if session else 'default'}-{jobs}-{index}"
    run_dir = work / name
    env_dir = work / "dagster-slurm-env"
    if not env_dir.exists():
        env_dir.mkdir()
        (env_dir / "env").symlink_to(python.parent.parent)
        (env_dir / "activate.sh").write_text(f'export PATH="{python.parent}:$PATH"\n')
    (run_dir / "home").mkdir(parents=True)
    payload = run_dir / "payload.py"
    payload.write_text(DAGSTER_SLURM_PAYLOAD)
    (run_dir / "defs.py").write_text(
        DAGSTER_SLURM_DEFS.format(
            items=jobs,
            payload=str(payload),
            port=SSH_PORT,
            key=str(key),
            known_hosts=str(known_hosts),
            remote_base=str(run_dir / "remote"),
            env=str(env_dir),
            concurrency=jobs,
            mode="slurm-session" if session else "slurm",
            session_args='{"session": session}' if session else "{}",
            executor="dg.in_process_executor"
            if session
            else f'dg.multiprocess_executor.configured({{"max_concurrent": {jobs}}})',
        )
    )
    (run_dir / "home" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    argv = [str(python.parent / "dagster"), "asset", "materialize", "-f", str(run_dir / "defs.py"), "--select", "*"]
    began = time.time()
    out = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env={
            **peers_env(python),
            "DAGSTER_HOME": str(run_dir / "home"),
            "DAGSTER_SLURM_SSH_CONTROL_DIR": str(SSH_CONTROL_DIR),
        },
    )
    elapsed = time.time() - began
    (run_dir / "dagster.log").write_text(out.stdout + out.stderr)
    done = out.stderr.count("ASSET_MATERIALIZATION")
    if out.returncode != 0 or done < jobs:
        errors = re.findall(r"^(?:RuntimeError|Error|\w+Error): .*$", out.stderr, flags=re.MULTILINE)
        raise NotRun(f"failed, {done} of {jobs} done: {errors[0] if errors else out.stderr[-300:]}")
    return elapsed


def median_walls(results: dict[tuple[int, str], list[tuple[float, int]]], items: int) -> dict[str, float]:
    """Median wall seconds of each way that ran at N = ``items``."""
    return {name: statistics.median(e for e, _ in values) for (n, name), values in results.items() if n == items}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--peers-venv", type=Path, default=Path(tempfile.gettempdir()) / "ccat-bench-peers-venv")
    parser.add_argument(
        "--slow-peers-max-items",
        type=int,
        default=50,
        help="largest N at which Snakemake and dagster-slurm run (seconds per item: a bigger N takes long)",
    )
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    python = peers_python(args.peers_venv)
    load_before = os.getloadavg()
    ways = {
        "sbatch floor, loop": lambda w, n, i: floor(w, n, i),
        "sbatch floor, array": array_floor,
        "ccat-dagster, one job per sub-group": lambda w, n, i: runner_batch(w, n, i + 100 * n, budget=20),
        "ccat-dagster, packed (Parsl HTEX)": packed_batch,
        PARSL_ALONE_WAY: lambda w, n, i: parsl_alone(python, w, n, i),
        SNAKEMAKE_DEFAULT: lambda w, n, i: snakemake_batch(python, w, n, i),
        SNAKEMAKE_GROUPED: lambda w, n, i: snakemake_batch(python, w, n, i, group_size=SNAKEMAKE_GROUP_SIZE),
        DAGSTER_SLURM: lambda w, n, i: dagster_slurm_batch(python, w, n, i),
        DAGSTER_SLURM_SESSION: lambda w, n, i: dagster_slurm_batch(python, w, n, i, session=True),
    }
    results: dict[tuple[int, str], list[tuple[float, int]]] = {}
    not_run: dict[tuple[int, str], str] = {}
    with tempfile.TemporaryDirectory(prefix="ccat-bench-pilot-", dir="/tmp") as temp:
        work = Path(temp)
        log = work / "calls.log"
        shims(work / "bin", log)
        os.environ["PATH"] = f"{work / 'bin'}{os.pathsep}{os.environ['PATH']}"
        try:
            for items in args.items:
                for index in range(args.rounds):
                    for name, way in ways.items():
                        if name in SLOW_PEERS and items > args.slow_peers_max_items:
                            not_run[(items, name)] = f"not run (N > {args.slow_peers_max_items})"
                            continue
                        if (items, name) in not_run:
                            continue
                        began = time.time()
                        try:
                            elapsed = way(work, items, index)
                        except NotRun as reason:
                            not_run[(items, name)] = f"not run: {reason}"
                            print(f"N={items} round {index}: {name}: not run: {reason}", flush=True)
                            continue
                        calls = len(calls_since(log, began))
                        results.setdefault((items, name), []).append((elapsed, calls))
                        print(f"N={items} round {index}: {name}: {elapsed:.1f} s, {calls} scheduler calls", flush=True)
        finally:
            stop_local_sshd()
    load_after = os.getloadavg()
    rows = []
    for items in args.items:
        wall = median_walls(results, items)
        floor_wall = min(wall["sbatch floor, loop"], wall["sbatch floor, array"])
        parsl_wall = wall[PARSL_ALONE_WAY]
        for name in ways:
            if (items, name) in not_run:
                rows.append(f"| {items} | {name} | {not_run[(items, name)]} | — | — | — | — | — |")
                continue
            values = results[(items, name)]
            calls = statistics.median(c for _, c in values)
            rows.append(
                f"| {items} | {name} | {wall[name]:.1f} s | {wall[name] / items * 1000:.0f} ms | "
                f"{wall[name] / floor_wall:.2f}× | {wall[name] / parsl_wall:.2f}× | {calls:.0f} | "
                f"{calls / wall[name] * 60:.1f} |"
            )
    targets = []
    for items in args.items:
        wall = median_walls(results, items)
        floor_wall = min(wall["sbatch floor, loop"], wall["sbatch floor, array"])
        packed, one_job = wall["ccat-dagster, packed (Parsl HTEX)"], wall["ccat-dagster, one job per sub-group"]
        one_job_rate = statistics.median(c / e * 60 for e, c in results[(items, "ccat-dagster, one job per sub-group")])

        def verdict(ok: bool) -> str:
            return "**met**" if ok else "**not met**"

        parsl_wall = wall[PARSL_ALONE_WAY]
        peers = {name: wall[name] for name in PEER_WAYS if name in wall and (items, name) not in not_run}
        fastest = min(peers, key=peers.__getitem__)
        own_ms = (packed - parsl_wall) / items * 1000  # what packing adds to the engine it runs on
        targets.append(
            f"- N = {items}: packed at or below the fastest peer ({fastest}: {packed:.1f} s vs {peers[fastest]:.1f} s):"
            f" {verdict(packed <= peers[fastest])}; ccat-dagster's own cost per sub-group (packed − Parsl alone, "
            f"÷ N: {own_ms:.1f} ms) ≤ 30 ms: {verdict(own_ms <= 30)}; packed ≥ 10× faster than the floor "
            f"({floor_wall / packed:.1f}×): {verdict(floor_wall / packed >= 10)}; one job per sub-group within 1.2× "
            f"of the floor ({one_job / floor_wall:.2f}×): {verdict(one_job / floor_wall <= 1.2)}; ≤ 20 scheduler "
            f"calls per minute on the one-job path ({one_job_rate:.1f}): {verdict(one_job_rate <= 20)}."
        )
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    report = (
        f"{SECTION}\n\n"
        f"Run on {now} with `.venv/bin/python benchmarks/bench_pilot.py --items {' '.join(map(str, args.items))} "
        f"--rounds {args.rounds} --slow-peers-max-items {args.slow_peers_max_items} --write-docs` "
        "(load average before / after: "
        f"{' '.join(f'{x:.2f}' for x in load_before)} / {' '.join(f'{x:.2f}' for x in load_after)}; the machine "
        "and its Slurm are shared with other work: compare rows of one N with each other).\n\n"
        f"{machine()}\n"
        "- The single-node Slurm of scripts/slurm-single-node.sh (2 CPUs); payload `/bin/true`; ways interleaved "
        "per N; wall = first submission to last result (packed and Parsl include importing Parsl, starting its "
        "engine and releasing the allocations, Snakemake and dagster-slurm are the `snakemake` / `dagster asset "
        "materialize` process from start to exit); calls = squeue + sacct + scontrol counted by shims on PATH (for "
        "dagster-slurm, on the PATH its SSH sessions get).\n\n"
        "| N | way | wall | per item | × floor | × Parsl alone | scheduler calls | calls per minute |\n"
        "|---:|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        "Targets (computed from the table above):\n" + "\n".join(targets) + "\n\n" + WHY + "\n\n"
        f"Snakemake and dagster-slurm run only up to N = {args.slow_peers_max_items} (seconds per item); Snakemake "
        "at its Slurm plugin's default pacing (first status query 40 s after submitting), its group jobs with "
        f"{SNAKEMAKE_GROUP_SIZE} items each and `--cores 1`, so that a group job asks for one CPU. "
        "dagster-slurm over SSH to an sshd on 127.0.0.1 that the script starts, with the peers' venv as its "
        "pre-deployed environment, at its default status polling (2 s, growing to 5 s); its session mode only "
        "with Dagster's in-process executor (with the multiprocess one, the step that created the allocation "
        "cancels it when it is done, under the others' steps), so its items run in series. A row that says "
        '"not run" gives the reason found on this machine. A batch shorter than a minute reads high in calls '
        "per minute: the first poll right after submitting counts for the whole batch.\n"
    )
    print(report)
    if args.write_docs:
        write_section(SECTION, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
