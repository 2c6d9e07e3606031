#!/usr/bin/env python3
"""Offline validation of zmesh's Kubernetes manifests (run by scripts/validate-manifests.sh).

Checks, all without a cluster:

1. Every document of every YAML file under manifests/ (except examples/) validates against
   the Kubernetes OpenAPI schema of each release from MIN_K8S to the newest one bundled with
   the pinned kubernetes-validate package, in strict mode: an unknown field is an error, as
   with `kubectl apply --validate=strict`. Templates (manifests/templates/) are validated with
   each whole-string "{{NAME}}" placeholder replaced by a sample value.
2. manifests/kustomization.yaml lists every manifest file, each once, namespace first and
   CRDs before anything else (the CLI applies them in that order).
3. Every CRD schema is structural (the API server's rules), its group/kind/plural/versions
   match the kind the controller watches (controller/src/k8s/mod.rs KINDS), and exactly one
   version is the storage version.
4. Every object in manifests/examples/ validates against its CRD's openAPIV3Schema for the
   version in its apiVersion, strictly (fields the API server would prune are errors).
5. Consistency with the code: container flags and env vars exist in the binaries' clap
   definitions, images carry the workspace version, the controller's ClusterRole can
   list/watch every kind it watches, its --node-agent names ztunnel's ServiceAccount, and
   every probe's port is one the container declares (a named port that does not exist is
   accepted by the API server and fails only at run time, as a never-ready pod).

Errors name the file, the document and the field path. Exit status 1 on any error.
`--self-test` breaks copies of the manifests in a temporary directory in several ways and
checks that each breakage is caught (so the validator cannot silently pass), after checking
that the unmodified copy passes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import jsonschema
import yaml

try:
    import kubernetes_validate.utils as kv
except ImportError:  # pragma: no cover - the wrapper script installs it
    sys.exit("kubernetes-validate is not installed: run bash scripts/setup.sh "
             "(or bash scripts/validate-manifests.sh, which uses its virtualenv)")

# Oldest Kubernetes release the manifests must be valid for (README: "1.31+").
MIN_K8S = "1.31"

# Source files the consistency checks read, relative to the repository root.
CONTROLLER_MAIN = "controller/src/main.rs"
ZTUNNEL_MAIN = "ztunnel/src/main.rs"
KINDS_RS = "controller/src/k8s/mod.rs"
CARGO_TOML = "Cargo.toml"
SOURCES = [CONTROLLER_MAIN, ZTUNNEL_MAIN, KINDS_RS, CARGO_TOML]

# Container name -> binary whose clap flags/env it must use.
BINARIES = {"zmesh-controller": CONTROLLER_MAIN, "ztunnel": ZTUNNEL_MAIN}

# Kinds that live in a namespace (everything else we ship is cluster-scoped).
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole",
                  "ClusterRoleBinding", "PriorityClass"}
NAMESPACE = "zmesh-system"


@dataclass
class Report:
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checked_docs: int = 0
    checked_examples: int = 0
    k8s_versions: list[str] = field(default_factory=list)

    def error(self, where: str, msg: str) -> None:
        self.errors.append(f"{where}: {msg}")


@dataclass
class Doc:
    path: str  # relative to the repository root
    index: int  # 1-based document number in the file
    obj: dict

    @property
    def where(self) -> str:
        kind = self.obj.get("kind", "?")
        meta = self.obj.get("metadata") or {}
        name = meta.get("name", "?")
        if meta.get("namespace"):
            name = f"{meta['namespace']}/{name}"
        return f"{self.path} document {self.index} ({kind} {name})"


def fmt_path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(root)"


def load_docs(root: Path, rel: str, report: Report) -> list[Doc]:
    text = (root / rel).read_text()
    try:
        raw = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        report.error(rel, f"not valid YAML: {e}")
        return []
    docs = []
    for i, obj in enumerate(raw, 1):
        if obj is None:
            continue
        if not isinstance(obj, dict):
            report.error(f"{rel} document {i}", "is not a mapping")
            continue
        docs.append(Doc(rel, i, obj))
    return docs


# ------------------------------------------------------------------------------------------
# 1. Kubernetes schema (kubernetes-validate)
# ------------------------------------------------------------------------------------------

def k8s_versions() -> list[str]:
    """Every bundled release from MIN_K8S on, as major.minor."""
    key = lambda v: tuple(int(x) for x in v.split("."))
    mm = sorted({kv.major_minor(v) for v in kv.all_versions()}, key=key)
    return [v for v in mm if key(v) >= key(MIN_K8S)]


def validate_k8s(doc: Doc, versions: list[str], report: Report) -> None:
    for v in versions:
        try:
            kv.validate(doc.obj, v, strict=True)
        except kv.ValidationError as e:
            report.error(f"{doc.where} [Kubernetes {v}]",
                         f"{fmt_path(e.absolute_path)}: {e.message}")
            return  # the same error would repeat for every release
        except kv.SchemaNotFoundError as e:
            report.error(f"{doc.where} [Kubernetes {v}]", e.message)
            return


# ------------------------------------------------------------------------------------------
# 3. CRDs: structural schema, agreement with the controller's KINDS
# ------------------------------------------------------------------------------------------

JUNCTORS = ("allOf", "anyOf", "oneOf", "not")
FORBIDDEN = ("$ref", "definitions", "dependencies", "patternProperties", "additionalItems",
             "id", "$schema")


def structural_errors(node, path: list, in_junctor: bool = False) -> list[str]:
    """The API server's structural-schema rules (apiextensions "Specifying a structural
    schema"), returning `path: problem` strings."""
    errs: list[str] = []
    where = fmt_path(path)
    if not isinstance(node, dict):
        return [f"{where}: schema node is not a mapping"]
    for k in FORBIDDEN:
        if k in node:
            errs.append(f"{where}: `{k}` is not allowed in a CRD schema")
    if node.get("uniqueItems") is True:
        errs.append(f"{where}: uniqueItems: true is not allowed in a CRD schema")
    int_or_string = node.get("x-kubernetes-int-or-string") is True
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    if in_junctor:
        for k in ("description", "type", "default", "additionalProperties", "nullable"):
            if k in node:
                errs.append(f"{where}: `{k}` is not allowed inside allOf/anyOf/oneOf/not")
    elif not node.get("type") and not int_or_string and not preserve:
        errs.append(f"{where}: no type (every node needs one, unless it is "
                    "x-kubernetes-int-or-string or x-kubernetes-preserve-unknown-fields)")
    t = node.get("type")
    if preserve and t not in (None, "object"):
        errs.append(f"{where}: x-kubernetes-preserve-unknown-fields needs type object or none")
    if "properties" in node and "additionalProperties" in node:
        errs.append(f"{where}: properties and additionalProperties exclude each other")
    if node.get("additionalProperties") is False:
        errs.append(f"{where}: additionalProperties: false is not allowed (unknown fields "
                    "are pruned or rejected by the API server anyway)")
    if t == "array" and not in_junctor and "items" not in node:
        errs.append(f"{where}: an array needs items")
    if "items" in node and not isinstance(node["items"], dict):
        errs.append(f"{where}: items must be one schema")
    if t is not None and t not in ("object", "array", "string", "integer", "number", "boolean"):
        errs.append(f"{where}: unknown type {t!r}")
    if t and t != "object" and ("properties" in node or "additionalProperties" in node):
        errs.append(f"{where}: properties on a {t}")
    for name, sub in (node.get("properties") or {}).items():
        errs += structural_errors(sub, path + [name], in_junctor)
    if isinstance(node.get("additionalProperties"), dict):
        errs += structural_errors(node["additionalProperties"], path + ["*"], in_junctor)
    if isinstance(node.get("items"), dict):
        errs += structural_errors(node["items"], path + ["[]"], in_junctor)
    for j in JUNCTORS:
        subs = node.get(j)
        if subs is None:
            continue
        for i, sub in enumerate(subs if isinstance(subs, list) else [subs]):
            jpath = path + [f"{j}[{i}]"]
            if int_or_string and j == "anyOf" and sub in ({"type": "integer"}, {"type": "string"}):
                continue
            errs += structural_errors(sub, jpath, True)
            for name in (sub.get("properties") or {}) if isinstance(sub, dict) else ():
                if name not in (node.get("properties") or {}):
                    errs.append(f"{fmt_path(jpath)}: field {name} must also be specified "
                                "outside the junctor")
    return errs


