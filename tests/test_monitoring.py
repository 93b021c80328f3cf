"""monitoring/ and deploy/compose/: the Grafana dashboard, provisioning, Prometheus
configuration and rules (checked and unit-tested with promtool), the compose file - and a
real Prometheus server scraping a real ``pagedopt train`` run, evaluating every PromQL
expression of the dashboard and of the rules through its HTTP API.

The Prometheus tests need the ``prometheus``/``promtool`` binaries (Debian package
``prometheus``; ``.ci/run`` installs it) and skip with that reason where they are absent.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from pagedopt.telemetry.metrics import METRICS

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "pagedopt.json"
RULES = MONITORING / "prometheus" / "rules" / "pagedopt.rules.yml"
PROM_CONFIG = MONITORING / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool not found: install the Debian package 'prometheus'")
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None,
                                      reason="prometheus not found: install the Debian package 'prometheus'")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def panels(dash: dict) -> list[dict]:
    out = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_exprs(dash: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query of every panel."""
    return [(p["title"], t["expr"]) for p in panels(dash) for t in p.get("targets", [])]


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


# --- PromQL helpers ----------------------------------------------------------------------------------

_IDENT = re.compile(r"[A-Za-z0-9_:]")
_KEYWORDS = ("and", "or", "unless")
_COMPARISONS = ("==", "!=", ">=", "<=", ">", "<")


def _skip_modifiers(expr: str, i: int) -> int:
    """Skip ``bool``, ``on(...)``/``ignoring(...)``, ``group_left(...)``/``group_right(...)``."""
    while True:
        while i < len(expr) and expr[i].isspace():
            i += 1
        m = re.match(r"(bool|on|ignoring|group_left|group_right)\b", expr[i:])
        if not m:
            return i
        i += m.end()
        while i < len(expr) and expr[i].isspace():
            i += 1
        if i < len(expr) and expr[i] == "(":
            i = expr.index(")", i) + 1


def promql_operands(expr: str) -> list[str]:
    """The operands of an expression's top-level comparisons and set operators (``and``,
    ``or``, ``unless``), without number literals: each must return series on its own."""
    parts, depth, start, i, quote = [], 0, 0, 0, None
    while i < len(expr):
        c = expr[i]
        if quote:
            if c == "\\":
                i += 2
                continue
            if c == quote:
                quote = None
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = next((o for o in _COMPARISONS if expr.startswith(o, i)), None)
            if op is None:
                op = next((k for k in _KEYWORDS if expr.startswith(k, i)
                           and (i == 0 or not _IDENT.match(expr[i - 1]))
                           and (i + len(k) >= len(expr) or not _IDENT.match(expr[i + len(k)]))), None)
            if op is not None:
                parts.append(expr[start:i])
                i = _skip_modifiers(expr, i + len(op))
                start = i
                continue
        i += 1
    parts.append(expr[start:])
    return [p.strip() for p in parts if p.strip() and not re.fullmatch(r"[-+0-9.eE ]+", p.strip())]


def test_promql_operands_helper():
    assert promql_operands('(time() - a{x="y>1"}) > 600 and on (run, rank) b == 1') == [
        '(time() - a{x="y>1"})', "b"]
    assert promql_operands("x:y:rate5m > 0.5\nand\nx:y:rate5m > 3 * z") == ["x:y:rate5m", "x:y:rate5m", "3 * z"]
    assert promql_operands('sum(rate(pagedopt_page_transfers_total{reason!="or"}[5m])) or vector(0)') == [
        'sum(rate(pagedopt_page_transfers_total{reason!="or"}[5m]))', "vector(0)"]


def substitute(expr: str, run: str) -> str:
    """Grafana's variables, as Grafana would expand them with rank and group set to All."""
    for name, value in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "5m"),
                        ("$run", run), ("$rank", ".*"), ("$group", ".*")):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


def metric_names(expr: str) -> set[str]:
    names = set(re.findall(r"\b(pagedopt_[a-z0-9_]+|pagedopt:[a-z0-9_:]+|DCGM_[A-Z_]+)", expr))
    return names


