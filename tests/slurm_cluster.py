"""A private, real Slurm cluster on this machine for tests: munge + slurmctld + one slurmd per node.

Everything (keys, sockets, state, logs, slurm.conf) lives in one folder; the daemons are this process's children
and `stop()` ends exactly those. Several nodes share the host: each slurmd runs with its own `-N nodeX` and port,
inside a private mount namespace whose /etc/hosts also names node1..nodeN, so jobs (which inherit it) resolve
the node names like on a real cluster while the machine's /etc/hosts stays untouched.

    with SlurmCluster(tmp_path, nodes=2) as cluster:
        job = cluster.sbatch("slurm/pretrain_minijoint.sh", options=["--nodes=2"], cwd=repo)
        result = cluster.wait(job)          # polls squeue/scontrol, not `sbatch --wait` (which sleeps up to 42 s)
        assert result.state == "COMPLETED", result

Slurm is installed from Debian with apt-get when missing (we are root on CI machines).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

SLURM_PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "PREEMPTED",
}


def ensure_packages(packages: list[str], binaries: list[str]) -> None:
    """apt-get install `packages` unless every one of `binaries` is already on PATH (or in /usr/sbin)."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    if all(shutil.which(b, path=path) for b in binaries):
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"{', '.join(packages)} missing and not root: install them with apt-get")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def ensure_slurm() -> None:
    ensure_packages(SLURM_PACKAGES, ["slurmctld", "slurmd", "sbatch", "munged", "mungekey"])


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclasses.dataclass
class JobResult:
    job_id: str
    state: str
    exit_code: str  # "code:signal", as Slurm prints it
    restarts: int
    info: dict

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED" and self.exit_code == "0:0"


