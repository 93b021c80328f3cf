"""The launch files in ``deploy/``: torchrun script, Slurm batch script, Kubernetes manifests.

No cluster here, so: shell syntax (``bash -n``) and the scripts' behaviour with stand-ins for
``python``/``srun``/``scontrol`` (the exact torchrun command they build), one real torchrun
run of the launch script, and for the manifests a parse, a schema check of the fields we use
(unknown keys and wrong types fail, so a typo cannot slip through) and the cross-references
that make the job work (Service <-> pods <-> PodMonitor, ports per local rank, node counts).
Every ``pagedopt train`` command the files build is parsed with the real ``pagedopt train``
parser, so a flag that the job does not have fails here, not on the cluster.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import shlex
import shutil
import subprocess
import time
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
LAUNCH = DEPLOY / "torchrun" / "launch.sh"
SBATCH = DEPLOY / "slurm" / "train.sbatch"
K8S = DEPLOY / "kubernetes"
METRICS_BASE = 9460


def parse_train_command(argv: list[str]):
    """The arguments after ``-m pagedopt train`` in ``argv``, parsed by the real parser of
    ``pagedopt train`` (argparse errors become test failures naming the command)."""
    from pagedopt.cli import build_parser

    starts = [i for i in range(len(argv) - 2) if argv[i:i + 3] == ["-m", "pagedopt", "train"]]
    assert starts, f"no '-m pagedopt train' in {argv}"
    rest = argv[starts[0] + 3:]
    try:
        return build_parser().parse_args(["train", *rest])
    except SystemExit:
        pytest.fail(f"`pagedopt train` rejects the arguments {rest}")


def test_parse_train_command_catches_a_flag_mismatch(capsys):
    with pytest.raises(pytest.fail.Exception, match="rejects the arguments"):
        parse_train_command(["-m", "pagedopt", "train", "--metrics-prot", "9460"])
    assert "unrecognized arguments: --metrics-prot" in capsys.readouterr().err


# --- shell scripts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("script", [LAUNCH, SBATCH], ids=lambda p: p.name)
def test_shell_syntax(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "warning", str(script)], check=True)


def _stub(dir_: Path, name: str, body: str) -> Path:
    path = dir_ / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(0o755)
    return path


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NNODES", "NPROC"))}
    for key in ("RUN_ID", "DISTRIBUTED", "METRICS_PORT", "METRICS_ADDR", "TRAIN_MODULE", "PYTHON"):
        env.pop(key, None)
    env.update(extra)
    return env


def _launch_argv(tmp_path: Path, *args: str, **env: str) -> list[str]:
    """The command launch.sh execs, captured by a stand-in interpreter."""
    python = _stub(tmp_path, "fake-python", 'printf "%s\\n" "$@"\n')
    proc = subprocess.run(
        ["bash", str(LAUNCH), *args], env=_clean_env(PYTHON=str(python), **env),
        capture_output=True, text=True, check=True,
    )
    return proc.stdout.splitlines()


def test_launch_single_node_defaults(tmp_path):
    argv = _launch_argv(tmp_path, "--steps", "5", NPROC_PER_NODE="4")
    assert argv[:2] == ["-m", "torch.distributed.run"]
    assert "--nnodes=1" in argv and "--nproc-per-node=4" in argv and "--standalone" in argv
    module = argv.index("-m", 2)
    assert argv[module + 1:module + 5] == ["pagedopt", "train", "--distributed", "fsdp"]
    assert argv[-6:] == ["--metrics-port", "9460", "--metrics-addr", "127.0.0.1", "--steps", "5"]
    args = parse_train_command(argv)
    assert (args.distributed, args.metrics_port, args.metrics_addr, args.steps) == ("fsdp", 9460, "127.0.0.1", 5)


def test_launch_multi_node_rendezvous(tmp_path):
    argv = _launch_argv(
        tmp_path, NNODES="3", NPROC_PER_NODE="8", MASTER_ADDR="node0", MASTER_PORT="29555",
        RUN_ID="job7", DISTRIBUTED="ddp", METRICS_PORT="", MAX_RESTARTS="2",
    )
    assert "--standalone" not in argv
    for flag in ("--nnodes=3", "--nproc-per-node=8", "--rdzv-backend=c10d", "--rdzv-endpoint=node0:29555",
                 "--rdzv-id=job7", "--max-restarts=2"):
        assert flag in argv
    assert argv[-2:] == ["--distributed", "ddp"]  # METRICS_PORT="" turns the metrics flags off
    args = parse_train_command(argv)
    assert args.distributed == "ddp" and not hasattr(args, "metrics_port")


def test_launch_rejects_unknown_mode(tmp_path):
    python = _stub(tmp_path, "fake-python", "exit 0\n")
    proc = subprocess.run(["bash", str(LAUNCH)], env=_clean_env(PYTHON=str(python), DISTRIBUTED="zero"),
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "DISTRIBUTED=zero" in proc.stderr


def _aborted_after_finishing(out: str, err: str) -> bool:
    """The job printed its ``done:`` line, then gloo aborted a rank at interpreter exit: the
    torch race of docs/distributed.md, "Exiting", which DistributedRun.close() makes rare by
    letting gloo's worker threads settle but cannot rule out. Not the job's failure: its
    output is complete and checked either way."""
    return bool(re.search(r"^done: ", out, re.M)) and "terminate called without an active exception" in err


@pytest.mark.distributed
def test_launch_runs_a_real_torchrun_job():
    """launch.sh itself, with 2 CPU workers running the main job (`pagedopt train`, FSDP2)."""
    def launch() -> subprocess.CompletedProcess:
        return subprocess.run(
            ["bash", str(LAUNCH), "--device", "cpu", "--steps", "3", "--log-every", "1", "--model-size", "tiny",
             "--seq-len", "64", "--batch-size", "8", "--max-corpus-bytes", "400000", "--eval-batches", "2"],
            cwd=ROOT, capture_output=True, text=True, timeout=240,
            env=_clean_env(NPROC_PER_NODE="2", METRICS_PORT="", PYTHON=sys.executable, PYTHONPATH=str(ROOT)),
        )

    proc = launch()
    if proc.returncode != 0 and _aborted_after_finishing(proc.stdout, proc.stderr):
        # (seen in CI before the settle fix) Run it once more: a second abort still fails here.
        proc = launch()
    assert proc.returncode == 0, f"{proc.stdout[-2000:]}\n{proc.stderr[:2000]}\n...\n{proc.stderr[-3000:]}"
    assert "pagedopt train: 3 steps on cpu x 2 ranks (fsdp, gloo)" in proc.stdout, proc.stdout
    assert len(re.findall(r"^done: 3/3 steps", proc.stdout, re.M)) == 1, proc.stdout


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid``, parents before children. (By parent links, not by session:
    torchrun starts each worker in a session of its own.)"""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:  # gone meanwhile
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm) state"
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        kids = sorted(children.get(todo.pop(0), []))
        found += kids
        todo += kids
    return found


