"""The workflow on a real scheduler, and what a cluster run needs (profiles, conda env).

``test_demo_slice_runs_as_slurm_jobs_with_the_requested_resources`` starts a private
one-node SLURM on this machine (Debian's slurm-wlm and munge, as root, no systemd: munged,
slurmctld and slurmd in the foreground, in a scratch folder, on free ports), runs a slice
of the demo grid (demo base, adapters and tasks, two bakes, three normalisations, one
merge and its eval) through ``snakemake --profile profiles/slurm``, and checks from SLURM
itself (``scontrol show job`` and the job-completion log) that every job ran as a SLURM
job and got exactly the memory, CPUs and time limit it asked for, the resource model's
figures; one job is made to fail once, and its retry asks SLURM for twice the memory and
time (the profile's ``retries``, the model's attempt scaling). The daemons are stopped
(jobs cancelled first) whether the test passes or not, and die with the test process if
it is killed. Where SLURM cannot be started the test is skipped saying why, unless
MERGEBAKE_REQUIRE_SLURM=1 (set by .ci/run), where that is a failure.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml
from _workflow import BIN, ROOT, demo_config, env, write_config

from mergebake import resources as R

SBIN = ("/usr/sbin", "/sbin", "/usr/bin", "/bin")
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo", "srun")
TARGET = "results/eval/1b-std/eng-nob__linear.json"
# The slice: every job of TARGET on the default config, each a SLURM job.
SLICE = Counter(
    demo_base=1,
    demo_tasks=1,
    demo_adapter=2,
    bake=2,
    normalise_base=1,
    normalise_baked=2,
    merge=1,
    eval_cell=1,
)
SNAKEMAKE_LIMIT_S = 1500  # timeout -k: Snakemake ignores SIGTERM while jobs run
INIT_SECONDS = 5  # first status check (the profile's 20 s, shortened for the test)


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), *SBIN]))


def _why_not() -> str | None:
    """Why a SLURM cluster cannot be started here, or None."""
    missing = [b for b in DAEMONS + CLIENTS if _which(b) is None]
    if missing:
        return (
            f"SLURM/munge not installed ({', '.join(missing)} missing); "
            "apt-get install slurm-wlm munge (as .ci/run does)"
        )
    if os.geteuid() != 0:
        return "starting slurmd/slurmctld here needs root"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install -e '.[dev]')"
    return None


def _skip_or_fail(reason: str):
    if os.environ.get("MERGEBAKE_REQUIRE_SLURM") == "1":
        pytest.fail(f"SLURM required (MERGEBAKE_REQUIRE_SLURM=1) but: {reason}")
    pytest.skip(reason)


def _die_with_parent():  # pragma: no cover - runs in the child between fork and exec
    """SIGTERM the daemon when the test process dies, even by SIGKILL (prctl PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _mem_total_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 8192


class Cluster:
    """A one-node SLURM in ``root``; ``env`` points client commands and jobs at it."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.node = socket.gethostname().split(".")[0]
        self.jobcomp = root / "log" / "jobcomp.txt"
        self.env = env()
        # The jobstep plugin strips SLURM_* (SLURM_CONF too) from the environment of the
        # srun it starts inside each job, so srun would look for /etc/slurm/slurm.conf;
        # this cluster is private, so srun is wrapped to name its config.
        shim = root / "bin"
        shim.mkdir()
        (shim / "srun").write_text(
            f'#!/bin/sh\nSLURM_CONF="{self.conf}" exec "{_which("srun")}" "$@"\n'
        )
        (shim / "srun").chmod(0o755)
        self.env["PATH"] = os.pathsep.join([str(shim), str(BIN), self.env["PATH"], *SBIN])
        self.env["SLURM_CONF"] = str(self.conf)
        for var in [v for v in self.env if v.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if var != "SLURM_CONF":
                del self.env[var]

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "wb")
        self.procs[name] = subprocess.Popen(
            [_which(name), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
            preexec_fn=_die_with_parent,
            cwd=self.root,
        )
        log.close()

    def run(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        p = subprocess.run(
            [_which(cmd[0]) or cmd[0], *cmd[1:]],
            env=self.env,
            text=True,
            capture_output=True,
            timeout=timeout,
        )
        if check and p.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {p.stderr.strip()}")
        return p.stdout

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            lines = f.read_text(errors="replace").splitlines()[-15:]
            out.append(f"--- {f.name}\n" + "\n".join(lines))
        return "\n".join(out)

    def start(self) -> None:
        (self.root / "log").mkdir()
        munge = self.root / "munge"
        munge.mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        socket_path = munge / "munge.sock"
        self._spawn(
            "munged",
            "--foreground",
            "--force",
            f"--key-file={key}",
            f"--socket={socket_path}",
            f"--pid-file={munge / 'munged.pid'}",
            f"--seed-file={munge / 'munged.seed'}",
            f"--log-file={self.root / 'log' / 'munged.log'}",
        )
        self._wait(lambda: socket_path.exists(), 15, "munged did not create its socket")
        mem = min(int(_mem_total_mib() * 0.75), 32000)
        cpus = os.cpu_count() or 1
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        self.conf.write_text(
            f"""\
ClusterName=mergebake-test
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={self.root / "state"}
SlurmdSpoolDir={self.root / "spool"}
SlurmctldPidFile={self.root / "slurmctld.pid"}
SlurmdPidFile={self.root / "slurmd.pid"}
SlurmctldLogFile={self.root / "log" / "slurmctld.log"}
SlurmdLogFile={self.root / "log" / "slurmd.log"}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
# Finished jobs stay visible to squeue/scontrol for an hour: the plugin's squeue status
# queries need MinJobAge >= 3 x its first-check delay, and the test reads every job.
MinJobAge=3600
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=cpu Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
"""
        )
        self._spawn("slurmctld", "-D", "-f", str(self.conf))
        self._spawn("slurmd", "-D", "-f", str(self.conf), "-N", self.node)

        def idle():
            out = self.run("sinfo", "-h", "-o", "%T", check=False, timeout=10)
            return out.strip().rstrip("*") == "idle"

        self._wait(idle, 60, "the node did not come up idle")

    def _wait(self, ready, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{', '.join(dead)} exited")
            if ready():
                return
            time.sleep(0.5)
        raise RuntimeError(what)

    def stop(self) -> list[str]:
        """Cancel every job, stop slurmd, slurmctld and munged; return any left running."""
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
            ids = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).split()
            if ids:
                self.run("scancel", *ids, check=False, timeout=10)
                deadline = time.monotonic() + 30
                while (
                    time.monotonic() < deadline
                    and self.run(
                        "squeue", "-h", "-t", "PD,R,CG", "-o", "%i", check=False, timeout=10
                    ).strip()
                ):
                    time.sleep(1)
        left = []
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.get(name)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    left.append(f"{name} (pid {p.pid})")
        return left

    def jobs(self) -> dict[str, dict[str, str]]:
        """Every job slurmctld knows (MinJobAge keeps finished ones): id -> fields."""
        out = self.run("scontrol", "show", "job", "-o")
        jobs = {}
        for line in out.splitlines():
            fields = dict(re.findall(r"(\w+(?:/\w+)?)=(\S*)", line))
            if "JobId" in fields:
                jobs[fields["JobId"]] = fields
        return jobs

    def completed(self) -> dict[str, dict[str, str]]:
        """The job-completion log (jobcomp/filetxt): one record per finished job."""
        records = {}
        if self.jobcomp.exists():
            for line in self.jobcomp.read_text().splitlines():
                fields = dict(re.findall(r"(\w+)=(\S*)", line))
                if "JobId" in fields:
                    records[fields["JobId"]] = fields
        return records


@pytest.fixture
def slurm():
    """A running one-node SLURM; always stopped afterwards (jobs cancelled first)."""
    reason = _why_not()
    if reason:
        _skip_or_fail(reason)
    # A short folder: the munge socket path must fit in a sockaddr_un (108 bytes).
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="mbslurm-", dir="/tmp")))
    try:
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            logs = cluster.logs()
            left = cluster.stop()
            assert not left, f"could not stop {left}"
            _skip_or_fail(f"could not start SLURM here: {e}\n{logs}")
        yield cluster
    finally:
        left = cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
        assert not left, f"SLURM daemons still running after the test: {left}"


def _minutes(limit: str) -> int:
    """SLURM's TimeLimit ([D-]HH:MM:SS) in minutes."""
    days, _, hms = limit.rpartition("-")
    h, m, s = (int(x) for x in hms.split(":"))
    return (int(days or 0) * 24 + h) * 60 + m + (s > 0)


def _fail_first_demo_tasks(shim: Path, mark: Path) -> None:
    """Put a `mergebake` on PATH whose first `demo-tasks` fails (then the real one runs)."""
    (shim / "mergebake").write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = demo-tasks ] && [ ! -e "{mark}" ]; then\n'
        f'  touch "{mark}"; echo "injected failure: first attempt" >&2; exit 1\n'
        "fi\n"
        f'exec "{BIN / "mergebake"}" "$@"\n'
    )
    (shim / "mergebake").chmod(0o755)


