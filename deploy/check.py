"""Build the images, bring the compose stack up, check it through the containers, then take it all down.

python -m deploy.check               # from the repository root, with the project's venv (`make docker-test`)
python -m deploy.check --keep        # leave the stack (and the engine) running afterwards, and print its URLs
python -m deploy.check --no-build    # use the images as they are

Runs ../shared/docker/standins.sh where it exists (engine and stand-in base images; needs root). Without a Docker
engine it skips with exit 0, or fails where RAC_REQUIRE_DOCKER=1. The stack runs as compose project "raccheck" on
the ports in deploy/local.env with a quick artifact build; an engine this script started, it stops again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import tritonclient.grpc as tg
import tritonclient.http as th
from tritonclient.utils import InferenceServerException

from deploy.engine import (
    COMPOSE_ENV,
    COMPOSE_FILES,
    PROJECT,
    ROOT,
    T0,
    StepError,
    compose,
    compose_cli,
    docker,
    engine_answers,
    sh,
    start_engine,
    step,
    stop_engine,
    torch_wheel,
    wait_for,
)
from loadtests.server import serving
from service.auth import add_key

API_IMAGE, JOB_IMAGE = "rac:latest", "rac-artifact-job:latest"  # the `image:` names in docker-compose.yml
ARTIFACTS = "/artifacts/demo"  # RAC_ARTIFACTS in the image
TOLERANCE = 1e-4  # probabilities: Docker vs a local server on the same artifacts vs the build's own predictions
BATCHED = 1e-5  # probabilities: the same image's answer from a batch of other images (float32 sums reordered)
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
}


class Results:
    def __init__(self) -> None:
        self.checks: list[tuple[str, bool, str]] = []

    def record(self, name: str, ok: bool, detail: str = "") -> bool:
        self.checks.append((name, ok, detail))
        print(f"          {'PASS' if ok else 'FAIL'}  {name}" + (f": {detail}" if detail else ""), flush=True)
        return ok


def build_images(results: Results) -> None:
    cas = (os.environ.get("PIP_CERT"), "/etc/ssl/certs/ca-certificates.crt")  # pip behind a TLS-intercepting proxy
    ca = next((c for c in cas if c and Path(c).exists()), None)
    secret = ["--secret", f"id=pip_ca,src={ca}"] if ca else []
    for target, tag in (("serve", API_IMAGE), ("artifact-job", JOB_IMAGE)):
        t = time.monotonic()
        step(f"build: docker build --target {target} -t {tag} .")
        cmd = ["build", "--network", "host", *secret, "--target", target, "-t", tag, "."]
        docker(*cmd, env=os.environ | {"DOCKER_BUILDKIT": "1"}, timeout=900)
        size = int(docker("image", "inspect", "-f", "{{.Size}}", tag)) / 1e9
        results.record(f"image {tag} builds", True, f"{time.monotonic() - t:.0f} s, {size:.2f} GB")


def check_serving_image(results: Results) -> None:
    probe = (
        "import importlib.util as u, json, onnxruntime, torch; print(json.dumps({'cuda': torch.version.cuda, "
        "'providers': onnxruntime.get_available_providers(), "
        "'build_extras': [m for m in ('onnx', 'sentence_transformers') if u.find_spec(m)]}))"
    )
    got = json.loads(docker("run", "--rm", "--network", "none", API_IMAGE, "python", "-c", probe).splitlines()[-1])
    cpu = got["cuda"] is None and "CUDAExecutionProvider" not in got["providers"]
    results.record("serving image is the CPU build", cpu, f"torch CUDA {got['cuda']}, providers {got['providers']}")
    results.record(
        "serving image cannot build artifacts", not got["build_extras"], f"build extras {got['build_extras']}"
    )


# ---------------------------------------------------------------- HTTP


def classify(client: httpx.Client, base: str, png: bytes, top_k: int) -> dict[str, Any]:
    r = client.post(f"{base}/classify", params={"top_k": top_k}, files={"image": ("example.png", png, "image/png")})
    r.raise_for_status()
    answer: dict[str, Any] = r.json()
    return answer


def probabilities(answer: dict[str, Any], n: int) -> list[float]:
    p = [0.0] * n
    for pred in answer["predictions"]:
        p[pred["index"]] = pred["probability"]
    return p


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b, strict=True))


def ready(client: httpx.Client, base: str) -> bool | None:
    return True if client.get(f"{base}/readyz").status_code == 200 else None


# ---------------------------------------------------------------- the dashboard, without Grafana


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers left once strings, label matchers, range windows
    and by/without/on label lists are cut, that are neither a function call nor a keyword."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.:$])[a-zA-Z_:][\w:]*", e):
        if not e[m.end() :].lstrip().startswith("(") and m.group() not in PROMQL_WORDS:
            names.add(m.group())
    return names


def exported_names(exposition: str) -> set[str]:
    names = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def check_dashboard(results: Results, client: httpx.Client, exposition: str, prometheus: str) -> None:
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/rac.json").read_text())
    provisioned = (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()
    uid = re.search(r"^\s*uid:\s*(\S+)", provisioned, re.M)
    exported = exported_names(exposition)
    bad: list[str] = []
    exprs = 0
    for panel in dashboard["panels"]:
        targets = [t for t in panel.get("targets", []) if t.get("expr")]
        if not targets:
            bad.append(f"panel {panel['title']!r} has no query")
        if panel.get("datasource", {}).get("uid") != (uid.group(1) if uid else None):
            bad.append(f"panel {panel['title']!r} does not use the provisioned data source")
        for t in targets:
            exprs += 1
            names = metric_names(t["expr"])
            missing = {n for n in names if n not in exported}
            if not names or missing:
                bad.append(f"{panel['title']!r}: {t['expr']} reads {sorted(names)}, not exported: {sorted(missing)}")
            query = re.sub(r"\$__(?:rate_interval|interval|range)", "1m", t["expr"])
            r = client.get(f"{prometheus}/api/v1/query", params={"query": query})
            if r.status_code != 200 or r.json().get("status") != "success":
                bad.append(f"{panel['title']!r}: Prometheus rejects {query}: {r.text[:200]}")
    detail = f"{len(dashboard['panels'])} panels, {exprs} queries" if not bad else "; ".join(bad)
    results.record("dashboard queries name exported metrics and evaluate in Prometheus", not bad, detail)


# ---------------------------------------------------------------- the stack


def health(container: str) -> str | None:
    status = docker("inspect", "-f", "{{.State.Health.Status}}", container).strip()
    return status if status == "healthy" else None


def up_targets(client: httpx.Client, prometheus: str) -> list[str] | None:
    active = client.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
    return [t["scrapeUrl"] for t in active if t["health"] == "up"] or None


def counted(client: httpx.Client, prometheus: str, at_least: int) -> float | None:
    rows = client.get(f"{prometheus}/api/v1/query", params={"query": "rac_requests_total"}).json()["data"]["result"]
    total = sum(float(r["value"][1]) for r in rows if r["metric"].get("route") == "/classify")
    return total if total >= at_least else None


def agree(results: Results, name: str, got: list[dict[str, Any]], want: list[tuple[str, list[float]]]) -> None:
    """Top labels equal and every class probability within TOLERANCE."""
    n = len(want[0][1])
    labels = all(a["predictions"][0]["label"] == w[0] for a, w in zip(got, want, strict=True))
    diff = max(max_diff(probabilities(a, n), w[1]) for a, w in zip(got, want, strict=True))
    detail = f"{len(got)} examples, same top labels: {labels}, max |dp| {diff:.1e}"
    results.record(name, labels and diff <= TOLERANCE, detail)


def check_protocol(
    results: Results, api: str, grpc_target: str, pngs: list[bytes], served: list[dict[str, Any]], key: str
) -> None:
    """Every example in one Open Inference Protocol request, over v2 REST and over gRPC through the stack's
    published ports, with the unmodified tritonclient: the same top labels and probabilities as POST /classify."""
    n = len(served[0]["predictions"])  # served with top_k = every class
    want_labels = [a["predictions"][0]["label"] for a in served]
    want = np.array([probabilities(a, n) for a in served])
    for name, client, target in (("v2 REST", th, api.removeprefix("http://")), ("v2 gRPC", tg, grpc_target)):
        check = f"{name} inference through the stack = POST /classify"
        tensor = client.InferInput("IMAGE", [len(pngs)], "BYTES")
        tensor.set_data_from_numpy(np.array(pngs, dtype=object))
        try:
            auth = {"authorization": f"Bearer {key}"}  # the gRPC metadata, the HTTP header (case-blind)
            result = client.InferenceServerClient(target).infer("rac", [tensor], parameters={"top_k": 1}, headers=auth)
        except InferenceServerException as e:
            results.record(check, False, f"{target}: {e}")
            continue
        labels = [row[0].decode() for row in result.as_numpy("LABELS")]
        diff = float(np.abs(result.as_numpy("PROBABILITIES") - want).max())
        same = labels == want_labels
        detail = f"{target}, {len(pngs)} examples in one request, same top labels: {same}, max |dp| {diff:.1e}"
        results.record(check, same and diff <= TOLERANCE, detail)


def check_stack(results: Results, ports: dict[str, str], work: Path) -> None:
    api, prometheus = f"http://127.0.0.1:{ports['RAC_API_PORT']}", f"http://127.0.0.1:{ports['RAC_PROMETHEUS_PORT']}"
    step("keys: an admin key for this check and one for Prometheus, in a keys file the API mounts read-only")
    keys_file, scrape_key = work / "keys.json", work / "prometheus.key"
    key = add_key(keys_file, "check", "admin", None)
    scrape_key.write_text(add_key(keys_file, "prometheus", "admin", None))
    for f in (keys_file, scrape_key):
        f.chmod(0o644)  # the containers' users read them (the keys file holds digests only)
    COMPOSE_ENV.update(RAC_KEYS_FILE=str(keys_file), RAC_PROMETHEUS_KEY_FILE=str(scrape_key))
    step(f"compose: up -d (project {PROJECT}, quick artifact build, API {api}, Prometheus {prometheus})")
    compose("down", "-v", "--remove-orphans")
    compose("up", "-d", "--no-build", timeout=600)
    job = compose("ps", "-a", "-q", "artifacts").split()[0]
    code = docker("inspect", "-f", "{{.State.ExitCode}}", job).strip()
    results.record("artifact job completed", code == "0", docker("logs", "--tail", "1", job, check=False).strip())
    api_id, redis_id = compose("ps", "-q", "api").strip(), compose("ps", "-q", "redis").strip()
    client = httpx.Client(timeout=30, headers={"Authorization": f"Bearer {key}"})

    step("api: /readyz, HEALTHCHECK, user, keys")
    results.record("/readyz turns ready", wait_for("/readyz", lambda: ready(client, api), 180))
    refused = httpx.get(f"{api}/info", timeout=30).status_code
    results.record("a request without a key is refused", refused == 401, f"GET /info without a key: {refused}")
    results.record("container HEALTHCHECK turns healthy", bool(wait_for("healthy", lambda: health(api_id), 120, 2)))
    uid = re.search(r"^Uid:\s+(\d+)", docker("exec", api_id, "cat", "/proc/1/status"), re.M)
    cmdline = docker("exec", api_id, "cat", "/proc/1/cmdline").replace("\0", " ").strip()
    user = uid.group(1) if uid else "?"
    results.record("serving process runs as non-root", user not in ("0", "?"), f"pid 1 uid {user}: {cmdline}")

    step("examples: Docker vs a local server on the same artifacts vs the manifest")
    docker("cp", f"{api_id}:{ARTIFACTS}", str(work / "artifacts"))
    manifest = json.loads((work / "artifacts" / "manifest.json").read_text())
    n, examples = len(manifest["classes"]), manifest["examples"]
    pngs = [(work / "artifacts" / e["file"]).read_bytes() for e in examples]
    with serving(work / "artifacts") as local:  # the same artifacts outside Docker (in-process cache)
        served = [classify(client, api, png, n) for png in pngs]
        outside = [classify(client, local, png, n) for png in pngs]
    agree(
        results,
        "Docker answers = local answers",
        served,
        [(a["predictions"][0]["label"], probabilities(a, n)) for a in outside],
    )
    offline = [(e["predicted"], e["probabilities"]) for e in examples]
    agree(results, "Docker answers = the manifest's offline predictions", served, offline)

    step("two named memories: the default (demo) and ?memory=downstream")
    other = client.post(
        f"{api}/classify",
        params={"memory": "downstream", "neighbors": 5},
        files={"image": ("x.png", pngs[0], "image/png")},
    ).json()
    sources = {nb["source"] for nb in other["neighbors"]}
    detail = f"answered by {other['memory']}, version {other['memory_version']}, neighbour sources {sources}"
    results.record("memory downstream answers", other["memory"] == "downstream" and sources == {"downstream"}, detail)

    step("Open Inference Protocol: the examples over v2 REST and gRPC (tritonclient), through the published ports")
    check_protocol(results, api, f"127.0.0.1:{ports['RAC_API_GRPC_PORT']}", pngs, served, key)

    step("cache: the examples again, and the keys in the stack's Redis")
    again = [classify(client, api, png, n) for png in pngs]
    first, hits = sum(a["cached"] for a in served), sum(a["cached"] for a in again)
    # Within BATCHED, not bit for bit: a process may give the answer it computed for the protocol's request
    # above, whose images were one batch, and the head's sums differ with the batch in their last bits.
    diff = max(max_diff(probabilities(a, n), probabilities(b, n)) for a, b in zip(again, served, strict=True))
    detail = f"first pass cached {first}, repeat cached {hits}/{len(pngs)}, max |dp| {diff:.1e}"
    results.record("a repeated image is a cache hit", first == 0 and hits == len(pngs) and diff <= BATCHED, detail)
    keys = docker("exec", redis_id, "redis-cli", "--scan", "--pattern", "rac:nb:*").split()
    results.record("neighbour keys are in the stack's Redis", len(keys) >= len(pngs), f"{len(keys)} keys rac:nb:*")

    step("prometheus: the API target and the request counter")
    targets = wait_for("an API target that is up", lambda: up_targets(client, prometheus), 60)
    results.record("Prometheus scrapes the API", True, ", ".join(f"{t} up" for t in targets))
    total = wait_for("every /classify counted", lambda: counted(client, prometheus, 2 * len(pngs)), 60)
    results.record("Prometheus counts the requests", total > 0, f"rac_requests_total{{route=/classify}} = {total:.0f}")
    check_dashboard(results, client, client.get(f"{api}/metrics").text, prometheus)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", action="store_true", help="leave the stack and the engine running")
    p.add_argument("--no-build", action="store_true", help="use the images as they are")
    a = p.parse_args()
    started = start_engine()
    if started is None:
        required = os.environ.get("RAC_REQUIRE_DOCKER") == "1"
        why = "RAC_REQUIRE_DOCKER=1" if required else "set RAC_REQUIRE_DOCKER=1 to make this a failure"
        print(f"{'FAIL' if required else 'SKIP'}: no Docker engine can be had here ({why})")
        return 1 if required else 0
    results = Results()
    ports = dict(
        line.split("=", 1) for line in (ROOT / "deploy/local.env").read_text().splitlines() if re.match(r"^\w+=", line)
    )
    try:
        step(f"torch wheel: {torch_wheel()}")
        if not a.no_build:
            build_images(results)
        check_serving_image(results)
        with tempfile.TemporaryDirectory(prefix="rac-check-") as work:
            check_stack(results, ports, Path(work))
    except (StepError, httpx.HTTPError, subprocess.SubprocessError, OSError, KeyError, ValueError) as e:
        results.record("the check ran to its end", False, f"{type(e).__name__}: {e}")
        if engine_answers():  # what the stack said, for the failure's cause
            print(sh(*compose_cli(), "-p", PROJECT, *COMPOSE_FILES, "logs", "--tail", "20", check=False)[-6000:])
    finally:
        if a.keep:
            step(
                f"left running: API :{ports['RAC_API_PORT']}, Prometheus :{ports['RAC_PROMETHEUS_PORT']}, Redis "
                f":{ports['RAC_REDIS_PORT']}; stop with {' '.join(compose_cli())} -p {PROJECT} ... down -v"
            )
        else:
            step("compose: down -v")
            try:
                compose("down", "-v", "--remove-orphans")
            except (StepError, subprocess.SubprocessError) as e:
                results.record("the stack comes down", False, str(e))
            if started:
                step("engine: stopping the dockerd this check started")
                stop_engine()
    failed = [c for c in results.checks if not c[1]]
    print(
        f"\n{'PASS' if not failed else 'FAIL'}: {len(results.checks) - len(failed)}/{len(results.checks)} checks "
        f"passed in {time.monotonic() - T0:.0f} s"
    )
    for name, _, detail in failed:
        print(f"  failed: {name}: {detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