def parse_kinds(src: str) -> dict[str, dict]:
    """KINDS from controller/src/k8s/mod.rs: kind -> {group, versions, plural}."""
    kinds = {}
    for block in re.findall(r"KindInfo\s*\{(.*?)\}", src, re.S):
        kind = re.search(r'kind:\s*"([^"]*)"', block)
        if not kind:
            continue
        kinds[kind.group(1)] = {
            "group": re.search(r'group:\s*"([^"]*)"', block).group(1),
            "versions": re.findall(r'"([^"]+)"',
                                   re.search(r"versions:\s*&\[(.*?)\]", block, re.S).group(1)),
            "plural": re.search(r'plural:\s*"([^"]*)"', block).group(1),
        }
    return kinds


def check_crd(doc: Doc, kinds: dict, report: Report) -> None:
    spec = doc.obj.get("spec") or {}
    names = spec.get("names") or {}
    group, kind, plural = spec.get("group"), names.get("kind"), names.get("plural")
    if doc.obj["metadata"].get("name") != f"{plural}.{group}":
        report.error(doc.where, f"metadata.name must be {plural}.{group}")
    want = kinds.get(kind)
    versions = [v.get("name") for v in spec.get("versions") or []]
    if want is None:
        report.error(doc.where, f"kind {kind} is not one the controller watches "
                     f"({KINDS_RS} KINDS)")
    else:
        if (group, plural) != (want["group"], want["plural"]):
            report.error(doc.where, f"group/plural {group}/{plural} differ from the "
                         f"controller's {want['group']}/{want['plural']}")
        if sorted(versions) != sorted(want["versions"]):
            report.error(doc.where, f"versions {versions} differ from the controller's "
                         f"{want['versions']}")
    storage = [v.get("name") for v in spec.get("versions") or [] if v.get("storage")]
    if len(storage) != 1:
        report.error(doc.where, f"exactly one storage version needed, found {storage}")
    for i, v in enumerate(spec.get("versions") or []):
        if not v.get("served"):
            report.error(doc.where, f"spec.versions[{i}] ({v.get('name')}) is not served")
        schema = (v.get("schema") or {}).get("openAPIV3Schema")
        if schema is None:
            report.error(doc.where, f"spec.versions[{i}] ({v.get('name')}) has no schema")
            continue
        if schema.get("type") != "object":
            report.error(doc.where, f"spec.versions[{i}].schema.openAPIV3Schema: root must be "
                         "type object")
        for e in structural_errors(schema, [f"spec.versions[{i}].schema.openAPIV3Schema"]):
            report.error(doc.where, f"not structural: {e}")
        meta = (schema.get("properties") or {}).get("metadata")
        if meta and set((meta.get("properties") or {})) - {"name", "generateName"}:
            report.error(doc.where, "the schema may restrict only metadata.name and "
                         "metadata.generateName")