_EVENT = re.compile(
    r"^rule (?P<rule>\w+):\n(?P<body>(?:    .*\n)+)"
    r"|Job (?P<job>\d+) has been submitted with SLURM jobid (?P<slurm>\d+) \(log: (?P<log>.+?)\)\.",
    re.M,
)


def _submissions(out: str) -> list[dict]:
    """Each sbatch of the run, in order: rule, what Snakemake asked for, SLURM id, log."""
    last, subs = {}, []
    for m in _EVENT.finditer(out):
        if m["rule"]:
            fields = dict(re.findall(r"^    (\w+): (.*)$", m["body"], re.M))
            res = dict(kv.split("=", 1) for kv in fields["resources"].split(", "))
            last[fields["jobid"]] = dict(
                rule=m["rule"],
                threads=int(fields.get("threads", 1)),
                mem_mb=int(res["mem_mb"]),
                runtime=int(res["runtime"]),
            )
        else:
            subs.append(last[m["job"]] | dict(job=m["job"], slurm=m["slurm"], log=Path(m["log"])))
    return subs


@pytest.mark.workflow
def test_demo_slice_runs_as_slurm_jobs_with_the_requested_resources(
    slurm, tmp_path, record_property
):
    wd = tmp_path / "wd"
    wd.mkdir()
    write_config(wd / "config.yaml", demo_config())
    _fail_first_demo_tasks(slurm.root / "bin", tmp_path / "failed-once")
    cmd = [
        "timeout",
        "-k",
        "30",
        str(SNAKEMAKE_LIMIT_S),
        str(BIN / "snakemake"),
        "-s",
        str(ROOT / "Snakefile"),
        "-d",
        str(wd),
        "--configfile",
        str(wd / "config.yaml"),
        "--profile",
        str(ROOT / "profiles" / "slurm"),
        "--slurm-init-seconds-before-status-checks",
        str(INIT_SECONDS),
        TARGET,
    ]
    t0 = time.monotonic()
    p = subprocess.run(cmd, env=slurm.env, cwd=wd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    record_property("slurm_slice_wall_s", round(wall, 1))
    print(f"SLURM slice: {wall:.0f} s wall")
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"snakemake exited {p.returncode}\n{out[-8000:]}\n{slurm.logs()}"
    assert (wd / TARGET).is_file()

    # Every job of the slice became a SLURM job; demo_tasks twice (failed, then retried).
    subs = _submissions(out)
    assert Counter(s["rule"] for s in subs) == SLICE + Counter(demo_tasks=1)
    # none ran outside SLURM but the one payload file of the slice (the eval task list),
    # a localrule written where Snakemake runs
    assert len(re.findall(r"^localrule payload:", out, re.M)) == 1
    assert out.count("Finished jobid") == sum(SLICE.values()) + 1
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)

    # From SLURM itself: each ran there with exactly what Snakemake asked for.
    jobs, done = slurm.jobs(), slurm.completed()
    for s in subs:
        got = jobs[s["slurm"]]
        assert got["JobName"] == run_id
        assert got["Comment"].startswith(f"rule_{s['rule']}"), got["Comment"]
        assert got["MinMemoryNode"] == f"{s['mem_mb']}M", (s, got["MinMemoryNode"])
        assert int(got["NumCPUs"]) == s["threads"]
        assert _minutes(got["TimeLimit"]) == s["runtime"]
        assert f"mem={s['mem_mb']}M" in done[s["slurm"]]["Tres"]  # the completion record
        assert done[s["slurm"]]["JobState"] == got["JobState"]
        assert s["log"].is_file() and s["log"].is_relative_to(wd / ".snakemake" / "slurm_logs")
    states = [(s["rule"], jobs[s["slurm"]]["JobState"]) for s in subs]
    assert states.count(("demo_tasks", "FAILED")) == 1
    assert all(state == "COMPLETED" for rule, state in states if rule != "demo_tasks")

    # The retry asked for twice the memory and time, as attempt 2.
    first, retry = (jobs[s["slurm"]] for s in subs if s["rule"] == "demo_tasks")
    assert (first["JobState"], retry["JobState"]) == ("FAILED", "COMPLETED")
    fixed = R.job_resources("demo_tasks", None)
    assert first["MinMemoryNode"] == f"{fixed['mem_mb']}M"
    assert retry["MinMemoryNode"] == f"{2 * fixed['mem_mb']}M"
    assert _minutes(retry["TimeLimit"]) == 2 * fixed["runtime"]

    # What was asked is the resource model on the real inputs, and it was enough.
    by_rule = {s["rule"]: jobs[s["slurm"]] for s in subs}
    base = R.measure(wd / "results/text/1b-std/_base")
    want = R.job_resources("merge", base, factor=R.method_factor("linear"))
    assert by_rule["merge"]["MinMemoryNode"] == f"{want['mem_mb']}M"
    cell = R.measure(wd / "results/merged/1b-std/eng-nob__linear")
    want = R.job_resources("eval_cell", cell, factor=R.dtype_factor("float32", cell))
    assert by_rule["eval_cell"]["MinMemoryNode"] == f"{want['mem_mb']}M"
    limit = {}
    for s in subs:
        limit[s["rule"]] = min(limit.get(s["rule"], s["mem_mb"]), s["mem_mb"])
    for tsv in (wd / "benchmarks").rglob("*.tsv"):
        rule = tsv.relative_to(wd / "benchmarks").parts[0]
        header, row = tsv.read_text().splitlines()[:2]
        max_rss = float(dict(zip(header.split("\t"), row.split("\t"), strict=True))["max_rss"])
        assert max_rss < limit[rule], f"{rule} peaked at {max_rss} MB, asked {limit[rule]}"


