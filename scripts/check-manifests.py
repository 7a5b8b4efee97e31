#!/usr/bin/env python3
"""Validates every manifest in deploy/ offline.

Kustomizations are rendered with `kubectl kustomize`; every Kubernetes
object is checked strictly (unknown fields refused) against the schemas of
one pinned Kubernetes version from the kubernetes-validate package, and
every custom resource against the openAPIV3Schema of its vendored CRD
(deploy/schemas/), made strict the same way. A self-test first shows the
check refusing a misspelt field in each kind it checks, so a pass means
something. Exits non-zero on the first failure.

    scripts/check-manifests.py [--kubectl PATH] [--also FOLDER ...]

--also adds kustomization folders outside deploy/ (the overlay `kiln plan
--emit k8s` writes).
"""

import argparse
import copy
import gzip
import pathlib
import subprocess
import sys

import jsonschema
import kubernetes_validate
import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = "1.32.0"
KUSTOMIZATIONS = ["k8s/base", "k8s/overlays/gpu", "k8s/monitoring"]
PLAIN = ["kserve/servingruntime.yaml", "kserve/inferenceservice.yaml"]
CRDS = [
    "schemas/kserve-v0.20.0/serving.kserve.io_servingruntimes.yaml.gz",
    "schemas/kserve-v0.20.0/serving.kserve.io_inferenceservices.yaml.gz",
    "schemas/prometheus-operator-v0.93.0/monitoring.coreos.com_podmonitors.yaml.gz",
]


def strict(schema):
    """Refuses properties a schema does not name, as the API server's
    strict field validation does, except where the schema keeps unknown
    fields on purpose."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if not isinstance(node, dict):
            return
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
        for key in ("properties", "patternProperties"):
            for child in node.get(key, {}).values():
                walk(child)
        for key in ("items", "additionalProperties", "not"):
            walk(node.get(key))
        for key in ("allOf", "anyOf", "oneOf"):
            for child in node.get(key, []):
                walk(child)

    walk(schema)
    return schema


def crd_schemas():
    """(apiVersion, kind) -> strict schema, from the vendored CRDs."""
    schemas = {}
    for path in CRDS:
        crd = yaml.safe_load(gzip.decompress((DEPLOY / path).read_bytes()))
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            # apiVersion, kind and metadata are the API server's to check.
            schema.setdefault("properties", {}).update(
                apiVersion={"type": "string"}, kind={"type": "string"}, metadata={"type": "object"}
            )
            schemas[(f"{group}/{version['name']}", kind)] = strict(schema)
    return schemas


def check(doc, crds):
    """None when `doc` validates, else what is wrong."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    try:
        if key in crds:
            jsonschema.validate(doc, crds[key])
        else:
            kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    except jsonschema.ValidationError as e:
        return f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
    except kubernetes_validate.ValidationError as e:
        return f"{'.'.join(map(str, e.path)) or '(top)'}: {e.message}"
    except kubernetes_validate.SchemaNotFoundError as e:
        return f"no schema for {key} in Kubernetes {KUBERNETES} or the vendored CRDs: {e}"
    return None


def kustomize_version(kubectl):
    out = subprocess.run([kubectl, "version", "--client"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        if line.startswith("Kustomize Version: v"):
            return tuple(int(p) for p in line.split("v", 1)[1].split(".")[:2])
    return (2, 0)  # kubectl before 1.21 embeds kustomize v2.0.3 and does not say so


def render(kubectl, folder):
    result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"FAIL {folder}: kubectl kustomize: {result.stderr.strip()}")
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def unlisted(base):
    """YAML files in a kustomization folder that it does not use: a
    manifest added beside the others but never applied."""
    k = yaml.safe_load((base / "kustomization.yaml").read_text())
    used = set(k.get("resources", [])) | {p["path"] for p in k.get("patches", [])}
    return sorted(
        p.name for p in base.glob("*.yaml") if p.name != "kustomization.yaml" and p.name not in used
        and not any(p.name in str(g) for g in k.get("configMapGenerator", []))
    )


def self_test(docs, crds):
    """Each kind checked must refuse a misspelt field."""
    seen = {}
    for _, doc in docs:
        seen.setdefault((doc["apiVersion"], doc["kind"]), doc)
    for key, doc in seen.items():
        bad = copy.deepcopy(doc)
        target = bad.get("spec") if isinstance(bad.get("spec"), dict) else bad.setdefault("metadata", {})
        target["replicaz"] = 3
        if check(bad, crds) is None:
            sys.exit(f"FAIL self-test: a misspelt field in {key[1]} ({key[0]}) was accepted")
    return len(seen)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kubectl", default="kubectl")
    parser.add_argument("--also", nargs="*", default=[], type=pathlib.Path)
    args = parser.parse_args()
    crds = crd_schemas()
    version = kustomize_version(args.kubectl)
    docs = []
    for folder in [DEPLOY / k for k in KUSTOMIZATIONS] + args.also:
        where = str(folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder)
        if "patches" in yaml.safe_load((folder / "kustomization.yaml").read_text()) and version < (3, 1):
            print(f"SKIP {where}: `patches` needs kustomize v3.1 or later, {args.kubectl} has v{version[0]}.{version[1]}")
            continue
        if extra := unlisted(folder):
            sys.exit(f"FAIL {where}: not in its kustomization.yaml: {', '.join(extra)}")
        docs += [(where, d) for d in render(args.kubectl, folder)]
    for path in PLAIN:
        docs += [(f"deploy/{path}", d) for d in yaml.safe_load_all((DEPLOY / path).read_text()) if d]
    kinds = self_test(docs, crds)
    failed = False
    for where, doc in docs:
        problem = check(doc, crds)
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        print(f"{'FAIL' if problem else 'ok  '} {where}: {name} ({doc['apiVersion']}){': ' + problem if problem else ''}")
        failed |= problem is not None
    if failed:
        sys.exit(1)
    print(f"{len(docs)} objects valid (Kubernetes {KUBERNETES}, {kinds} kinds; each kind refused a misspelt field)")


if __name__ == "__main__":
    main()
