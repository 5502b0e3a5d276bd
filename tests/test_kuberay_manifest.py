"""examples/kuberay.yaml: its Kubernetes objects and the RayCluster's pod templates pass the
Kubernetes schemas (kubernetes-validate; the RayCluster CRD's own schema is not on PyPI, so
its fields are checked against KubeRay's ray.io/v1 field names here), and the pdserve parts
are what pdserve itself accepts: the deployment file and the `pdserve up --ray` command."""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import pytest
import yaml

kv = pytest.importorskip("kubernetes_validate")

MANIFEST = Path(__file__).resolve().parent.parent / "examples" / "kuberay.yaml"
K8S = "1.30"
# RayCluster ray.io/v1 (KubeRay 1.x) fields this manifest may use
RAYCLUSTER_SPEC = {"rayVersion", "headGroupSpec", "workerGroupSpecs", "enableInTreeAutoscaling",
                   "autoscalerOptions", "headServiceAnnotations", "suspend"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                "numOfHosts", "scaleStrategy", "suspend", "idleTimeoutSeconds"}


def docs() -> dict:
    return {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}


def pod_template(template: dict) -> dict:
    return {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}


def test_kubernetes_objects_and_pod_templates_validate():
    d = docs()
    assert set(d) == {"ConfigMap", "RayCluster", "Service"}
    for kind in ("ConfigMap", "Service"):
        kv.validate(d[kind], K8S, strict=True)
    rc = d["RayCluster"]
    assert rc["apiVersion"] == "ray.io/v1"
    assert set(rc["spec"]) <= RAYCLUSTER_SPEC
    assert set(rc["spec"]["headGroupSpec"]) <= HEAD_GROUP
    kv.validate(pod_template(rc["spec"]["headGroupSpec"]["template"]), K8S, strict=True)
    for g in rc["spec"]["workerGroupSpecs"]:
        assert set(g) <= WORKER_GROUP
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        assert all(isinstance(v, str) for v in g["rayStartParams"].values())   # KubeRay wants strings
        kv.validate(pod_template(g["template"]), K8S, strict=True)
    # the router Service selects the head pod, where the router listens
    assert d["Service"]["spec"]["selector"] == {"ray.io/cluster": rc["metadata"]["name"], "ray.io/node-type": "head"}


def test_pdserve_parts_are_what_pdserve_accepts(tmp_path, monkeypatch):
    import json

    from pdserve.launch.cluster import add_arguments
    from pdserve.ray_cluster.settings import load
    d = docs()
    rc = d["RayCluster"]
    groups = {g["groupName"]: json.loads(json.loads(g["rayStartParams"]["resources"]))
              for g in rc["spec"]["workerGroupSpecs"]}
    cfg = tmp_path / "deploy.yaml"
    cfg.write_text(d["ConfigMap"]["data"]["deploy.yaml"])
    sidecar = next(c for c in rc["spec"]["headGroupSpec"]["template"]["spec"]["containers"] if c["name"] == "pdserve")
    cmd = shlex.split(sidecar["args"][0].split("exec ", 1)[1])
    assert cmd[:3] == ["pdserve", "up", "--ray"]
    cmd[cmd.index("--config") + 1] = str(cfg)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(cmd[2:])
    dep, s = load(args)
    assert args.ray == "127.0.0.1:6379" and dep.host == "0.0.0.0" and dep.port == 8000
    assert [w.role for w in dep.workers] == ["prefill", "decode", "decode"]
    # each role asks for a resource that its worker group's raylets have
    for role, group in (("prefill", "prefill"), ("decode", "decode")):
        assert set(s.roles[role].resources) <= set(groups[group])
    assert sidecar["readinessProbe"]["httpGet"]["port"] == dep.port