# ---- what a cluster run needs, checked without one --------------------------

SLURM_PROFILE = ROOT / "profiles" / "slurm" / "config.yaml"
DEFAULT_PROFILE = ROOT / "profiles" / "default" / "config.yaml"


def _keys_without_comment(path: Path) -> list[str]:
    """Top-level keys of a profile with no comment on their line or the lines above."""
    lines = path.read_text().splitlines()
    bare = []
    for i, line in enumerate(lines):
        if re.match(r"^[a-z][\w-]*:", line) and "#" not in line:
            if not (i and lines[i - 1].lstrip().startswith("#")):
                bare.append(line)
    return bare


def test_profiles_are_documented_line_by_line():
    for path in (SLURM_PROFILE, DEFAULT_PROFILE):
        assert _keys_without_comment(path) == [], path


def test_slurm_profile_has_what_the_plugin_needs():
    prof = yaml.safe_load(SLURM_PROFILE.read_text())
    assert prof["executor"] == "slurm"
    assert prof["slurm-status-command"] == "squeue"  # works without slurmdbd
    # squeue shows finished jobs for MinJobAge (300 s by default): >= 3 x first check
    assert 3 * prof["slurm-init-seconds-before-status-checks"] <= 300
    assert prof["default-resources"]["mem_mb"] > 0  # else a job may take the whole node
    assert prof["default-resources"]["runtime"] > 0
    assert prof["retries"] >= 1 and prof["jobs"] >= 1 and prof["latency-wait"] >= 30
    text = SLURM_PROFILE.read_text()
    assert "slurm_partition" in text and "slurm_account" in text


