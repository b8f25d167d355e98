"""The Gatekeeper policies' own Rego (from deploy/gatekeeper's ConstraintTemplates), run by a
real Rego engine (regopy) the way Gatekeeper calls it: every rendered object of every
variant is admitted; the deliberately bad manifests, and each rendered workload broken in
one way, are rejected with the policy's message."""

import copy
from pathlib import Path

import pytest
import yaml

from k8s_render import VARIANTS, Gatekeeper, render

BAD = Path(__file__).parent / "bad"


@pytest.fixture(scope="module")
def gatekeeper():
    return Gatekeeper()


@pytest.fixture(scope="module")
def rendered():
    return {v: render(v) for v in VARIANTS if not v.startswith("gatekeeper")}


def load(name):
    return [d for d in yaml.safe_load_all((BAD / name).read_text()) if d]


def workloads(objs):
    return [o for o in objs if o["kind"] == "Deployment" or o["apiVersion"].startswith("serving.knative.dev")]


def containers(obj):
    return obj["spec"]["template"]["spec"]["containers"]


def test_three_templates_and_their_constraints(gatekeeper):
    assert set(gatekeeper.templates) == {"K8sNonRootContainers", "K8sRequiredResources", "K8sRequireNetworkPolicy"}


@pytest.mark.parametrize("variant", ["k8s/base", "k8s/overlays/canary", "k8s/overlays/knative", "k8s/overlays/edge"])
def test_every_rendered_object_is_admitted(gatekeeper, rendered, variant):
    objs = rendered[variant]
    assert workloads(objs)
    verdicts = {f"{o['kind']}/{o['metadata']['name']}": gatekeeper.review(o, objs) for o in objs}
    assert {k: v for k, v in verdicts.items() if v} == {}


def test_root_container_is_rejected(gatekeeper, rendered):
    (dep,) = load("root-container.yaml")
    msgs = gatekeeper.review(dep, rendered["k8s/base"])
    assert msgs == ["[containers-run-as-non-root] Deployment runs-as-root: container server may run as root; set "
                    "securityContext.runAsNonRoot: true and a non-zero runAsUser"]


def test_missing_limits_are_rejected(gatekeeper, rendered):
    (dep,) = load("no-limits.yaml")
    msgs = sorted(gatekeeper.review(dep, rendered["k8s/base"]))
    assert len(msgs) == 2 and all(m.startswith("[containers-have-requests-and-limits]") for m in msgs)
    assert "container fetch has no resources requests.cpu, requests.memory, limits.cpu, limits.memory" in msgs[0]
    assert "container server has no resources limits.cpu, limits.memory;" in msgs[1]


def test_namespace_without_network_policy_is_rejected(gatekeeper, rendered):
    ns, dep = load("namespace-without-networkpolicy.yaml")
    cluster = rendered["k8s/base"] + [ns, dep]  # the autoglm namespace's policies do not count for team-x
    assert gatekeeper.review(ns, cluster) == [
        "[namespaces-need-a-network-policy] Namespace team-x: namespace team-x has no NetworkPolicy; add one (e.g. "
        "default deny plus the allowed ingress) before deploying"]
    assert gatekeeper.review(dep, cluster) == [
        "[workloads-need-a-network-policy] Deployment open-to-all: namespace team-x has no NetworkPolicy; add one "
        "(e.g. default deny plus the allowed ingress) before deploying"]
    # the same namespace with a policy in it is admitted
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "default-deny", "namespace": "team-x"}, "spec": {"podSelector": {}}}
    assert gatekeeper.review(ns, cluster + [policy]) == [] and gatekeeper.review(dep, cluster + [policy]) == []