class _Launch:
    """launch.sh running in a session of its own, its output in files (nothing is lost when the test
    gives up on it, and no pipe can fill up and stall the job while the test waits)."""

    def __init__(self, tmp_path: Path, name: str, args: list[str], env: dict[str, str]) -> None:
        self.out_path, self.err_path = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.proc = subprocess.Popen(["bash", str(LAUNCH), *args], cwd=ROOT, env=env, stdout=out, stderr=err,
                                         start_new_session=True)

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for_output(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.out and self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.fail(f"no {text!r} in the output within {timeout:.0f} s")
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.fail(f"still running {timeout:.0f} s later")

    def fail(self, why: str) -> None:
        """Give up on a launch that hangs, with every Python thread's stack in the report:
        PYTHONFAULTHANDLER makes each process print them on SIGABRT (workers before torchrun,
        which would otherwise kill them first). Then nothing of it is left running."""
        tree = _descendants(self.proc.pid)
        for pid in reversed(tree):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGABRT)
            time.sleep(0.2)
        time.sleep(2.0)
        for pid in [self.proc.pid, *tree]:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()
        pytest.fail(f"launch.sh {why}\n--- stdout (end) ---\n{self.out[-3000:]}\n--- stderr (end) ---\n"
                    f"{self.err[-12000:]}")


