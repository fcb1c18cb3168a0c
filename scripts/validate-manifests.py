"""The body of scripts/validate-manifests (run by it, with kubernetes-validate importable).

    validate-manifests.py validate DIR VERSION...   validate the base and every overlay
    validate-manifests.py render OVERLAY_DIR        print the rendered objects as JSON

The renderer understands the kustomization keys these manifests use (`resources`, files or
directories, and `images`) and refuses any other key, so it never silently renders less
than kustomize would. STOWAGE_REFERENCE_RENDERER ("kubectl", "kustomize" or empty) names a
real kustomize to compare with.
"""

import json
import os
import re
import subprocess
import sys

import yaml

try:
    import tomllib
except ImportError:  # Python < 3.11: the pool checks are skipped (and say so).
    tomllib = None

KUSTOMIZATION = "kustomization.yaml"
SUPPORTED_KEYS = {"apiVersion", "kind", "resources", "images"}
DRIVER_CONTAINER = "stowage"
# Kinds kubernetes-validate has no schema for: checked by check_crd_object below.
CRD_KINDS = {("snapshot.storage.k8s.io/v1", "VolumeSnapshotClass")}


class RenderError(Exception):
    pass


def load_docs(path):
    with open(path) as f:
        try:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except yaml.YAMLError as e:
            raise RenderError(f"{path}: not valid YAML: {e}")
    if not docs:
        raise RenderError(f"{path}: holds no object")
    for d in docs:
        if not isinstance(d, dict) or "kind" not in d or "apiVersion" not in d:
            raise RenderError(f"{path}: a document without kind and apiVersion")
    return docs


def split_image(image):
    """(name, tag-or-digest suffix) of an image reference."""
    if "@" in image:
        name, digest = image.split("@", 1)
        return name, "@" + digest
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], ":" + image[colon + 1 :]
    return image, ""


def apply_images(objects, images):
    for entry in images:
        unknown = set(entry) - {"name", "newName", "newTag", "digest"}
        if unknown or "name" not in entry:
            raise RenderError(f"images: unsupported entry {entry}")
        for obj in objects:
            pod = obj.get("spec", {}).get("template", {}).get("spec", {})
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                name, suffix = split_image(c.get("image", ""))
                if name != entry["name"]:
                    continue
                new_name = entry.get("newName", name)
                if "digest" in entry:
                    suffix = "@" + entry["digest"]
                elif "newTag" in entry:
                    suffix = ":" + str(entry["newTag"])
                c["image"] = new_name + suffix


def render(directory, visiting=()):
    """The objects kustomize would build from `directory`."""
    directory = os.path.realpath(directory)
    for seen in visiting:
        if seen.startswith(directory + os.sep) or seen == directory:
            raise RenderError(f"cycle: {directory} contains {seen}")
    path = os.path.join(directory, KUSTOMIZATION)
    if not os.path.isfile(path):
        raise RenderError(f"{directory}: no {KUSTOMIZATION}")
    with open(path) as f:
        k = yaml.safe_load(f) or {}
    unknown = set(k) - SUPPORTED_KEYS
    if unknown:
        raise RenderError(
            f"{path}: keys {sorted(unknown)} are not understood by this renderer; "
            "keep the overlays to resources and images"
        )
    objects = []
    for res in k.get("resources") or []:
        target = os.path.join(directory, res)
        if os.path.isdir(target):
            objects += render(target, visiting + (directory,))
        elif os.path.isfile(target):
            objects += load_docs(target)
        else:
            raise RenderError(f"{path}: resource {res} does not exist")
    apply_images(objects, k.get("images") or [])
    ids = set()
    for obj in objects:
        key = object_id(obj)
        if key in ids:
            raise RenderError(f"{directory}: {key} is defined twice")
        ids.add(key)
    return objects


def object_id(obj):
    meta = obj.get("metadata", {})
    return (obj["apiVersion"], obj["kind"], meta.get("namespace") or "", meta.get("name"))


def reference_render(renderer, directory):
    cmd = [renderer, "kustomize", directory] if renderer == "kubectl" else [renderer, "build", directory]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RenderError(f"{' '.join(cmd)} failed: {out.stderr.strip()}")
    return [d for d in yaml.safe_load_all(out.stdout) if d is not None]


def kustomization_dirs(root):
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        if KUSTOMIZATION in filenames:
            found.append(dirpath)
    return found


def overlay_dirs(root):
    overlays = os.path.join(root, "overlays")
    if not os.path.isdir(overlays):
        return []
    return sorted(
        os.path.join(overlays, d)
        for d in os.listdir(overlays)
        if os.path.isfile(os.path.join(overlays, d, KUSTOMIZATION))
    )


# ----------------------------------------------------------------------------------------
# Checks