@pytest.mark.parametrize("variant", ["k8s/base", "k8s/overlays/canary", "k8s/overlays/knative", "k8s/overlays/edge"])
def test_each_rendered_workload_broken_one_way_is_rejected(gatekeeper, rendered, variant):
    objs = rendered[variant]
    for w in workloads(objs):
        name = containers(w)[0]["name"]
        root = copy.deepcopy(w)
        root["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
        containers(root)[0]["securityContext"].pop("runAsNonRoot", None)
        root["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot", None)
        assert any("may run as root" in m and f"container {name}" in m for m in gatekeeper.review(root, objs))
        unlimited = copy.deepcopy(w)
        del containers(unlimited)[0]["resources"]["limits"]
        assert any("has no resources limits.cpu, limits.memory" in m for m in gatekeeper.review(unlimited, objs))
        no_policies = [o for o in objs if o["kind"] != "NetworkPolicy"]
        assert any("has no NetworkPolicy" in m for m in gatekeeper.review(w, no_policies))


def test_system_namespaces_and_images_are_exempt(gatekeeper):
    (dep,) = load("root-container.yaml")
    system = copy.deepcopy(dep)
    system["metadata"]["namespace"] = "kube-system"
    assert gatekeeper.review(system, []) == []
    image = copy.deepcopy(dep)
    containers(image)[0]["image"] = "registry.k8s.io/pause:3.10"
    assert not any("may run as root" in m for m in gatekeeper.review(image, []))


@pytest.mark.parametrize("variant", ["k8s/base", "k8s/overlays/canary", "k8s/overlays/knative", "k8s/overlays/edge"])
def test_a_fresh_install_in_stream_order_is_admitted(gatekeeper, rendered, variant):
    """`kubectl kustomize ... | kubectl apply -f -` creates the objects one by one in the
    rendered order: each is admitted against only those created before it, so a namespace's
    NetworkPolicies must come before its workloads (only `deny` constraints block)."""
    deny = {c["metadata"]["name"] for c in gatekeeper.constraints if c["spec"].get("enforcementAction") == "deny"}
    objs = rendered[variant]
    denied = {}
    for i, o in enumerate(objs):
        msgs = [m for m in gatekeeper.review(o, objs[:i]) if m[1:].split("]", 1)[0] in deny]
        if msgs:
            denied[f"{o['kind']}/{o['metadata']['name']}"] = msgs
    assert denied == {}
    kinds = [o["kind"] for o in objs]
    assert kinds.index("NetworkPolicy") < min(i for i, o in enumerate(objs) if o in workloads(objs))


def test_ephemeral_containers_are_held_to_non_root_but_not_to_limits(gatekeeper, rendered):
    """`kubectl debug` adds an ephemeral container to a running pod: it must not run as root
    either; it cannot carry resources (Kubernetes forbids them), so the limits rule skips it."""
    (dep,) = [o for o in rendered["k8s/base"] if o["kind"] == "Deployment"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "autoglm-x", "namespace": "autoglm"},
           "spec": copy.deepcopy(dep["spec"]["template"]["spec"])}
    assert gatekeeper.review(pod, rendered["k8s/base"]) == []
    debug = {"name": "debugger", "image": "busybox:1.37.0", "securityContext": {"runAsUser": 0}}
    pod["spec"]["ephemeralContainers"] = [debug]
    assert gatekeeper.review(pod, rendered["k8s/base"]) == [
        "[containers-run-as-non-root] Pod autoglm-x: container debugger may run as root; set "
        "securityContext.runAsNonRoot: true and a non-zero runAsUser"]
    debug["securityContext"] = {"runAsNonRoot": True, "runAsUser": 1000}
    assert gatekeeper.review(pod, rendered["k8s/base"]) == []


def test_kubeflow_training_pods_are_admitted_in_the_server_namespace(gatekeeper, rendered):
    """The PyTorchJob's pods land in namespace autoglm, where the policies apply: each replica's
    pod (as the Training Operator creates it) is admitted, valid against Kubernetes' schema,
    and would not be without its securityContext."""
    from k8s_render import DEPLOY, validate, validate_containers

    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubeflow" / "pytorchjob.yaml").read_text()) if d]
    assert [e for d in docs if d["kind"] != "PyTorchJob" for e in validate(d)] == []  # Kubernetes' own kinds
    (job,) = [d for d in docs if d["kind"] == "PyTorchJob"]
    cluster = rendered["k8s/base"] + docs
    for role, spec in job["spec"]["pytorchReplicaSpecs"].items():
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"autoglm-pretrain-{role.lower()}-0",
                                                               "namespace": job["metadata"]["namespace"]},
               "spec": copy.deepcopy(spec["template"]["spec"])}
        assert validate_containers(pod["spec"], pod["metadata"]["name"]) == []
        assert gatekeeper.review(pod, cluster) == [], role
        pod["spec"].pop("securityContext")
        assert any("may run as root" in m for m in gatekeeper.review(pod, cluster))