def exposed_names() -> set[str]:
    names = set()
    for m in METRICS:
        names.add(m.name)
        if m.type == "histogram":
            names |= {m.name + s for s in ("_bucket", "_sum", "_count")}
    return names


# --- static checks of the dashboard, provisioning, rules and compose file -----------------------------


def test_dashboard_structure():
    dash = dashboard()
    assert dash["uid"] == "pagedopt-training"  # stable: links and provisioning rely on it
    assert "__inputs" not in dash and isinstance(dash["schemaVersion"], int) and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert list(variables) == ["datasource", "run", "rank", "group"]
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name in ("run", "rank", "group"):
        v = variables[name]
        assert v["type"] == "query" and v["datasource"]["uid"] == "${datasource}"
        assert v["query"]["query"].startswith("label_values(") and v["query"]["query"].endswith(f", {name})")
    assert variables["rank"]["includeAll"] and variables["rank"]["allValue"] == ".*"
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids))
    occupied = set()
    for p in panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & occupied, f"panel {p['title']!r} overlaps another"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert p.get("description"), p["title"]
        assert p["targets"] and all(t["expr"].strip() and t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        for t in p["targets"]:
            assert 'run="$run"' in t["expr"] and 'rank=~"$rank"' in t["expr"], (p["title"], t["expr"])
    titles = " | ".join(p["title"].lower() for p in panels(dash))
    for topic in ("state by residency", "gpu memory", "page transfer rate", "prefetch latency", "step time",
                  "gradient norm and clip threshold", "clipped updates", "quantization error"):
        assert topic in titles, topic


def test_dashboard_and_rules_use_only_exported_metrics():
    known = exposed_names() | {r["record"] for r in rules() if "record" in r} | {"DCGM_FI_DEV_FB_USED"}
    for title, expr in dashboard_exprs(dashboard()):
        assert metric_names(expr) <= known, (title, metric_names(expr) - known)
    for rule in rules():
        assert metric_names(rule["expr"]) <= known, (rule.get("alert") or rule.get("record"))
    alerts = {r["alert"] for r in rules() if "alert" in r}
    assert {"PagedoptStatePagingStorm", "PagedoptPrefetchStalls", "PagedoptClipRateSpike",
            "PagedoptTrainingStalled"} <= alerts


def test_monitoring_readme_lists_every_metric():
    from pagedopt.telemetry.metrics import markdown_table

    assert markdown_table() in (MONITORING / "README.md").read_text()


def test_grafana_provisioning_matches_the_dashboard_location():
    datasources = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"].startswith("http") and ds["isDefault"]
    providers = yaml.safe_load((MONITORING / "grafana/provisioning/dashboards/pagedopt.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = {m.split(":")[1]: m.split(":")[0] for m in compose["services"]["grafana"]["volumes"]}
    source = mounts[provider["options"]["path"]]
    assert (COMPOSE.parent / source).resolve() == DASHBOARD.parent


def test_prometheus_targets_files():
    for path in (MONITORING / "prometheus/targets").glob("*.yml"):
        for group in yaml.safe_load(path.read_text()):
            assert set(group) <= {"targets", "labels"} and group["targets"]
            for target in group["targets"]:
                host, port = target.rsplit(":", 1)
                assert host and 0 < int(port) < 65536
    config = yaml.safe_load(PROM_CONFIG.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "pagedopt")
    assert job["honor_labels"] is True  # keep the exporter's run/rank labels


_COMPOSE_TOP = {"name", "services", "volumes", "networks", "configs", "secrets"}
_SERVICE_KEYS = {"image", "build", "command", "entrypoint", "environment", "ports", "expose", "volumes",
                 "depends_on", "restart", "deploy", "healthcheck", "networks", "labels", "user", "working_dir",
                 "shm_size", "ipc", "env_file"}


def test_compose_file_is_well_formed_and_wired():
    compose = yaml.safe_load(COMPOSE.read_text())
    assert set(compose) <= _COMPOSE_TOP | {k for k in compose if k.startswith("x-")}
    services = compose["services"]
    assert set(services) == {"trainer", "prometheus", "grafana"}
    named_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        assert set(svc) <= _SERVICE_KEYS, (name, set(svc) - _SERVICE_KEYS)
        assert ("image" in svc) != ("build" in svc), name
        if "build" in svc:
            context = (COMPOSE.parent / svc["build"]["context"]).resolve()
            assert (context / svc["build"]["dockerfile"]).is_file()
        for dep in svc.get("depends_on", []):
            assert dep in services
        for port in svc.get("ports", []):
            assert re.fullmatch(r"(\d+\.\d+\.\d+\.\d+:)?\d+:\d+", port), port
        for env in (svc.get("environment") or {}).values():
            assert isinstance(env, str), (name, env)  # compose needs strings: quote booleans/numbers
        for volume in svc.get("volumes", []):
            source, target = volume.split(":")[:2]
            assert target.startswith("/")
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), volume
            else:
                assert source in named_volumes, volume
    # Prometheus gets the repository's config and rules, and targets that name the trainer.
    prom = services["prometheus"]
    mounts = {v.split(":")[1]: (COMPOSE.parent / v.split(":")[0]).resolve() for v in prom["volumes"]
              if v.startswith(".")}
    config_path = next(a.split("=", 1)[1] for a in prom["command"] if a.startswith("--config.file="))
    assert mounts[config_path] == PROM_CONFIG
    assert mounts["/etc/prometheus/rules"] == RULES.parent
    command = services["trainer"]["command"]
    port = command[command.index("--metrics-port") + 1]
    assert command[command.index("--metrics-addr") + 1] == "0.0.0.0"  # reachable from the prometheus container
    targets = [t for path in mounts["/etc/prometheus/targets"].glob("pagedopt*.yml")
               for group in yaml.safe_load(path.read_text()) for t in group["targets"]]
    assert targets == [f"trainer:{port}"]
    # Once `pagedopt train` exists, its parser must accept the compose command.
    import importlib.util

    if importlib.util.find_spec("pagedopt.commands.train") is None:
        return
    from pagedopt.cli import build_parser

    try:
        args = build_parser().parse_args(command[1:])
    except SystemExit:
        pytest.fail(f"`pagedopt train` rejects the compose command {command}")
    assert args.metrics_port == int(port) and args.linger == 3600


# --- promtool -----------------------------------------------------------------------------------


def run_promtool(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=timeout)


@needs_promtool
def test_promtool_checks_config_and_rules_and_runs_rule_unit_tests():
    for args in (("check", "config", str(PROM_CONFIG)), ("check", "rules", str(RULES)),
                 ("test", "rules", str(MONITORING / "prometheus/tests/pagedopt.rules.test.yml"))):
        result = run_promtool(*args)
        assert result.returncode == 0, (args, result.stdout, result.stderr)


@needs_promtool
def test_dashboard_gpu_memory_join_with_dcgm(tmp_path):
    """The GPU-memory query joins dcgm-exporter's framebuffer usage (MiB) to ranks through
    pagedopt_device_info's UUID, and falls back to torch's memory for ranks without DCGM."""
    (expr,) = [e for title, e in dashboard_exprs(dashboard()) if "DCGM_FI_DEV_FB_USED" in e]
    test = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": 'DCGM_FI_DEV_FB_USED{gpu="0",UUID="GPU-aaa",Hostname="n1"}', "values": "2048x5"},
                {"series": 'DCGM_FI_DEV_FB_USED{gpu="1",UUID="GPU-bbb",Hostname="n1"}', "values": "100x5"},
                {"series": 'pagedopt_device_info{run="r1",rank="0",local_rank="0",device="cuda:0",gpu="0",'
                           'UUID="GPU-aaa",model_name="H100"}', "values": "1x5"},
                {"series": 'pagedopt_device_memory_used_bytes{run="r1",rank="0"}', "values": "5x5"},
                {"series": 'pagedopt_device_info{run="r1",rank="1",local_rank="1",device="cpu",gpu="",'
                           'UUID="",model_name="x86_64"}', "values": "1x5"},
                {"series": 'pagedopt_device_memory_used_bytes{run="r1",rank="1"}', "values": "7x5"},
            ],
            "promql_expr_test": [{
                "expr": substitute(expr, "r1"),
                "eval_time": "2m",
                "exp_samples": [
                    {"labels": '{Hostname="n1",UUID="GPU-aaa",gpu="0",run="r1",rank="0"}', "value": 2048 * 2 ** 20},
                    {"labels": 'pagedopt_device_memory_used_bytes{run="r1",rank="1"}', "value": 7},
                ],
            }],
        }],
    }
    path = tmp_path / "dcgm.test.yml"
    path.write_text(yaml.safe_dump(test))
    result = run_promtool("test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- a real Prometheus scraping a real training run -------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusAPI:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params) -> dict:
        url = f"{self.base}{path}?{urllib.parse.urlencode(params, doseq=True)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list:
        return self.get("/api/v1/query", query=expr)["result"]

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, OSError):
            return False


