"""A throw-away Slurm cluster inside a temporary directory, for the launch tests.

munged (own key, socket, pid, log and seed files), slurmctld and two slurmd "nodes" n1 and n2 on
this host (own ports, NodeAddr=127.0.0.1), all under one temporary directory; no systemd, no
cgroups. Settings and their reasons are in shared/notes/slurm_in_tests.md; the ones that matter:
``cred_expire=5`` (the default makes a requeued job wait 120 s before it may run again),
``proctrack/pgid`` (linuxproc leaks orphans), ``MinJobAge=300`` (finished jobs stay visible to
``scontrol show job``, there is no accounting daemon).

The cluster is session-scoped (start ~0.5 s plus ~3 s for the first job) and is stopped by process
id: jobs are cancelled first, since stopping slurmd does not end running jobs; a process still
carrying the cluster's SLURM_CONF afterwards is killed and reported as an error. Without root or
without the Debian packages (``apt-get install slurm-wlm munge``) the tests skip with the reason.

``cluster_shards`` runs the preprocessing pipeline on the cluster once per session (tokenizer job,
sharding array job of 2 tasks, merge job, through ``launch.preprocess --submit``) on 4 languages x
300 lines and an en-de pair from the bundled sample; the training tests train on its output.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sample_data import first_lines as _lines  # the bundled sample's first lines

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data_pipeline" / "sample"

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue")
NODES = ("n1", "n2")
# Claimed per node (config_overrides lets slurmd claim more CPUs than the host has) so that the
# array-job test can run a few tasks at once on a 2-core machine.
CPUS_PER_NODE = 4
END_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def _free_ports(count: int) -> list[int]:
    """Distinct TCP ports nothing listens on right now (held open together, then released)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def _wait_for(predicate, *, timeout: float, what: str, period: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(period)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours still answers kill(0); reap it if it is our child.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


class SlurmCluster:
    """A running throw-away cluster; ``env`` points Slurm's commands at it."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        # Nothing of the test session's own Slurm job (if any) must leak into ours.
        for key in list(self.env):
            if key.startswith("SLURM_") and key != "SLURM_CONF":
                del self.env[key]
        self._procs: list[subprocess.Popen] = []

    # -- set-up -------------------------------------------------------------------------------

    def write_config(self) -> None:
        root = self.root
        for sub in ("etc", "state", "spool", "run", "log", "munge"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        # munged refuses a socket directory that others cannot traverse.
        for path in (root, root / "munge"):
            path.chmod(0o755)
        ctld_port, *node_ports = _free_ports(1 + len(NODES))
        host = socket.gethostname()
        sock = root / "munge" / "munge.socket"
        node_lines = "\n".join(
            f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
            f"CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN"
            for node, port in zip(NODES, node_ports)
        )
        (root / "etc" / "plugstack.conf").write_text("")
        self.conf.write_text(
            f"""ClusterName=rosettatest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd-%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
PlugStackConfig={root}/etc/plugstack.conf
MailProg=/bin/true
SlurmctldDebug=info
SlurmdDebug=info
SlurmdParameters=config_overrides
ProctrackType=proctrack/pgid
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
        )

    def start(self) -> None:
        root = self.root
        munge = root / "munge"
        subprocess.run(
            ["mungekey", "-c", "-k", str(munge / "munge.key")], check=True, capture_output=True
        )
        subprocess.run(
            [
                "munged",
                f"--key-file={munge / 'munge.key'}",
                f"--socket={munge / 'munge.socket'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--log-file={munge / 'munged.log'}",
                f"--seed-file={munge / 'munged.seed'}",
            ],
            check=True,
            capture_output=True,
        )
        self._spawn(["slurmctld", "-D", "-c", "-f", str(self.conf)], "slurmctld")
        _wait_for(
            lambda: "UP" in self.run(["scontrol", "ping"], check=False).stdout,
            timeout=30,
            what="slurmctld to answer",
        )
        for node in NODES:
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
        _wait_for(
            lambda: self.run(["sinfo", "-h", "-o", "%t"], check=False).stdout.split() == ["idle"],
            timeout=30,
            what="both nodes idle",
        )

    def _spawn(self, cmd: Sequence[str], name: str) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")  # noqa: SIM115 (kept by the child)
        self._procs.append(
            subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        )
        log.close()

    # -- use ----------------------------------------------------------------------------------

    def run(
        self, cmd: Sequence[str], *, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess:
        """Run a command against this cluster (SLURM_CONF set)."""
        return subprocess.run(
            list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=timeout
        )

    def sbatch(self, *args: str) -> str:
        """Submit with sbatch; returns the job id."""
        done = self.run(["sbatch", "--parsable", *args])
        return done.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` as a mapping (JobState, Restarts, ExitCode, NodeList, ...)."""
        text = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def array_tasks(self, job_id: str) -> list[dict[str, str]]:
        """``scontrol show job`` of every task of an array job (one mapping per task)."""
        text = self.run(["scontrol", "-o", "show", "job", job_id]).stdout
        return [dict(re.findall(r"(\w+)=(\S*)", line)) for line in text.splitlines() if line]

    def wait_array_done(self, job_id: str, *, timeout: float = 60) -> list[dict[str, str]]:
        """Poll until every task of an array job has ended; returns their records."""
        tasks: list[dict[str, str]] = []

        def done() -> bool:
            nonlocal tasks
            tasks = self.array_tasks(job_id)
            # Until Slurm splits it, the pending array is one record with "0-1" as task id.
            return bool(tasks) and all(
                t.get("JobState") in END_STATES and t.get("ArrayTaskId", "").isdigit()
                for t in tasks
            )

        _wait_for(done, timeout=timeout, what=f"array job {job_id} to end", period=0.1)
        return tasks

    def wait_state(self, job_id: str, states: Sequence[str], *, timeout: float = 60) -> dict:
        """Poll until the job is in one of ``states``; returns its ``scontrol show job``."""
        info: dict[str, str] = {}

        def reached() -> bool:
            nonlocal info
            info = self.job(job_id)
            return info.get("JobState") in states

        try:
            _wait_for(reached, timeout=timeout, what=f"job {job_id} in {states}", period=0.1)
        except TimeoutError as err:
            raise TimeoutError(f"{err}; last: {info}") from None
        return info

    def wait_done(self, job_id: str, *, timeout: float = 60) -> dict:
        """Poll until the job has ended; returns its ``scontrol show job``."""
        return self.wait_state(job_id, END_STATES, timeout=timeout)

    # -- tear-down ----------------------------------------------------------------------------

    def _pids(self) -> list[int]:
        pids = []
        for pid_file in [
            self.root / "run" / "slurmctld.pid",
            *(self.root / "run" / f"slurmd-{node}.pid" for node in NODES),
        ]:
            if pid_file.exists():
                pids.append(int(pid_file.read_text().split()[0]))
        return pids

    def stop(self) -> None:
        # Stopping slurmd does not end running jobs: cancel them and wait for the queue to drain.
        self.run(["scancel", "--full", "--user=root"], check=False)
        try:
            _wait_for(
                lambda: not self.run(["squeue", "-h"], check=False).stdout.strip(),
                timeout=30,
                what="the queue to drain",
                period=0.1,
            )
        except TimeoutError:
            pass
        pids = sorted({*self._pids(), *(proc.pid for proc in self._procs)})
        _terminate(pids)
        for proc in self._procs:
            proc.wait(timeout=5)
        munged_pid = self.root / "munge" / "munged.pid"
        if munged_pid.exists():
            _terminate([int(munged_pid.read_text().split()[0])])

    def leftovers(self) -> list[str]:
        """Processes that still carry this cluster's SLURM_CONF (daemons, job steps, ranks).

        Every process started by the cluster or its jobs inherits it, so after :meth:`stop`
        nothing should; the caller kills what is found (by pid) and reports it.
        """
        needle = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
                    found.append(f"{entry.name} {cmdline.decode(errors='replace').strip()}")
            except OSError:  # gone meanwhile, or a kernel thread
                continue
        return found


def _terminate(pids: Sequence[int], *, timeout: float = 15) -> None:
    """SIGTERM the processes, SIGKILL the ones still alive after ``timeout`` seconds."""
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        _wait_for(lambda: not any(_pid_alive(pid) for pid in pids), timeout=timeout, what="exit")
    except TimeoutError:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _why_not() -> str | None:
    """Why a cluster cannot run here, or None."""
    missing = [name for name in DAEMONS if shutil.which(name) is None]
    if missing:
        return (
            f"Slurm/munge not installed ({', '.join(missing)} missing): "
            "apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        return "the throw-away Slurm cluster runs its daemons as root; not root here"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """A two-node Slurm cluster (n1, n2) for this test session; skips where it cannot run."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    # Not under pytest's basetemp: that is 0700, and munged wants every directory above its
    # socket traversable by all. A short path also keeps slurmd's socket path within sun_path.
    root = Path(tempfile.mkdtemp(prefix="rosetta-slurm-", dir="/tmp"))
    cluster = SlurmCluster(root)
    cluster.write_config()
    try:
        cluster.start()
        # The controller holds the first job ~3 s after start-up; pay that once, here.
        cluster.run(["srun", "-N", "2", "true"], timeout=60)
        yield cluster
    finally:
        cluster.stop()
        leaked = cluster.leftovers()
        for line in leaked:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)
        shutil.rmtree(root, ignore_errors=True)
    assert not leaked, f"processes left by the Slurm tests (killed now): {leaked}"


# -- the preprocessing pipeline on the cluster, once per session ------------------------------

LANGS = ("en", "de", "ru", "ja")
LINES = 300
VOCAB = 2000


@dataclass(frozen=True)
class ClusterShards:
    """What ``cluster_shards`` made, and the jobs that made it."""

    root: Path
    """Directory of the corpus and every output."""
    inputs: tuple[str, ...]
    """The ``--input`` arguments (one per language), then ``--parallel`` (the pair)."""
    tokenizer: Path
    """Tokenizer directory (tokenizer job)."""
    shards: Path
    """The merged shard directory: ``manifest.json`` over ``part_0`` and ``part_1``."""
    tokenizer_job: str
    array_job: str
    merge_job: str
    submit_stderr: str
    """What ``launch.preprocess shard --submit`` said on stderr (array and merge job ids)."""


def write_corpus(root: Path) -> tuple[str, ...]:
    """4 languages x 300 lines and 200 en-de pairs from the bundled sample, as plain files
    under ``root``; returns the ``--input`` / ``--parallel`` arguments naming them."""
    args: list[str] = []
    for lang in LANGS:
        path = root / f"{lang}.txt"
        path.write_text("\n".join(_lines(SAMPLE / "mono" / f"{lang}.train.txt.zst", LINES)) + "\n")
        args += ["--input", f"{lang}={path}"]
    tsv = root / "en-de.tsv"
    tsv.write_text("\n".join(_lines(SAMPLE / "parallel" / "en-de.train.tsv.zst", 200)) + "\n")
    args += ["--parallel", f"en-de={tsv}"]
    return tuple(args)


def preprocess(argv: Sequence[str]) -> tuple[str, str]:
    """``python -m launch.preprocess ARGV`` in this process; returns (stdout, stderr).

    In-process: its own process would cost an interpreter start for nothing.

    Raises:
        AssertionError: a non-zero exit, with what it said.
    """
    from launch.preprocess import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    assert code == 0, f"launch.preprocess {' '.join(argv)}: exit {code}: {err.getvalue()}"
    return out.getvalue(), err.getvalue()


@pytest.fixture(scope="session")
def cluster_shards(
    slurm_cluster: SlurmCluster, tmp_path_factory: pytest.TempPathFactory
) -> ClusterShards:
    """Tokenizer job -> 2-task sharding array job -> merge job, all submitted at once; Slurm's
    dependencies order them. Fails with the jobs' logs when the merge did not complete."""
    root = tmp_path_factory.mktemp("slurm_data")
    inputs = write_corpus(root)
    tokenizer, shards = root / "tok", root / "shards"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SLURM_CONF", slurm_cluster.env["SLURM_CONF"])
        out, _ = preprocess(
            ["train-tokenizer", *inputs[: 2 * len(LANGS)], "--out", str(tokenizer)]
            + ["--vocab-size", str(VOCAB), "--workers", "1", "--submit"]
        )
        tokenizer_job = out.strip()
        # Submitted before the tokenizer exists: Slurm holds it until the tokenizer job succeeded.
        out, err = preprocess(
            ["shard", "--tokenizer", str(tokenizer), *inputs, "--out", str(shards)]
            + ["--array", "2", "--workers", "1", "--sample-tokens", "512", "--quiet"]
            + ["--after", tokenizer_job, "--submit"]
        )
    merge_job = out.strip()
    match = re.search(r"array job (\d+), merge job (\d+)", err)
    assert match and match.group(2) == merge_job, (out, err)
    info = slurm_cluster.wait_done(merge_job, timeout=120)
    if info["JobState"] != "COMPLETED":
        logs = {p.name: p.read_text() for p in sorted(root.glob("*.jobs/logs/*.out"))}
        raise AssertionError(f"merge job {merge_job}: {info}; logs: {logs}")
    return ClusterShards(
        root=root,
        inputs=inputs,
        tokenizer=tokenizer,
        shards=shards,
        tokenizer_job=tokenizer_job,
        array_job=match.group(1),
        merge_job=merge_job,
        submit_stderr=err,
    )