def test_training_pods_reach_each_other_and_dns_only(rendered):
    """With the namespace's default deny, the PyTorchJob's pods need their own NetworkPolicy:
    master and worker talk (torchrun's rendezvous, NCCL), resolve names, and reach nothing else;
    the server keeps its own rules (Prometheus in, DNS out)."""
    from k8s_render import DEPLOY, traffic_allowed

    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubeflow" / "pytorchjob.yaml").read_text()) if d]
    base = [o for o in rendered["k8s/base"] if o["kind"] == "NetworkPolicy"]
    policies = base + [d for d in docs if d["kind"] == "NetworkPolicy"]
    job = {"training.kubeflow.org/job-name": "autoglm-pretrain"}
    master = ("autoglm", {**job, "training.kubeflow.org/replica-type": "master"})
    worker = ("autoglm", {**job, "training.kubeflow.org/replica-type": "worker"})
    dns = ("kube-system", {"k8s-app": "kube-dns"})
    server = ("autoglm", {"app": "autoglm", "version": "v1"})
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert traffic_allowed(policies, worker, master, 29500) and traffic_allowed(policies, master, worker, 41000)
    assert traffic_allowed(policies, master, dns, 53, "UDP")
    assert not traffic_allowed(policies, master, server, 8000)
    assert not traffic_allowed(policies, master, ("default", {"app": "anything"}), 443)
    assert traffic_allowed(policies, prometheus, server, 8000) and traffic_allowed(policies, server, dns, 53, "UDP")
    assert not traffic_allowed(policies, server, ("default", {"app": "anything"}), 443)
    # the namespace's default deny alone would cut the job's ranks apart
    assert not traffic_allowed(base, worker, master, 29500)


def test_knative_system_reaches_the_queue_proxy(rendered):
    """In the Knative variant requests enter the pod through Knative's queue-proxy (8012 HTTP/1,
    8013 HTTP/2) and its autoscaler scrapes 9090: the namespace's NetworkPolicies let the
    activator and the autoscaler in on those ports, and nobody from elsewhere."""
    from k8s_render import traffic_allowed

    objs = rendered["k8s/overlays/knative"]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    (ksvc,) = [o for o in objs if o["apiVersion"].startswith("serving.knative.dev")]
    pod = ("autoglm", {**ksvc["spec"]["template"]["metadata"]["labels"], "serving.knative.dev/service": "autoglm"})
    activator = ("knative-serving", {"app": "activator"})
    autoscaler = ("knative-serving", {"app": "autoscaler"})
    gateway = ("istio-system", {"istio": "ingressgateway"})
    assert traffic_allowed(policies, activator, pod, 8012) and traffic_allowed(policies, gateway, pod, 8013)
    assert traffic_allowed(policies, autoscaler, pod, 9090)
    assert not traffic_allowed(policies, ("default", {"app": "x"}), pod, 8012)
    # the Deployment variants keep only the server's port open
    base = [o for o in rendered["k8s/base"] if o["kind"] == "NetworkPolicy"]
    assert traffic_allowed(base, gateway, ("autoglm", {"app": "autoglm"}), 8000)
    assert not traffic_allowed(base, gateway, ("autoglm", {"app": "autoglm"}), 8012)


@pytest.mark.parametrize("variant", ["k8s/base", "k8s/overlays/canary", "k8s/overlays/knative", "k8s/overlays/edge"])
def test_the_istio_sidecar_gets_its_config_and_prometheus_its_metrics(rendered, variant):
    """The namespace has istio-injection: the server pod's sidecar must reach istiod (xDS on
    15012) through the default deny, and Prometheus must reach the merged metrics port (15020)
    Istio rewrites the scrape annotations to; the server reaches nothing else."""
    from k8s_render import traffic_allowed

    objs = rendered[variant]
    (ns,) = [o for o in objs if o["kind"] == "Namespace"]
    assert ns["metadata"]["labels"]["istio-injection"] == "enabled"
    policies = [o for o in objs if o["kind"] == "NetworkPolicy"]
    server = ("autoglm", {"app": "autoglm", "version": "v1"})
    istiod = ("istio-system", {"app": "istiod"})
    prometheus = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert traffic_allowed(policies, server, istiod, 15012)
    assert not traffic_allowed(policies, server, ("istio-system", {"app": "other"}), 15012)
    assert traffic_allowed(policies, prometheus, server, 15020) and traffic_allowed(policies, prometheus, server, 8000)
    assert not traffic_allowed(policies, ("default", {"app": "x"}), server, 15020)