def check_listing(directory, error):
    """A kustomization lists every manifest of its directory, and nothing that is missing."""
    with open(os.path.join(directory, KUSTOMIZATION)) as f:
        k = yaml.safe_load(f) or {}
    listed = k.get("resources") or []
    files = sorted(
        f for f in os.listdir(directory) if f.endswith((".yaml", ".yml")) and f != KUSTOMIZATION
    )
    local = [r for r in listed if "/" not in r]
    for name in sorted(set(files) - set(local)):
        error(directory, f"{name} is not listed under resources")
    for name in listed:
        if not os.path.exists(os.path.join(directory, name)):
            error(directory, f"lists {name}, which does not exist")
    if len(listed) != len(set(listed)):
        error(directory, "lists a resource twice")


SNAPSHOT_CLASS_FIELDS = {"apiVersion", "kind", "metadata", "driver", "deletionPolicy", "parameters"}
METADATA_FIELDS = {"name", "labels", "annotations"}
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def check_crd_object(obj, error, what):
    """The schema of snapshot.storage.k8s.io/v1 VolumeSnapshotClass, strict, in a few lines."""
    for field in sorted(set(obj) - SNAPSHOT_CLASS_FIELDS):
        error(what, f"unknown field {field}")
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        error(what, "metadata.name is required")
        return
    if not DNS_SUBDOMAIN.match(meta["name"]):
        error(what, f"metadata.name {meta['name']!r} is not a DNS subdomain")
    for field in sorted(set(meta) - METADATA_FIELDS):
        error(what, f"unknown field metadata.{field} (or not expected here: cluster-scoped)")
    for field in ("labels", "annotations"):
        value = meta.get(field, {})
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            error(what, f"metadata.{field} must map strings to strings")
    if not isinstance(obj.get("driver"), str) or not obj["driver"]:
        error(what, "driver is required (a string)")
    if obj.get("deletionPolicy") not in ("Delete", "Retain"):
        error(what, f"deletionPolicy must be Delete or Retain, not {obj.get('deletionPolicy')!r}")
    params = obj.get("parameters", {})
    if not isinstance(params, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in params.items()
    ):
        error(what, "parameters must map strings to strings")


def container(pod, name):
    for c in pod.get("containers", []):
        if c.get("name") == name:
            return c
    return None


def check_references(objects, error, where):
    by_id = {}
    for obj in objects:
        meta = obj.get("metadata", {})
        by_id[(obj["kind"], meta.get("namespace"), meta.get("name"))] = obj

    def exists(kind, namespace, name):
        return (kind, namespace, name) in by_id

    for obj in objects:
        kind, meta = obj["kind"], obj.get("metadata", {})
        ns = meta.get("namespace")
        what = f"{where}: {kind}/{meta.get('name')}"
        if kind in ("RoleBinding", "ClusterRoleBinding"):
            ref = obj.get("roleRef", {})
            ref_ns = ns if ref.get("kind") == "Role" else None
            if not exists(ref.get("kind"), ref_ns, ref.get("name")):
                error(what, f"roleRef {ref.get('kind')}/{ref.get('name')} is not defined here")
            for s in obj.get("subjects", []):
                if s.get("kind") == "ServiceAccount" and not exists(
                    "ServiceAccount", s.get("namespace"), s.get("name")
                ):
                    error(what, f"subject ServiceAccount {s.get('namespace')}/{s.get('name')} is not defined here")
        if kind in ("DaemonSet", "Deployment", "StatefulSet"):
            spec = obj.get("spec", {})
            template = spec.get("template", {})
            pod = template.get("spec", {})
            labels = template.get("metadata", {}).get("labels", {})
            for k, v in spec.get("selector", {}).get("matchLabels", {}).items():
                if labels.get(k) != v:
                    error(what, f"selector {k}={v} does not match the pod template's labels")
            sa = pod.get("serviceAccountName")
            if sa and not exists("ServiceAccount", ns, sa):
                error(what, f"serviceAccountName {sa} is not defined here")
            volumes = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                for m in c.get("volumeMounts", []):
                    if m["name"] not in volumes:
                        error(what, f"container {c['name']} mounts undefined volume {m['name']}")
            for v in volumes.values():
                cm = v.get("configMap")
                if cm and not exists("ConfigMap", ns, cm.get("name")):
                    error(what, f"volume {v['name']} uses ConfigMap {cm.get('name')}, which is not defined here")
        if ns is not None and not exists("Namespace", None, ns):
            error(what, f"namespace {ns} is not defined here")