def wait_for(predicate, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                out = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"{proc.args[0]} exited with {proc.returncode} while waiting for {what}:\n{out}")
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def render_config(tmp_path: Path, metrics_port: int) -> Path:
    """monitoring/prometheus/prometheus.yml with 1 s intervals, the rules by absolute path and
    the test's training run as the only pagedopt target."""
    config = yaml.safe_load(PROM_CONFIG.read_text())
    config["global"].update(scrape_interval=SCRAPE_INTERVAL, evaluation_interval=SCRAPE_INTERVAL)
    config["rule_files"] = [str(RULES.parent / Path(p).name) for p in config["rule_files"]]
    targets = tmp_path / "targets"
    targets.mkdir()
    for job in config["scrape_configs"]:
        job["scrape_interval"], job["scrape_timeout"] = SCRAPE_INTERVAL, SCRAPE_INTERVAL
        for sd in job.get("file_sd_configs", []):
            sd["files"] = [str(targets / Path(f).name) for f in sd["files"]]
    (targets / "pagedopt.yml").write_text(yaml.safe_dump([{"targets": [f"127.0.0.1:{metrics_port}"],
                                                          "labels": {"node": "test"}}]))
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)


# The training run Prometheus scrapes: the main job on the tiny model. The dashboard's rates
# are finite only if Prometheus scrapes several times while training runs, so scrapes are
# 250 ms apart and the run has 1000 steps (about 5 s of training with the native kernels on
# two cores, longer on the reference path); the quantization-error probe samples every 50.
SCRAPE_INTERVAL = "250ms"
TRAIN_STEPS = 1000
TRAIN_COMMAND = ["-m", "pagedopt", "train", "--steps", str(TRAIN_STEPS), "--model-size", "tiny", "--seq-len", "64",
                 "--batch-size", "8", "--max-corpus-bytes", "400000", "--eval-batches", "2", "--threads", "1",
                 "--progress", "lines"]


