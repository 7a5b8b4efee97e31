"""A real Prometheus (Debian's package) scrapes a live Kiln with
deploy/prometheus/rules.yml loaded; traffic with one feature tripled must
make KilnDriftAlert fire through Prometheus's own API, and then every
Grafana panel's query (deploy/grafana/kiln.json) and every Prometheus
adapter rule (deploy/k8s/monitoring/adapter-rules.yaml) must return data.

Run by scripts/test-deploy.sh against `kiln serve --repo DIR` started by
scripts/with-server.sh ($KILN_URL, $KILN_METRICS_URL), where DIR holds the
risk model with drift judged every half second. Bounded: it stops itself
after at most three minutes whatever happens.
"""

import csv
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np
import tritonclient.grpc as grpcclient
import yaml
from tritonclient.utils import InferenceServerException

ROOT = pathlib.Path(__file__).resolve().parents[2]
KILN = os.environ.get("KILN_BIN", str(ROOT / "target/debug/kiln"))
URL = os.environ["KILN_URL"]
METRICS = urllib.parse.urlparse(os.environ["KILN_METRICS_URL"])
DEADLINE = time.monotonic() + 180
# area_mean, the feature the drift test in tests/drift.rs scales too.
SCALED = "area_mean"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prometheus_config(folder):
    """A static target standing in for the PodMonitor: the same namespace
    and pod labels the adapter rules select by."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "deploy/prometheus/rules.yml")],
        "scrape_configs": [
            {
                "job_name": "kiln",
                "scheme": METRICS.scheme,
                "static_configs": [{"targets": [METRICS.netloc], "labels": {"namespace": "kiln", "pod": "kiln-0"}}],
            }
        ],
    }
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def api(base, path, **params):
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]


def wait_for(what, check, every=1.0):
    while time.monotonic() < DEADLINE:
        result = check()
        if result:
            return result
        time.sleep(every)
    sys.exit(f"FAIL: {what}: not seen before the deadline")


def drifted_rows(folder):
    """The training rows with area_mean tripled."""
    with open(ROOT / "data/wdbc-train.csv") as f:
        rows = list(csv.reader(f))
    header, rows = rows[0][:30], rows[1:]
    column = header.index(SCALED)
    path = folder / "drifted.csv"
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for row in rows:
            values = [float(v) for v in row[:30]]
            values[column] *= 3
            out.writerow(values)
    return path


def errors_and_refusals():
    """A few answers that are not OK, so the error and refusal panels have
    something to show: a wrong shape, and deadlines too short to meet."""
    client = grpcclient.InferenceServerClient(url=URL)
    bad = grpcclient.InferInput("features", [1, 29], "FP32")
    bad.set_data_from_numpy(np.ones((1, 29), dtype=np.float32))
    with open(ROOT / "data/wdbc-train.csv") as f:
        row = [float(v) for v in list(csv.reader(f))[1][:30]]
    short = grpcclient.InferInput("features", [1, 30], "FP32")
    short.set_data_from_numpy(np.array([row], dtype=np.float32))
    codes = set()
    for _ in range(20):
        # tritonclient sends `timeout` (microseconds) as the V2 parameter.
        for inputs, timeout in (([bad], None), ([short], 1)):
            try:
                client.infer("risk", inputs, timeout=timeout)
                codes.add("OK")
            except InferenceServerException as e:
                codes.add(e.status())
    return codes


def dashboard_queries():
    """(panel title, query) for every target, with Grafana's variables
    given the values "All" gives them."""
    dashboard = json.loads((ROOT / "deploy/grafana/kiln.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in (("$__rate_interval", "30s"), ("$job", ".+"), ("$model", ".+")):
                expr = expr.replace(name, value)
            yield panel["title"], expr


def adapter_queries():
    rules = yaml.safe_load((ROOT / "deploy/k8s/monitoring/adapter-rules.yaml").read_text())["rules"]
    for rule in rules:
        series = rule["seriesQuery"].split("{")[0]
        expr = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="kiln",pod=~"kiln-0"')
            .replace("<<.GroupBy>>", "pod")
        )
        yield rule["name"]["as"], expr


def main():
    prometheus = shutil.which("prometheus")
    assert prometheus, "prometheus not installed: scripts/deploy-env.sh installs Debian's package"
    folder = pathlib.Path(tempfile.mkdtemp(prefix="kiln-prometheus-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = open(folder / "prometheus.log", "w")
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={prometheus_config(folder)}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--web.enable-lifecycle",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    load = None
    try:
        def ready():
            try:
                return urllib.request.urlopen(f"{base}/-/ready", timeout=1).status == 200
            except OSError:
                return False

        wait_for("Prometheus ready", ready, 0.2)
        wait_for("Kiln scraped (up == 1)", lambda: api(base, "/api/v1/query", query='up{job="kiln"} == 1')["result"])
        started = time.monotonic()
        load = subprocess.Popen(
            [KILN, "bench", "--url", URL, "--model", "risk", "--rate", "200", "--duration", "170",
             "--input-file", str(drifted_rows(folder))],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        codes = errors_and_refusals()
        assert "INVALID_ARGUMENT" in str(codes) and "DEADLINE_EXCEEDED" in str(codes), codes

        def drift_alert():
            alerts = api(base, "/api/v1/alerts")["alerts"]
            return [a for a in alerts if a["labels"].get("alertname") == "KilnDriftAlert" and a["state"] == "firing"]

        firing = wait_for("KilnDriftAlert firing", drift_alert)
        features = sorted(a["labels"]["feature"] for a in firing)
        assert SCALED in features, f"the alert fired for {features}, not {SCALED}"
        print(f"ok   KilnDriftAlert firing for {SCALED} {time.monotonic() - started:.0f} s after drifted traffic began "
              f"(features alerting: {', '.join(features)})")
        for alert in api(base, "/api/v1/alerts")["alerts"]:
            if alert["labels"]["alertname"] != "KilnDriftAlert":
                sys.exit(f"FAIL: {alert['labels']['alertname']} fired too: {alert}")

        # Rates need two scrapes of traffic with every code in the window.
        time.sleep(3)
        failed = []
        for source, queries in (("dashboard", dashboard_queries()), ("adapter", adapter_queries())):
            for title, expr in queries:
                result = api(base, "/api/v1/query", query=expr)["result"]
                print(f"{'ok  ' if result else 'FAIL'} {source}: {title}: {len(result)} series")
                if not result:
                    failed.append(f"{source} {title}: {expr}")
        if failed:
            sys.exit("FAIL: no data for:\n  " + "\n  ".join(failed))
    finally:
        if load:
            load.terminate()
            load.wait()
        server.terminate()
        server.wait(timeout=30)
        log.close()
        if sys.exc_info()[0] is not None:
            print((folder / "prometheus.log").read_text()[-4000:], file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