def check_pod_security(objects, error, where):
    """Privileged only for the driver; mount propagation only on the kubelet directory."""
    for obj in objects:
        if obj["kind"] != "DaemonSet":
            continue
        pod = obj["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod.get("containers", []):
            what = f"{where}: DaemonSet/{obj['metadata']['name']} container {c['name']}"
            privileged = (c.get("securityContext") or {}).get("privileged", False)
            if privileged and c["name"] != DRIVER_CONTAINER:
                error(what, "is privileged; only the driver container may be")
            if "resources" not in c or not {"requests", "limits"} <= set(c["resources"]):
                error(what, "has no resource requests and limits")
            for m in c.get("volumeMounts", []):
                propagation = m.get("mountPropagation")
                if propagation is None or propagation == "None":
                    continue
                host = (volumes.get(m["name"], {}).get("hostPath") or {}).get("path")
                if c["name"] != DRIVER_CONTAINER or propagation != "Bidirectional" or host != "/var/lib/kubelet":
                    error(
                        what,
                        f"mount {m['name']} ({host}) has mountPropagation {propagation}; only the "
                        "driver's kubelet directory may propagate (Bidirectional)",
                    )


def check_pools(objects, error, where):
    """The StorageClass's pool is configured; every pool lies under a hostPath the driver
    container mounts at the same path."""
    configs = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "stowage-config"]
    if len(configs) != 1:
        error(where, "needs exactly one ConfigMap stowage-config (the pool configuration)")
        return
    if tomllib is None:
        print(f"validate-manifests: {where}: pool checks skipped (no tomllib before Python 3.11)", file=sys.stderr)
        return
    try:
        config = tomllib.loads(configs[0].get("data", {}).get("config.toml", ""))
    except tomllib.TOMLDecodeError as e:
        error(where, f"config.toml is not valid TOML: {e}")
        return
    pools = {p.get("name"): p for p in config.get("pool", [])}
    if not pools:
        error(where, "config.toml declares no pool")
    mounts = []
    for obj in objects:
        if obj["kind"] != "DaemonSet":
            continue
        pod = obj["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        driver = container(pod, DRIVER_CONTAINER)
        for m in (driver or {}).get("volumeMounts", []):
            host = (volumes.get(m["name"], {}).get("hostPath") or {}).get("path")
            if host is not None and host == m["mountPath"]:
                mounts.append(host)
    for name, pool in pools.items():
        path = pool.get("path", "")
        if not any(path == h or path.startswith(h.rstrip("/") + "/") for h in mounts):
            error(where, f"pool {name} at {path} is not under a hostPath the driver mounts at the same path ({mounts})")
    classes = [o for o in objects if o["kind"] == "StorageClass"]
    if not classes:
        error(where, "has no StorageClass")
    for sc in classes:
        pool = (sc.get("parameters") or {}).get("pool")
        if pool not in pools:
            error(where, f"StorageClass {sc['metadata']['name']} names pool {pool!r}, not in config.toml ({sorted(pools)})")


def canonical(objects):
    return sorted(json.dumps(o, sort_keys=True) for o in objects)


def validate(root, versions):
    import kubernetes_validate
    from kubernetes_validate import SchemaNotFoundError, ValidationError

    errors = []

    def error(where, message):
        errors.append(f"{where}: {message}")

    reference = os.environ.get("STOWAGE_REFERENCE_RENDERER", "")
    dirs = kustomization_dirs(root)
    if not dirs:
        error(root, "no kustomization found")
    for d in dirs:
        check_listing(d, error)
    overlays = overlay_dirs(root)
    if not overlays:
        error(root, "no overlays (overlays/<name>/kustomization.yaml)")

    checked = 0
    objects_total = 0
    for overlay in overlays:
        where = os.path.relpath(overlay, root)
        try:
            objects = render(overlay)
        except RenderError as e:
            error(where, str(e))
            continue
        objects_total += len(objects)
        if reference:
            try:
                theirs = reference_render(reference, overlay)
                if canonical(theirs) != canonical(objects):
                    ours_ids = sorted(map(object_id, objects))
                    their_ids = sorted(map(object_id, theirs))
                    error(where, f"{reference} kustomize renders something else: ours {ours_ids}, theirs {their_ids}")
            except RenderError as e:
                error(where, str(e))
        for obj in objects:
            what = f"{where}: {obj['kind']}/{obj.get('metadata', {}).get('name', '?')}"
            if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
                check_crd_object(obj, error, what)
                checked += 1
                continue
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                    checked += 1
                except ValidationError as e:
                    field = ".".join(str(p) for p in e.path) or "(top)"
                    error(what, f"Kubernetes {version}: {field}: {e.message}")
                except SchemaNotFoundError as e:
                    error(what, e.message)
        check_references(objects, error, where)
        check_pod_security(objects, error, where)
        check_pools(objects, error, where)

    for e in errors:
        print(f"ERROR {e}")
    if errors:
        print(f"validate-manifests: {len(errors)} error(s) in {root}", file=sys.stderr)
        return 1
    names = ", ".join(os.path.basename(o) for o in overlays)
    agreed = f"; {reference} kustomize renders the same" if reference else "; no kustomize to compare with"
    print(
        f"validate-manifests: overlays {names}: {objects_total} rendered objects "
        f"valid against Kubernetes {', '.join(versions)} "
        f"(kubernetes-validate {kubernetes_validate.__version__}, strict; "
        f"{checked} schema checks{agreed})"
    )
    return 0


def main():
    mode, target = sys.argv[1], sys.argv[2]
    if mode == "render":
        try:
            json.dump(render(target), sys.stdout)
        except RenderError as e:
            print(f"ERROR {e}")
            return 1
        return 0
    return validate(target, sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