@pytest.mark.slow
@pytest.mark.distributed
def test_launch_preemption_checkpoints_exits_0_and_the_same_command_resumes(tmp_path):
    """SIGTERM to launch.sh (what Kubernetes and Slurm's requeue path send) reaches the
    workers as USR1: they finish the step, write one DCP checkpoint and exit 0; running the
    same command again resumes from it."""
    args = ["--device", "cpu", "--steps", "200", "--log-every", "1", "--model-size", "tiny", "--seq-len", "32",
            "--batch-size", "4", "--max-corpus-bytes", "200000", "--eval-batches", "1", "--progress", "lines"]
    env = _clean_env(NPROC_PER_NODE="2", METRICS_PORT="", PYTHON=sys.executable, PYTHONPATH=str(ROOT),
                     CHECKPOINT_DIR=str(tmp_path / "ckpt"), PYTHONFAULTHANDLER="1")
    first = _Launch(tmp_path, "first", args, env)
    first.wait_for_output("step 2/", timeout=240)
    first.proc.send_signal(signal.SIGTERM)
    assert first.wait(timeout=240) == 0, first.err[-3000:]
    match = re.search(r"^pagedopt train: preempted at step (\d+), checkpoint at (\S+)$", first.out, re.M)
    assert match, first.out
    assert "launch.sh: preempted" in first.err
    assert (Path(match.group(2)) / "pagedopt-checkpoint.json").is_file()
    resumed = _Launch(tmp_path, "resumed", [a if a != "200" else str(int(match.group(1)) + 2) for a in args], env)
    returncode = resumed.wait(timeout=240)
    assert returncode == 0 or _aborted_after_finishing(resumed.out, resumed.err), resumed.err[-3000:]
    assert f"(resumed at step {match.group(1)})" in resumed.out, resumed.out


@pytest.mark.parametrize(("restarts", "expected"), [("", "unset"), ("0", "unset"), ("2", "1")])
def test_launch_keeps_restarted_workers_off_torchruns_store(tmp_path, restarts, expected):
    """With MAX_RESTARTS the workers get their own store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE):
    a restarted group sharing torchrun's could read the previous attempt's addresses."""
    python = _stub(tmp_path, "fake-python", 'echo "share-off=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE-unset}"\n')
    env = _clean_env(PYTHON=str(python), **({"MAX_RESTARTS": restarts} if restarts else {}))
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    out = subprocess.run(["bash", str(LAUNCH)], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == f"share-off={expected}"


@pytest.mark.slow
@pytest.mark.distributed
def test_launch_with_restarts_survives_a_killed_worker_and_resumes(tmp_path):
    """A worker killed outright (an OOM kill, a crashed process): torchrun restarts the group
    (MAX_RESTARTS=1), the new workers resume from the last periodic checkpoint and finish."""
    args = ["--device", "cpu", "--steps", "30", "--log-every", "1", "--model-size", "tiny", "--seq-len", "32",
            "--batch-size", "4", "--max-corpus-bytes", "200000", "--eval-batches", "1", "--progress", "lines",
            "--checkpoint-every", "5"]
    env = _clean_env(NPROC_PER_NODE="2", METRICS_PORT="", PYTHON=sys.executable, PYTHONPATH=str(ROOT),
                     CHECKPOINT_DIR=str(tmp_path / "ckpt"), MAX_RESTARTS="1", PYTHONFAULTHANDLER="1")
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)
    job = _Launch(tmp_path, "job", args, env)
    job.wait_for_output("step 12/", timeout=240)
    torchrun = [pid for pid in _descendants(job.proc.pid)
                if b"torch.distributed.run" in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert len(torchrun) == 1, torchrun
    workers = _descendants(torchrun[0])
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)
    returncode = job.wait(timeout=240)
    out = job.out
    assert returncode == 0 or _aborted_after_finishing(out, job.err), job.err[-3000:]
    assert re.search(r"^done: 30/30 steps .*\(resumed at step 10\)", out, re.M), out[-2000:]


