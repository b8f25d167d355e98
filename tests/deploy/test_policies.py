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