def test_default_profile_leaves_cluster_settings_to_the_slurm_profile():
    """profiles/default is applied to every run (workflow profile) and wins per key."""
    default = yaml.safe_load(DEFAULT_PROFILE.read_text())
    slurm = yaml.safe_load(SLURM_PROFILE.read_text())
    assert "cores" not in default  # would cap every cluster job's threads
    for key in set(default) & set(slurm):
        assert default[key] == slurm[key], key


def test_slurm_profile_plans_the_demo_grid(tmp_path):
    pytest.importorskip("snakemake_executor_plugin_slurm")
    write_config(tmp_path / "config.yaml", demo_config())
    p = subprocess.run(
        [
            str(BIN / "snakemake"),
            "-s",
            str(ROOT / "Snakefile"),
            "-d",
            str(tmp_path),
            "--configfile",
            str(tmp_path / "config.yaml"),
            "--profile",
            str(SLURM_PROFILE.parent),
            "-n",
        ],
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Using profile" in p.stderr and "profiles/slurm" in p.stderr


def _pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        m = re.match(r"^\s*(?:-\s*)?([A-Za-z0-9_.-]+)==([^\s#]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def test_conda_env_pins_the_tested_versions():
    env_yaml = yaml.safe_load((ROOT / "envs" / "mergebake.yaml").read_text())
    pip = next(d["pip"] for d in env_yaml["dependencies"] if isinstance(d, dict))
    in_env = _pins(pip)
    tested = _pins((ROOT / "constraints.txt").read_text().splitlines())
    assert in_env, pip
    for name, version in in_env.items():
        assert tested.get(name, version) == version, (name, version, tested.get(name))
    for name in ("torch", "transformers", "peft", "mergekit", "lm-eval", "huggingface-hub"):
        assert name in in_env, name
    assert "-e ${MERGEBAKE_ROOT}" in pip  # the mergebake command itself
    assert any(str(d).startswith("python=3.11") for d in env_yaml["dependencies"])


def test_conda_env_installs_this_checkout(tmp_path):
    """The env's pip line, as conda hands it to pip, resolves to this checkout."""
    pip = yaml.safe_load((ROOT / "envs" / "mergebake.yaml").read_text())["dependencies"]
    line = next(x for d in pip if isinstance(d, dict) for x in d["pip"] if x.startswith("-e"))
    req = tmp_path / "condaenv.requirements.txt"  # conda writes the pip list to such a file
    req.write_text(line + "\n")
    e = env() | {"MERGEBAKE_ROOT": str(ROOT)}
    p = subprocess.run(
        [
            str(BIN / "python"),
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "-r",
            str(req),
        ],
        env=e,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Would install mergebake" in p.stdout


def test_workflow_points_the_env_at_its_own_folder():
    text = (ROOT / "rules" / "common.smk").read_text()
    assert "os.environ.update(MERGEBAKE_ROOT=str(workflow.basedir))" in text