SBATCH_OPTIONS = {
    "job-name": r"\S+", "nodes": r"\d+", "ntasks-per-node": r"\d+", "gpus-per-node": r"\d+",
    "cpus-per-task": r"\d+", "time": r"(\d+-)?\d{1,2}:\d{2}:\d{2}", "output": r"\S+",
    "signal": r"(B:)?\w+@\d+", "requeue": r"", "open-mode": r"append|truncate",
}


def _sbatch_directives() -> dict[str, str]:
    found = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH"):
            match = re.fullmatch(r"#SBATCH --([a-z-]+)(?:=(\S+))?", line.strip())
            assert match, f"malformed directive: {line!r}"
            found[match.group(1)] = match.group(2) or ""
    return found


def test_sbatch_directives():
    directives = _sbatch_directives()
    for key, value in directives.items():
        assert key in SBATCH_OPTIONS, f"unexpected #SBATCH option --{key}"
        assert re.fullmatch(SBATCH_OPTIONS[key], value), f"--{key}={value}"
    assert directives["ntasks-per-node"] == "1", "one torchrun per node; it starts the GPU workers"
    # Directives must come before the first command, or Slurm ignores them.
    lines = SBATCH.read_text().splitlines()
    last_directive = max(i for i, l in enumerate(lines) if l.startswith("#SBATCH"))
    first_command = min(i for i, l in enumerate(lines) if l.strip() and not l.startswith("#"))
    assert last_directive < first_command