# ------------------------------------------------------------------------------------------
# 4. CRD examples against the CRD schema
# ------------------------------------------------------------------------------------------

NUMERIC_KEYS = ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems",
                "minProperties", "maxProperties", "multipleOf", "pattern", "required")


def to_json_schema(node: dict) -> dict:
    """An apiextensions (OpenAPI v3.0) schema as a strict JSON Schema 2020-12: fields the API
    server would prune (not declared, no x-kubernetes-preserve-unknown-fields) are errors."""
    out: dict = {}
    nullable = node.get("nullable") is True
    if node.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif node.get("type"):
        out["type"] = [node["type"], "null"] if nullable else node["type"]
    for k in NUMERIC_KEYS:
        if k in node:
            out[k] = node[k]
    if node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    if "enum" in node:
        out["enum"] = list(node["enum"]) + ([None] if nullable else [])
    if "properties" in node:
        out["properties"] = {k: to_json_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    elif isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"])
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # an object with no fields declared keeps none
    if isinstance(node.get("items"), dict):
        out["items"] = to_json_schema(node["items"])
    for j in ("allOf", "anyOf", "oneOf"):
        if j in node and not node.get("x-kubernetes-int-or-string"):
            out[j] = [to_json_schema(s) for s in node[j]]
    if "not" in node:
        out["not"] = to_json_schema(node["not"])
    return out


# What the API server accepts at the top of any object, beside the CRD's own properties.
OBJECT_META = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 253,
                 "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
        "namespace": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
                      "maxLength": 63},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    "additionalProperties": False,
}