class SlurmCluster:
    def __init__(self, root: str | os.PathLike, nodes: int = 1, cpus_per_node: int = 2, gpus_per_node: int = 0,
                 memory_mb: int = 8000):
        self.root = Path(root).resolve()
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus_per_node = cpus_per_node
        self.gpus_per_node = gpus_per_node
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        # Unix sockets (munge's, each job step's in the spool) allow 108 bytes of path: they live in a short
        # directory of their own, since the root under pytest's tmp_path (a worker's, a long test name) may be longer
        self.sockets = Path(tempfile.mkdtemp(prefix="slurm-"))
        self.munge_socket = self.sockets / "munge" / "munge.socket"
        self._procs: dict[str, subprocess.Popen] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    @property
    def daemons(self) -> dict[str, subprocess.Popen]:
        """name -> process of every daemon this cluster started (munged, slurmctld, slurmd-nodeX)."""
        return dict(self._procs)

    @property
    def env(self) -> dict[str, str]:
        """The environment for Slurm clients (sbatch, squeue, ...) and hence for the jobs they submit."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        ensure_slurm()
        for sub in ("munge", "state", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("munge", "spool"):
            (self.sockets / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        os.chmod(self.sockets / "munge", 0o700)
        self._start_munge()
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        hosts = self.root / "hosts"
        hosts.write_text(Path("/etc/hosts").read_text() + f"\n127.0.0.1 {' '.join(self.nodes)}\n")
        for node in self.nodes:
            (self.sockets / "spool" / node).mkdir(exist_ok=True)
            # exec keeps the Popen pid == slurmd's pid, so stop() signals the daemon itself.
            inner = 'mount --bind "$1" /etc/hosts && exec slurmd -D -N "$2" -f "$3"'
            self._spawn(f"slurmd-{node}", ["unshare", "-m", "--propagation", "private", "--", "sh", "-c", inner,
                                           "sh", str(hosts), node, str(self.conf)])
        self._wait_nodes_idle(timeout)
        return self

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            subprocess.run(["mungekey", "-c", "-k", str(key)], check=True)
        os.chmod(key, 0o600)
        d = self.root / "munge"
        self._spawn("munged", ["munged", "-F", "--force", f"--key-file={key}", f"--socket={self.munge_socket}",
                               f"--pid-file={d / 'munged.pid'}", f"--log-file={d / 'munged.log'}",
                               f"--seed-file={d / 'munged.seed'}"])
        deadline = time.monotonic() + 20
        while not self.munge_socket.exists():
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create {self.munge_socket}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        r = self.root
        lines = [
            "ClusterName=local",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
            f"AuthInfo=socket={self.munge_socket},cred_expire=5",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={self.sockets / 'spool' / '%n'}",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}", f"SlurmdPidFile={self.sockets / 'spool' / 'slurmd.%n.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={r / 'log' / 'slurmd.%n.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "SchedulerParameters=sched_interval=2,bf_interval=1",
            "MpiDefault=none", "SwitchType=switch/none", "MailProg=/bin/true",
            "ReturnToService=2", "SlurmdParameters=config_overrides",
            # An impossible request is refused at submission instead of pending forever. (A dependant of a
            # failed job pends forever on a cluster left at Slurm's default: slurm/pipeline.sh submits with
            # --kill-on-invalid-dep=yes, which the pipeline test checks here, where nothing else cancels them.)
            "EnforcePartLimits=ALL",
            "JobCompType=jobcomp/filetxt", f"JobCompLoc={r / 'log' / 'jobcomp.txt'}",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "KillWait=10", "InactiveLimit=0", "MinJobAge=600",
        ]
        gres = ""
        if self.gpus_per_node:
            # Fake GPUs: Slurm only needs device files to hand out; jobs get SLURM_GPUS_ON_NODE and
            # CUDA_VISIBLE_DEVICES like on a GPU cluster, while torch still sees no CUDA.
            lines.append("GresTypes=gpu")
            gres = f" Gres=gpu:{self.gpus_per_node}"
            devices = []
            for i in range(self.gpus_per_node):
                dev = r / "dev" / f"gpu{i}"
                dev.parent.mkdir(exist_ok=True)
                if not dev.exists():
                    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a /dev/null twin
                devices.append(str(dev))
            (r / "gres.conf").write_text(f"Name=gpu File={','.join(devices)}\n")
        for node, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={self.cpus_per_node} RealMemory={self.memory_mb}{gres} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "ab")
        self._procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                             env=self.env, start_new_session=True)
        log.close()

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.root / 'log'}\n"
                                   + self.logs_tail())

    def logs_tail(self, lines: int = 15) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            text = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)

    def _wait_nodes_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, env=self.env)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if r.returncode == 0 and len(states) == len(self.nodes) and all(s == "idle" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after {timeout}s: {states or r.stderr}\n{self.logs_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """End our own daemons (children of this process, by pid), slurmds first."""
        for name in sorted(self._procs, key=lambda n: (n == "munged", n == "slurmctld")):
            proc = self._procs[name]
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self._procs.clear()
        shutil.rmtree(self.sockets, ignore_errors=True)

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- jobs -------------------------------------------------------------------------------------
    def run(self, argv: list[str], cwd: str | os.PathLike | None = None, env: dict | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, env={**self.env, **(env or {})})
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
        return r

    def sbatch(self, script: str | os.PathLike, *args: str, options: list[str] = (), cwd=None,
               env: dict | None = None) -> str:
        """Submit a batch script; returns the job id."""
        r = self.run(["sbatch", "--parsable", *options, str(script), *args], cwd=cwd, env=env)
        return r.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> list[dict]:
        """`scontrol show job -o` as dicts (one per array task), [] once the job has left slurmctld's memory."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        jobs = []
        for line in r.stdout.splitlines():
            fields = {}
            for token in line.split():
                if "=" in token:
                    k, v = token.split("=", 1)
                    fields.setdefault(k, v)
            if fields:
                jobs.append(fields)
        return jobs

    def state(self, job_id: str) -> str:
        r = self.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], check=False)
        return r.stdout.strip().splitlines()[0] if r.stdout.strip() else ""

    def wait_until(self, job_id: str, states: set[str], timeout: float = 120, poll: float = 0.3) -> JobResult:
        """Poll until every task of `job_id` is in one of `states`; raise on timeout (with logs)."""
        deadline = time.monotonic() + timeout
        while True:
            infos = self.job_info(job_id)
            if infos and all(i.get("JobState") in states for i in infos):
                break
            if time.monotonic() > deadline:
                summary = [(i.get("JobId"), i.get("JobState"), i.get("Reason")) for i in infos]
                raise TimeoutError(f"job {job_id} not in {states} after {timeout}s: {summary}\n{self.logs_tail()}")
            time.sleep(poll)
        main = infos[0]
        worst = next((i for i in infos if i.get("JobState") != "COMPLETED"), main)
        return JobResult(job_id=str(job_id), state=worst["JobState"], exit_code=worst.get("ExitCode", ""),
                         restarts=int(main.get("Restarts", 0)), info=main)

    def wait(self, job_id: str, timeout: float = 300) -> JobResult:
        """Wait for a job (all tasks of an array) to end."""
        return self.wait_until(job_id, TERMINAL_STATES, timeout)

    def jobcomp(self) -> str:
        """The job completion log (`sacct -c` reads the same file)."""
        f = self.root / "log" / "jobcomp.txt"
        return f.read_text() if f.exists() else ""