def test_sbatch_starts_one_launcher_per_node(tmp_path):
    """With stand-in scontrol/srun: the rendezvous is on the first node and launch.sh gets the
    allocation's shape."""
    _stub(tmp_path, "scontrol", 'printf "gpu-a17\\ngpu-a18\\n"\n')
    settings = "^(MASTER_|NNODES|NPROC|RUN_ID|METRICS_|DISTRIBUTED)"
    _stub(tmp_path, "srun", f'printf "%s\\n" "$@"; env | grep -E "{settings}" | sort\n')
    env = _clean_env(
        PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_NODELIST="gpu-a[17-18]",
        SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8", SLURM_JOB_ID="4242", SLURM_CPUS_PER_TASK="64",
        SLURM_SUBMIT_DIR=str(ROOT),
    )
    out = subprocess.run(["bash", str(SBATCH), "--steps", "10"], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == "pagedopt: 2 nodes x 8 workers, rendezvous gpu-a17:29500 (run 4242)"
    assert out[1:7] == ["--kill-on-bad-exit=1", "--ntasks-per-node=1", "bash",
                       f"{ROOT}/deploy/torchrun/launch.sh", "--steps", "10"], out
    for line in ("MASTER_ADDR=gpu-a17", "MASTER_PORT=29500", "NNODES=2", "NPROC_PER_NODE=8",
                 "RUN_ID=4242", "METRICS_PORT=9460", "METRICS_ADDR=0.0.0.0", "DISTRIBUTED=fsdp"):
        assert line in out, (line, out)
    # What launch.sh then runs on each node, with the settings the batch script exported.
    exported = dict(line.split("=", 1) for line in out if re.match(r"^[A-Z_]+=", line))
    argv = _launch_argv(tmp_path, *out[5:7], **exported)
    args = parse_train_command(argv)
    assert (args.distributed, args.metrics_port, args.metrics_addr, args.steps) == ("fsdp", 9460, "0.0.0.0", 10)


# --- Kubernetes manifests --------------------------------------------------------------------------

# A schema of the fields these manifests use (Kubernetes 1.28+ API, Prometheus Operator v1):
# allowed keys and their types. "*" maps any key (labels); a list holds the item schema.
STR, INT, BOOL = str, int, bool
LABELS = {"*": STR}
METADATA = {"name": STR, "namespace": STR, "labels": LABELS, "annotations": LABELS}
PORT = {"name": STR, "containerPort": INT, "protocol": STR}
ENV = {"name": STR, "value": STR}
MOUNT = {"name": STR, "mountPath": STR, "readOnly": BOOL}
CONTAINER = {
    "name": STR, "image": STR, "command": [STR], "args": [STR], "env": [ENV], "ports": [PORT],
    "resources": {"limits": {"*": (STR, INT)}, "requests": {"*": (STR, INT)}}, "volumeMounts": [MOUNT],
    "workingDir": STR, "imagePullPolicy": STR,
}
VOLUME = {
    "name": STR, "emptyDir": {"medium": STR, "sizeLimit": STR},
    "persistentVolumeClaim": {"claimName": STR, "readOnly": BOOL},
}
POD_SPEC = {
    "subdomain": STR, "hostname": STR, "restartPolicy": STR, "containers": [CONTAINER], "volumes": [VOLUME],
    "nodeSelector": LABELS, "serviceAccountName": STR, "terminationGracePeriodSeconds": INT,
}
SCHEMAS = {
    ("v1", "Service"): {
        "apiVersion": STR, "kind": STR, "metadata": METADATA,
        "spec": {
            "clusterIP": STR, "publishNotReadyAddresses": BOOL, "selector": LABELS,
            "ports": [{"name": STR, "port": INT, "targetPort": (INT, STR), "protocol": STR}],
        },
    },
    ("batch/v1", "Job"): {
        "apiVersion": STR, "kind": STR, "metadata": METADATA,
        "spec": {
            "completionMode": STR, "completions": INT, "parallelism": INT, "backoffLimit": INT,
            "backoffLimitPerIndex": INT, "ttlSecondsAfterFinished": INT,
            "podFailurePolicy": {"rules": [{"action": STR, "onPodConditions": [{"type": STR, "status": STR}],
                                            "onExitCodes": {"containerName": STR, "operator": STR, "values": [INT]}}]},
            "template": {"metadata": METADATA, "spec": POD_SPEC},
        },
    },
    ("monitoring.coreos.com/v1", "PodMonitor"): {
        "apiVersion": STR, "kind": STR, "metadata": METADATA,
        "spec": {
            "selector": {"matchLabels": LABELS},
            "podMetricsEndpoints": [{
                "port": STR, "path": STR, "interval": STR, "scrapeTimeout": STR,
                "relabelings": [{"sourceLabels": [STR], "targetLabel": STR, "replacement": STR,
                                 "action": STR, "regex": STR, "separator": STR}],
            }],
        },
    },
    ("kustomize.config.k8s.io/v1beta1", "Kustomization"): {
        "apiVersion": STR, "kind": STR, "resources": [STR],
    },
}


def _check(value, schema, where: str) -> list[str]:
    """Errors of ``value`` against ``schema`` (see SCHEMAS)."""
    if isinstance(schema, list):
        if not isinstance(value, list):
            return [f"{where}: expected a list, got {type(value).__name__}"]
        return [e for i, item in enumerate(value) for e in _check(item, schema[0], f"{where}[{i}]")]
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return [f"{where}: expected a mapping, got {type(value).__name__}"]
        errors = []
        for key, item in value.items():
            sub = schema.get(key, schema.get("*"))
            if sub is None:
                errors.append(f"{where}.{key}: unknown field")
            else:
                errors += _check(item, sub, f"{where}.{key}")
        return errors
    types = schema if isinstance(schema, tuple) else (schema,)
    if isinstance(value, bool) and bool not in types:
        return [f"{where}: expected {types}, got a boolean"]
    return [] if isinstance(value, types) else [f"{where}: expected {types}, got {type(value).__name__}"]


def _manifests() -> dict[str, dict]:
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs[doc["kind"]] = doc
    return docs


def test_manifests_parse_and_match_the_schema():
    docs = _manifests()
    assert set(docs) == {"Service", "Job", "PodMonitor", "Kustomization"}
    for kind, doc in docs.items():
        schema = SCHEMAS.get((doc["apiVersion"], kind))
        assert schema is not None, f"{kind}: unexpected apiVersion {doc['apiVersion']}"
        assert _check(doc, schema, kind) == []
    listed = set(docs["Kustomization"]["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_schema_check_catches_mistakes():
    job = _manifests()["Job"]
    bad = yaml.safe_load(yaml.safe_dump(job).replace("completionMode", "completionMod"))
    assert any("completionMod: unknown field" in e for e in _check(bad, SCHEMAS[("batch/v1", "Job")], "Job"))
    bad = yaml.safe_load(yaml.safe_dump(job).replace("containerPort: 9461", "containerPort: '9461'"))
    assert any("containerPort: expected" in e for e in _check(bad, SCHEMAS[("batch/v1", "Job")], "Job"))


def _torchrun_flags(container: dict) -> dict[str, str]:
    script = " ".join(container["command"] + container["args"])
    return dict(re.findall(r"--([a-z-]+)[= ]([^\s-][^\s]*)", script))


def test_job_service_and_podmonitor_fit_together():
    docs = _manifests()
    service, job, monitor = docs["Service"], docs["Job"], docs["PodMonitor"]
    spec, pod = job["spec"], job["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    flags = _torchrun_flags(container)
    script = " ".join(container["args"])

    # One pod per node, all started together, each knowing its node rank.
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(flags["nnodes"])
    assert flags["node-rank"] == '"${JOB_COMPLETION_INDEX}"' and container["command"][:2] == ["bash", "-c"]
    assert pod["spec"]["restartPolicy"] in ("Never", "OnFailure")

    # Rendezvous: pod 0's DNS name through the headless Service.
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert flags["master-addr"] == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert set(service["spec"]["selector"].items()) <= set(pod_labels.items())
    assert int(flags["master-port"]) in {p["port"] for p in service["spec"]["ports"]}

    # The main job, with one metrics endpoint per local rank, reachable from Prometheus.
    assert "-m pagedopt train" in script and flags["distributed"] in ("fsdp", "ddp")
    args = parse_train_command(shlex.split(script))
    assert (args.distributed, args.metrics_port, args.metrics_addr) == (flags["distributed"], METRICS_BASE, "0.0.0.0")
    assert flags["metrics-port"] == str(METRICS_BASE) and flags["metrics-addr"] == "0.0.0.0"
    nproc = int(flags["nproc-per-node"])
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) == nproc
    metrics = {p["name"]: p["containerPort"] for p in container["ports"] if p["name"].startswith("metrics-")}
    assert metrics == {f"metrics-{r}": METRICS_BASE + r for r in range(nproc)}

    # The PodMonitor selects these pods and scrapes exactly those ports.
    assert set(monitor["spec"]["selector"]["matchLabels"].items()) <= set(pod_labels.items())
    endpoints = monitor["spec"]["podMetricsEndpoints"]
    assert sorted(e["port"] for e in endpoints) == sorted(metrics)
    for endpoint in endpoints:
        rank = endpoint["port"].split("-")[1]
        assert {"targetLabel": "local_rank", "replacement": rank, "action": "replace"} in endpoint["relabelings"]

    # Every mounted volume exists.
    volumes = {v["name"] for v in pod["spec"]["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} <= volumes


def test_kustomize_builds():
    if not shutil.which("kubectl"):
        pytest.skip("kubectl is not installed (the structural checks above still ran)")
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, check=True).stdout
    kinds = [doc["kind"] for doc in yaml.safe_load_all(out) if doc]
    assert sorted(kinds) == ["Job", "PodMonitor", "Service"]