@pytest.mark.slow
@needs_prometheus
@needs_promtool
def test_real_prometheus_scrapes_a_training_run(tmp_path):
    run = "itest"
    metrics_port, prom_port = free_port(), free_port()
    summary_path = tmp_path / "summary.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PAGEDOPT_RUN=run)
    # Paged state on the simulated device with half of it under the budget and a memory
    # controller, so the paging, memory-controller and thrashing panels have data too.
    paged_config = tmp_path / "paged.yaml"
    paged_config.write_text(yaml.safe_dump({
        "optimizer": {"name": "AdamW8bit"},
        "paging": {"policy": "budgeted", "backend": "simulated", "simulated_capacity_bytes": "64MiB",
                   "device_budget_bytes": "96KiB", "min_paged_numel": 4096, "prefetch_depth": 1},
        "memory": {"target_free_bytes": "1MiB", "max_budget_bytes": "96KiB"},
    }))
    command = [sys.executable, *TRAIN_COMMAND, "--metrics-port", str(metrics_port), "--linger", "300",
               "--json", str(summary_path), "--config", str(paged_config)]
    steps_asked = int(command[command.index("--steps") + 1])
    config = render_config(tmp_path, metrics_port)
    check = run_promtool("check", "config", str(config))
    assert check.returncode == 0, check.stdout + check.stderr
    prometheus = subprocess.Popen(
        ["prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{prom_port}", "--log.level=warn"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    api = PrometheusAPI(prom_port)
    trainer = None
    try:
        wait_for(api.ready, 60, "Prometheus to be ready", [prometheus])
        # Prometheus first, so it scrapes while training runs.
        trainer = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True)
        # The trainer lingers after training; its last values say training has ended.
        wait_for(lambda: api.query(f'pagedopt_training_active{{run="{run}"}} == 0'), 240,
                 "a scrape after the end of training", [trainer, prometheus])
        wait_for(lambda: api.query("pagedopt:clipped_update_fraction:rate5m"), 60,
                 "the recording rules", [trainer, prometheus])

        # End-to-end values: what Prometheus stored is what the training process measured
        # (its --json summary is written before the final metrics are published).
        summary = json.loads(summary_path.read_text())
        assert summary["steps_completed"] == steps_asked
        (steps,) = api.query(f'pagedopt_steps_total{{run="{run}"}}')
        assert float(steps["value"][1]) == steps_asked
        assert steps["metric"]["job"] == "pagedopt" and steps["metric"]["rank"] == "0"
        (state,) = api.query(f'sum(pagedopt_state_bytes{{run="{run}"}})')
        assert float(state["value"][1]) == sum(summary["optimizer_state"]["bytes_by_precision"].values())
        # Percentile clipping is on in the default configuration, so its series are live.
        (threshold,) = api.query(f'max(pagedopt_clip_threshold{{run="{run}"}})')
        assert float(threshold["value"][1]) > 0

        # Every dashboard query returns data.
        dash = dashboard()
        results = {(title, expr): api.query(substitute(expr, run)) for title, expr in dashboard_exprs(dash)}
        empty = [key for key, result in results.items() if not result]
        assert not empty, "dashboard queries without data:\n" + "\n".join(f"{t}: {e}" for t, e in empty)
        # ... and finite numbers, except prefetch-latency quantiles while nothing is paged
        # (no prefetch observed: histogram_quantile of empty buckets is NaN).
        paged = api.query(f'pagedopt_run_info{{run="{run}", paging_policy!="none"}}')
        not_finite = [key for key, result in results.items()
                      if not all(math.isfinite(float(r["value"][1])) for r in result)
                      and (paged or "prefetch_latency" not in key[1])]
        assert not not_finite, not_finite
        # Every template variable has values (the run is among them).
        for v in dash["templating"]["list"]:
            if v["type"] != "query":
                continue
            m = re.fullmatch(r"label_values\((.*), (\w+)\)", substitute(v["query"]["query"], run))
            found = api.get(f"/api/v1/label/{m.group(2)}/values", **{"match[]": m.group(1)})
            assert found, v["name"]
            if v["name"] == "run":
                assert run in found

        # Every rule loaded and evaluates cleanly; every operand of every rule returns data.
        groups = api.get("/api/v1/rules")["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        assert len(loaded) == len(rules())
        assert all(r["health"] == "ok" and not r.get("lastError") for r in loaded), loaded
        missing = []
        for rule in rules():
            exprs = [rule["expr"]] if "record" in rule else promql_operands(rule["expr"])
            missing += [(rule.get("alert") or rule["record"], e) for e in exprs if not api.query(e)]
        assert not missing, "rule expressions without data:\n" + "\n".join(f"{n}: {e}" for n, e in missing)
    finally:
        if trainer is not None:
            stop(trainer)  # SIGTERM ends the linger; training itself has finished
        stop(prometheus)
    assert trainer.returncode == 0, trainer.stdout.read()