def example_schema(crd: dict, version: str) -> dict | None:
    for v in crd["spec"]["versions"]:
        if v["name"] == version and v.get("served"):
            s = to_json_schema(v["schema"]["openAPIV3Schema"])
            s["properties"] = dict(s.get("properties", {}))
            s["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
            s["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
            s["properties"]["metadata"] = OBJECT_META
            s["required"] = sorted(set(s.get("required", [])) | {"apiVersion", "kind", "metadata"})
            return s
    return None


def validate_example(doc: Doc, crds: dict, report: Report) -> None:
    api_version = doc.obj.get("apiVersion", "")
    group, _, version = api_version.rpartition("/")
    crd = crds.get((group, doc.obj.get("kind")))
    if crd is None:
        report.error(doc.where, f"no CRD in manifests/crds/ for {doc.obj.get('kind')} in "
                     f"group {group!r}")
        return
    schema = example_schema(crd, version)
    if schema is None:
        report.error(doc.where, f"version {version} of {crd['metadata']['name']} is not served")
        return
    validator = jsonschema.Draft202012Validator(schema)
    errs = sorted(validator.iter_errors(doc.obj), key=lambda e: list(map(str, e.absolute_path)))
    for e in errs:
        report.error(f"{doc.where} [CRD {crd['metadata']['name']} {version}]",
                     f"{fmt_path(e.absolute_path)}: {e.message}")
    report.checked_examples += 1


# ------------------------------------------------------------------------------------------
# 5. Consistency with the code
# ------------------------------------------------------------------------------------------

def clap_interface(src: str) -> tuple[set[str], set[str]]:
    """(long flags, env var names) of the clap `Args` struct in a main.rs."""
    flags, envs = set(), set()
    for attr, fname in re.findall(r"#\[arg\(([^\]]*)\)\]\s*(?:///[^\n]*\n\s*)*(?:pub\s+)?(\w+)\s*:",
                                  src):
        m = re.search(r'long\s*=\s*"([^"]+)"', attr)
        if m:
            flags.add(m.group(1))
        elif re.search(r"\blong\b", attr):
            flags.add(fname.replace("_", "-"))
        m = re.search(r'env\s*=\s*"([^"]+)"', attr)
        if m:
            envs.add(m.group(1))
    return flags, envs


def workload_containers(obj: dict) -> list[dict]:
    if obj.get("kind") not in ("Deployment", "DaemonSet", "StatefulSet"):
        return []
    pod = ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}
    return list(pod.get("containers") or []) + list(pod.get("initContainers") or [])


def check_consistency(root: Path, docs: list[Doc], report: Report) -> None:
    version = re.search(r'\[workspace\.package\][^\[]*?version\s*=\s*"([^"]+)"',
                        (root / CARGO_TOML).read_text(), re.S).group(1)
    interfaces = {name: clap_interface((root / src).read_text())
                  for name, src in BINARIES.items()}
    for doc in docs:
        kind = doc.obj.get("kind")
        meta = doc.obj.get("metadata") or {}
        if kind not in CLUSTER_SCOPED and meta.get("namespace") != NAMESPACE:
            report.error(doc.where, f"namespaced object must set metadata.namespace: "
                         f"{NAMESPACE} (so applying the file needs no -n)")
        for c in workload_containers(doc.obj):
            declared = set()
            for p in c.get("ports") or []:
                declared |= {p.get("name"), p.get("containerPort")}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    port = ((c.get(probe) or {}).get(handler) or {}).get("port")
                    if port is not None and port not in declared:
                        report.error(doc.where, f"container {c.get('name')}: {probe} port "
                                     f"{port!r} is not a declared container port")
            image = c.get("image", "")
            want = f"ghcr.io/zmesh/{c.get('name')}:{version}"
            if image != want:
                report.error(doc.where, f"container {c.get('name')}: image {image!r}, "
                             f"expected {want!r} (workspace version {version})")
            if c.get("name") not in interfaces:
                continue
            flags, envs = interfaces[c["name"]]
            args = " ".join(c.get("args") or []) + " " + " ".join(c.get("command") or [])
            for flag in re.findall(r"(?:^|\s)--([a-z0-9-]+)", args):
                if flag not in flags | {"help", "version"}:
                    report.error(doc.where, f"container {c['name']}: --{flag} is not a flag "
                                 f"of {BINARIES[c['name']]}")
            expanded = set(re.findall(r"\$\((\w+)\)", args))
            for e in c.get("env") or []:
                if e["name"] not in envs and e["name"] not in expanded:
                    report.error(doc.where, f"container {c['name']}: env {e['name']} is "
                                 f"neither read by {BINARIES[c['name']]} nor used in args")
            for name in expanded - {e["name"] for e in c.get("env") or []}:
                report.error(doc.where, f"container {c['name']}: args use $({name}) but no "
                             "such env var is defined")
    # The controller's ClusterRole must let it list/watch every kind it watches.
    kinds = parse_kinds((root / KINDS_RS).read_text())
    roles = {d.obj["metadata"]["name"]: d for d in docs if d.obj.get("kind") == "ClusterRole"}
    role = roles.get("zmesh-controller")
    if role is None:
        report.error("manifests", "no ClusterRole zmesh-controller")
    else:
        for kind, info in kinds.items():
            ok = any(info["group"] in r.get("apiGroups", [])
                     and info["plural"] in r.get("resources", [])
                     and {"list", "watch"} <= set(r.get("verbs", []))
                     for r in role.obj.get("rules") or [])
            if not ok:
                report.error(role.where, f"no rule lets the controller list and watch "
                             f"{info['plural']}.{info['group'] or 'core'} ({kind})")
    # --node-agent must name ztunnel's ServiceAccount (the CA trusts its tokens per node).
    sas = {(d.obj["metadata"].get("namespace"), d.obj["metadata"]["name"])
           for d in docs if d.obj.get("kind") == "ServiceAccount"}
    for doc in docs:
        for c in workload_containers(doc.obj):
            for a in re.findall(r"--node-agent[= ](\S+)", " ".join(c.get("args") or [])):
                if tuple(a.split("/", 1)) not in sas:
                    report.error(doc.where, f"--node-agent {a} is not a ServiceAccount of "
                                 "the manifests")


# ------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------

PLACEHOLDER = re.compile(r"^\{\{([A-Z0-9_]+)\}\}$")


def fill_placeholders(node):
    """A template (manifests/templates/) with each whole-string placeholder "{{NAME}}" replaced
    by a plausible value, so the rendered shape can be validated; None when a placeholder is
    part of a longer string (then the shape cannot be known)."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            filled = fill_placeholders(v)
            if filled is None and v is not None:
                return None
            out[k] = filled
        return out
    if isinstance(node, list):
        out = [fill_placeholders(v) for v in node]
        return None if any(o is None and v is not None for o, v in zip(out, node)) else out
    if isinstance(node, str):
        m = PLACEHOLDER.match(node)
        if m:
            name = m.group(1)
            if name.endswith("UID"):
                return "00000000-0000-0000-0000-000000000000"
            if name.endswith("IMAGE"):
                return "ghcr.io/zmesh/example:0.0.0"
            return "example"
        return None if "{{" in node else node
    return node


def validate_tree(root: Path, versions: list[str]) -> Report:
    report = Report(k8s_versions=versions)
    mdir = root / "manifests"
    kust_path = mdir / "kustomization.yaml"
    if not kust_path.exists():
        report.error("manifests/kustomization.yaml", "missing")
        return report
    kust = yaml.safe_load(kust_path.read_text()) or {}
    resources = kust.get("resources") or []
    # 2. kustomization: every manifest listed once, in apply order.
    files = sorted(str(p.relative_to(mdir)) for p in mdir.rglob("*.yaml")
                   if p.name != "kustomization.yaml"
                   and p.relative_to(mdir).parts[0] not in ("examples", "templates"))
    for f in sorted(set(files) - set(resources)):
        report.error(f"manifests/{f}", "not listed in manifests/kustomization.yaml resources")
    for r in resources:
        if not (mdir / r).is_file():
            report.error("manifests/kustomization.yaml", f"resource {r} does not exist")
        if resources.count(r) > 1:
            report.error("manifests/kustomization.yaml", f"resource {r} is listed twice")
    if resources and resources[0] != "namespace.yaml":
        report.error("manifests/kustomization.yaml", "namespace.yaml must come first")
    crd_pos = [i for i, r in enumerate(resources) if r.startswith("crds/")]
    other_pos = [i for i, r in enumerate(resources)
                 if not r.startswith("crds/") and r != "namespace.yaml"]
    if crd_pos and other_pos and max(crd_pos) > min(other_pos):
        report.error("manifests/kustomization.yaml", "CRDs must be listed before every "
                     "other resource but the namespace")
    # 1. every manifest against the Kubernetes schema.
    docs: list[Doc] = []
    templates = sorted(str(p.relative_to(mdir)) for p in mdir.glob("templates/*.yaml"))
    to_check = list(resources) + templates
    for r in to_check:
        rel = f"manifests/{r}"
        if not (root / rel).is_file():
            continue
        for doc in load_docs(root, rel, report):
            if r.startswith("templates/"):
                filled = fill_placeholders(doc.obj)
                if filled is None:
                    report.notes.append(f"{doc.where}: skipped (a placeholder inside a string)")
                    continue
                doc = Doc(doc.path, doc.index, filled)
            if not {"apiVersion", "kind"} <= doc.obj.keys():
                report.error(doc.where, "needs apiVersion and kind")
                continue
            validate_k8s(doc, versions, report)
            report.checked_docs += 1
            if not r.startswith("templates/"):
                docs.append(doc)
    # 3. CRDs.
    kinds = parse_kinds((root / KINDS_RS).read_text())
    crds = {}
    for doc in docs:
        if doc.obj.get("kind") == "CustomResourceDefinition":
            check_crd(doc, kinds, report)
            spec = doc.obj.get("spec") or {}
            crds[(spec.get("group"), (spec.get("names") or {}).get("kind"))] = doc.obj
    # 4. examples.
    examples = sorted((mdir / "examples").glob("*.yaml"))
    covered = set()
    for p in examples:
        for doc in load_docs(root, str(p.relative_to(root)), report):
            validate_example(doc, crds, report)
            covered.add((doc.obj.get("apiVersion", "").rpartition("/")[0], doc.obj.get("kind")))
    for key in sorted(set(crds) - covered):
        report.error("manifests/examples", f"no example for CRD {key[1]} ({key[0]})")
    # 5. code consistency.
    check_consistency(root, docs, report)
    return report


def print_report(report: Report, label: str = "validate-manifests") -> int:
    for n in report.notes:
        print(f"{label}: note: {n}")
    for e in report.errors:
        print(f"{label}: ERROR {e}", file=sys.stderr)
    vs = report.k8s_versions
    span = f"{vs[0]}..{vs[-1]}" if vs else "no releases"
    if report.errors:
        print(f"{label}: FAILED with {len(report.errors)} error(s)", file=sys.stderr)
        return 1
    print(f"{label}: ok: {report.checked_docs} manifest documents valid against Kubernetes "
          f"{span} (strict), {report.checked_examples} CRD examples valid against their "
          "CRD schemas, CRD schemas structural, manifests consistent with the code")
    return 0


# ------------------------------------------------------------------------------------------
# Self-test: each deliberate breakage must be caught
# ------------------------------------------------------------------------------------------

def _edit_yaml(path: Path, index: int, fn) -> None:
    docs = list(yaml.safe_load_all(path.read_text()))
    fn(docs[index])
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def _doc_index(path: Path, kind: str) -> int:
    for i, d in enumerate(yaml.safe_load_all(path.read_text())):
        if d and d.get("kind") == kind:
            return i
    raise AssertionError(f"{path}: no {kind}")


def _pod(obj):
    return obj["spec"]["template"]["spec"]


def _crd_spec_props(obj):
    return obj["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]


def _break(kind, fn):
    def apply(m: Path):
        for f in [m / "controller.yaml", m / "ztunnel.yaml"]:
            try:
                i = _doc_index(f, kind)
            except AssertionError:
                continue
            _edit_yaml(f, i, fn)
            return
        raise AssertionError(f"no {kind} to break")
    return apply


def _break_example(name, fn):
    return lambda m: _edit_yaml(m / "examples" / name, 0, fn)


def _break_crd(name, fn):
    return lambda m: _edit_yaml(m / "crds" / name, 0, fn)


def _drop_from_kustomization(m: Path):
    k = yaml.safe_load((m / "kustomization.yaml").read_text())
    k["resources"] = [r for r in k["resources"] if r != "rbac.yaml"]
    (m / "kustomization.yaml").write_text(yaml.safe_dump(k, sort_keys=False))


def _write_bad_extra(m: Path):
    (m / "extra.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")


def _write_bad_template(m: Path):
    (m / "templates").mkdir(exist_ok=True)
    (m / "templates" / "zz-bad.yaml").write_text(
        'apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: "{{GATEWAY_NAME}}"\n'
        'automountToken: false\n')


BREAKAGES = [
    # (description, expected text in an error, breakage)
    ("unknown field in a Deployment spec",
     "Additional properties are not allowed",
     _break("Deployment", lambda d: d["spec"].update(replica=2))),
    ("wrong type: string container port",
     "is not of type 'integer'",
     _break("DaemonSet", lambda d: _pod(d)["containers"][0]["ports"][0].update(
         containerPort="http"))),
    ("unknown field in a container",
     "Additional properties are not allowed",
     _break("DaemonSet", lambda d: _pod(d)["containers"][0].update(capabilities=["BPF"]))),
    ("unknown field in a CRD example",
     "Additional properties are not allowed",
     _break_example("virtualservice-reviews.yaml", lambda d: d["spec"].update(hostz=["x"]))),
    ("enum violation in a CRD example",
     "is not one of",
     _break_example("authorizationpolicy-reviews.yaml",
                    lambda d: d["spec"].update(action="PERMIT"))),
    ("wrong type in a CRD example",
     "is not of type 'integer'",
     _break_example("destinationrule-reviews.yaml",
                    lambda d: d["spec"]["trafficPolicy"]["connectionPool"]["tcp"].update(
                        maxConnections="many"))),
    ("bad duration in a CRD example",
     "does not match",
     _break_example("virtualservice-reviews.yaml",
                    lambda d: d["spec"]["http"][1].update(timeout="half a second"))),
    ("example of an unserved version",
     "is not served",
     _break_example("serviceentry-httpbin-ext.yaml",
                    lambda d: d.update(apiVersion="networking.istio.io/v2"))),
    ("non-structural CRD schema (field without type)",
     "no type",
     _break_crd("serviceentries.networking.istio.io.yaml",
                lambda d: _crd_spec_props(d).update(untyped={"description": "x"}))),
    ("misspelled keyword in a CRD schema",
     "Additional properties are not allowed",
     _break_crd("destinationrules.networking.istio.io.yaml",
                lambda d: _crd_spec_props(d)["host"].update({"maxLenght": 253}))),
    ("CRD versions differ from the controller's",
     "differ from the controller's",
     _break_crd("peerauthentications.security.istio.io.yaml",
                lambda d: d["spec"]["versions"].pop())),
    ("manifest missing from kustomization.yaml",
     "not listed in manifests/kustomization.yaml",
     _drop_from_kustomization),
    ("manifest file not in kustomization.yaml",
     "extra.yaml: not listed",
     _write_bad_extra),
    ("unknown field in a waypoint template",
     "zz-bad.yaml document 1 (ServiceAccount example) [Kubernetes",
     _write_bad_template),
    ("probe on a port the container does not declare",
     "is not a declared container port",
     _break("Deployment", lambda d: _pod(d)["containers"][0]["readinessProbe"]["httpGet"].update(
         port="http-redy"))),
    ("container flag the binary does not have",
     "is not a flag of",
     _break("Deployment", lambda d: _pod(d)["containers"][0]["args"].append("--no-such-flag"))),
    ("image not at the workspace version",
     "expected 'ghcr.io/zmesh/",
     _break("DaemonSet", lambda d: _pod(d)["containers"][0].update(
         image="ghcr.io/zmesh/ztunnel:latest"))),
    ("controller cannot watch a kind it needs",
     "no rule lets the controller list and watch",
     lambda m: _edit_yaml(m / "rbac.yaml", _doc_index(m / "rbac.yaml", "ClusterRole"),
                          lambda d: d["rules"].pop(0))),
]


def self_test(root: Path, versions: list[str]) -> int:
    # One release is enough to see each breakage caught (the full run checks them all).
    versions = versions[:1]
    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="zmesh-validate-") as tmp:
        base = Path(tmp) / "base"
        shutil.copytree(root / "manifests", base / "manifests")
        for s in SOURCES:
            (base / s).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(root / s, base / s)
        r = validate_tree(base, versions)
        if r.errors:
            print("self-test: FAIL the unmodified copy does not validate:", file=sys.stderr)
            for e in r.errors:
                print(f"  {e}", file=sys.stderr)
            failed += 1
        else:
            passed += 1
        for i, (what, expect, breakage) in enumerate(BREAKAGES):
            case = Path(tmp) / f"case{i}"
            shutil.copytree(base, case)
            breakage(case / "manifests")
            r = validate_tree(case, versions)
            hit = [e for e in r.errors if expect in e]
            if hit:
                passed += 1
                print(f"self-test: ok   {what}: caught ({hit[0][:160]})")
            else:
                failed += 1
                print(f"self-test: FAIL {what}: not caught (expected an error containing "
                      f"{expect!r}; got {r.errors[:3]})", file=sys.stderr)
    print(f"self-test: {passed} passed, {failed} failed")
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent,
                    help="repository root (default: this script's repository)")
    ap.add_argument("--self-test", action="store_true",
                    help="check that deliberate breakages of a copy are caught")
    args = ap.parse_args()
    versions = k8s_versions()
    if not versions:
        print(f"validate-manifests: kubernetes-validate bundles no release >= {MIN_K8S}",
              file=sys.stderr)
        return 1
    if args.self_test:
        return self_test(args.root, versions)
    return print_report(validate_tree(args.root, versions))


if __name__ == "__main__":
    sys.exit(main())
