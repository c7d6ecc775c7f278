"""deploy/k8s/ checked offline, without a cluster: every YAML document parses and the kustomization lists every
file; core kinds validate against the Kubernetes 1.33 and 1.35 schemas (kubernetes-validate, strict: an unknown field
fails); the Gateway API Inference Extension v1.4.0 kinds and the HTTPRoute against the schemas below, written from
the fields of those CRDs; and the objects agree with each other and with `adalora serve`: the container's args
parse with the real CLI into a valid ServerConfig whose ports are the container's, the Service's and the pool's,
the probes read /healthz on the metrics port, termination outlasts the drain, and the pool, its endpoint picker,
the objectives, the model rewrites, the LoRA syncer's list and the route all name the same things.

The extension schemas are sound, not complete: what they accept the v1.4.0 CRDs accept (required fields, types,
enums, bounds, the CEL rules as JSON Schema), but a CRD field these manifests do not use is refused until it is added
here from the CRD. Not checked: anything a live API server or controller decides (defaulting, admission, status)."""

from __future__ import annotations

import copy
import functools
import posixpath
import re
from collections.abc import Callable
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from adalora.cli import build_parser
from adalora.server.commands import serve as serve_command
from adalora.server.config import ServerConfig
from adalora.server.gate import Gate
from adalora.server.http import HttpApi
from adalora.server.metrics import Metrics, exposition
from adalora.server.store import ID_PATTERN

K8S = Path(__file__).resolve().parents[1] / "deploy" / "k8s"
KUBERNETES_VERSIONS = ("1.33", "1.35")
"""The Kubernetes minors GIE v1.4.0 supports (its three most recent at release; go.mod: k8s.io/api v0.35)."""
CORE_API_VERSIONS = ("v1", "apps/v1", "rbac.authorization.k8s.io/v1")
POOL_API, ALPHA_API = "inference.networking.k8s.io/v1", "inference.networking.x-k8s.io/v1alpha2"
ROUTE_API = "gateway.networking.k8s.io/v1"
GENERATION_ROUTES = {"/v1/completions", "/v1/chat/completions"}
"""The server's routes the HTTPRoute may send through the endpoint picker (POST bodies naming a "model")."""
EPP_METRICS = ("vllm:num_requests_waiting", "vllm:num_requests_running", "vllm:kv_cache_usage_perc",
               "vllm:lora_requests_info")
"""What the v1.4.0 endpoint picker scrapes by default (pkg/epp/server/options.go); vllm:cache_config_info, the
optional fifth, only feeds the prefix-cache scorer, which epp.yaml leaves out."""
SYNCER_CONFIG_ENV = "DYNAMIC_LORA_ROLLOUT_CONFIG"


# ---- the manifests --------------------------------------------------------------------------------------------

@functools.cache
def documents() -> tuple[tuple[str, dict], ...]:
    """(file name, document) of every YAML document under deploy/k8s, in file order. Read-only: copy to mutate."""
    return tuple((path.name, doc) for path in sorted(K8S.glob("*.yaml"))
                 for doc in yaml.safe_load_all(path.read_text()) if doc is not None)


def objects(kind: str) -> list[dict]:
    return [doc for _, doc in documents() if doc["kind"] == kind]


def one(kind: str, name: str) -> dict:
    (found,) = [doc for doc in objects(kind) if doc["metadata"]["name"] == name]
    return found


def config_map_file(name: str, key: str) -> object:
    return yaml.safe_load(one("ConfigMap", name)["data"][key])


def pod_spec(deployment: str) -> dict:
    return one("Deployment", deployment)["spec"]["template"]["spec"]


def container(deployment: str, name: str) -> dict:
    spec = pod_spec(deployment)
    (found,) = [c for c in spec["containers"] + spec.get("initContainers", []) if c["name"] == name]
    return found


def port_number(c: dict, port: int | str) -> int:
    """A probe's or a Service's target port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in c["ports"] if p.get("name") == port]
    return number


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def mount_of(deployment: str, c: dict, volume: str) -> dict:
    """The mount of `volume` in container `c`, with the pod's volume source under "source"."""
    (source,) = [v for v in pod_spec(deployment)["volumes"] if v["name"] == volume]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume]
    return {**mount, "source": source}


@functools.cache
def served() -> ServerConfig:
    """The server container's args through the real `adalora` CLI (the image's ENTRYPOINT), as ServerConfig."""
    args = build_parser()[0].parse_args(container("adalora", "server")["args"])
    assert args.command == "serve"
    return serve_command.config_from(args)


def syncer_models() -> list[dict]:
    path = posixpath.basename(env_value(container("adalora", "lora-syncer"), SYNCER_CONFIG_ENV))
    return config_map_file("adalora-lora-syncer", path)["vLLMLoRAConfig"]["ensureExist"]["models"]


def env_value(c: dict, name: str) -> str:
    (value,) = [e["value"] for e in c["env"] if e["name"] == name]
    return value


def secret_ref(c: dict, name: str) -> dict:
    (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == name]
    return ref


# ---- the schemas of the extension's kinds, from the v1.4.0 CRDs ----------------------------------------------

def obj(required: tuple[str, ...] = (), **properties) -> dict:
    """A JSON Schema object with exactly these properties (an unknown one fails)."""
    return {"type": "object", "additionalProperties": False, "required": list(required), "properties": properties}


def array(items: dict, min_items: int = 0, max_items: int | None = None) -> dict:
    return {"type": "array", "items": items, "minItems": min_items, **({"maxItems": max_items} if max_items else {})}


DNS_SUBDOMAIN = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
GROUP = {"type": "string", "maxLength": 253, "pattern": DNS_SUBDOMAIN}
KIND = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"}
NAME = {"type": "string", "minLength": 1, "maxLength": 253}
NAMESPACE = {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}
PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
INT32 = {"type": "integer", "minimum": -2**31, "maximum": 2**31 - 1}
STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
DURATION = {"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"}
METADATA = obj(("name",), name=NAME, namespace=NAMESPACE, labels=STRINGS, annotations=STRINGS)
POOL_REF = obj(("name",), group=GROUP, kind=KIND, name=NAME)
"""PoolObjectReference (apix/v1alpha2): group defaults to inference.networking.k8s.io, kind to InferencePool."""


def resource(api_version: str, kind: str, spec: dict) -> dict:
    return obj(("apiVersion", "kind", "metadata", "spec"), apiVersion={"const": api_version}, kind={"const": kind},
               metadata=METADATA, spec=spec)


INFERENCE_POOL = resource(POOL_API, "InferencePool", obj(
    ("endpointPickerRef", "selector", "targetPorts"),
    selector=obj(("matchLabels",), matchLabels={
        "type": "object", "minProperties": 1, "maxProperties": 64,
        "additionalProperties": {"type": "string", "maxLength": 63,
                                 "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"}}),
    targetPorts={**array(obj(("number",), number=PORT), 1, 8), "uniqueItems": True},  # CEL: numbers unique
    appProtocol={"enum": ["http", "kubernetes.io/h2c"]},
    endpointPickerRef={
        **obj(("name",), group=GROUP, kind=KIND, name=NAME, port=obj(("number",), number=PORT),
              failureMode={"enum": ["FailOpen", "FailClose"]}),
        # CEL: "port is required when kind is 'Service' or unspecified (defaults to 'Service')"
        "if": {"required": ["kind"], "properties": {"kind": {"not": {"const": "Service"}}}},
        "else": {"required": ["port"]}}))
INFERENCE_OBJECTIVE = resource(ALPHA_API, "InferenceObjective", obj(("poolRef",), poolRef=POOL_REF, priority=INT32))
INFERENCE_MODEL_REWRITE = resource(ALPHA_API, "InferenceModelRewrite", obj(
    ("poolRef", "rules"), poolRef=POOL_REF,
    rules=array(obj(
        matches=array(obj(("model",), model=obj(("value",), type={"enum": ["Exact"]},
                                               value={"type": "string", "minLength": 1}))),
        targets=array(obj(("modelRewrite",), modelRewrite={"type": "string"},
                          weight={"type": "integer", "minimum": 1, "maximum": 1_000_000}), 1)))))
HTTP_ROUTE = resource(ROUTE_API, "HTTPRoute", obj(
    parentRefs=array(obj(("name",), group=GROUP, kind=KIND, namespace=NAMESPACE, name=NAME,
                         sectionName={"type": "string", "minLength": 1, "maxLength": 253}, port=PORT), 0, 32),
    hostnames=array({"type": "string", "minLength": 1, "maxLength": 253}, 0, 16),
    rules=array(obj(
        name={"type": "string", "minLength": 1, "maxLength": 253},
        matches=array(obj(
            path=obj(type={"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                     value={"type": "string", "maxLength": 1024}),
            headers=array(obj(("name", "value"), type={"enum": ["Exact", "RegularExpression"]},
                              name={"type": "string", "minLength": 1, "maxLength": 256},
                              value={"type": "string", "minLength": 1, "maxLength": 4096}), 0, 16),
            method={"enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]}),
            0, 64),
        backendRefs=array(obj(("name",), group=GROUP, kind=KIND, name=NAME, namespace=NAMESPACE, port=PORT,
                              weight={"type": "integer", "minimum": 0, "maximum": 1_000_000}), 0, 16),
        timeouts=obj(request=DURATION, backendRequest=DURATION)), 1, 16)))
"""Gateway API v1.5.0, standard channel (config/crd/standard/gateway.networking.k8s.io_httproutes.yaml)."""
KUSTOMIZATION = obj(("apiVersion", "kind", "resources"), apiVersion={"const": "kustomize.config.k8s.io/v1beta1"},
                    kind={"const": "Kustomization"}, resources=array({"type": "string"}, 1), namespace=NAMESPACE,
                    images=array(obj(("name",), name=NAME, newName=NAME, newTag=NAME, digest=NAME)))
"""What docs/DEPLOY.md has an operator add: `kustomize edit set image` and `kustomize edit set namespace`."""
SCHEMAS = {(POOL_API, "InferencePool"): INFERENCE_POOL, (ALPHA_API, "InferenceObjective"): INFERENCE_OBJECTIVE,
           (ALPHA_API, "InferenceModelRewrite"): INFERENCE_MODEL_REWRITE, (ROUTE_API, "HTTPRoute"): HTTP_ROUTE,
           ("kustomize.config.k8s.io/v1beta1", "Kustomization"): KUSTOMIZATION}

LORA_MODELS = array(obj(("id", "source"), id={"type": "string"}, source={"type": "string"},
                        **{"base-model": {"type": "string"}}))
SYNCER_CONFIG = obj(("vLLMLoRAConfig",), vLLMLoRAConfig=obj(
    host={"type": "string"}, port={"type": "integer"}, name={"type": "string"}, defaultBaseModel={"type": "string"},
    ensureExist=obj(("models",), models=LORA_MODELS), ensureNotExist=obj(("models",), models=LORA_MODELS)))
"""The syncer's vLLMLoRAConfig (tools/dynamic-lora-sidecar/sidecar/validation.yaml, v1.4.0), stricter than the
syncer itself: it ignores a misspelt key, which then silently does nothing."""
EPP_PLUGINS = ("queue-scorer", "kv-cache-utilization-scorer", "lora-affinity-scorer", "prefix-cache-scorer",
               "running-requests-size-scorer", "max-score-picker", "random-picker", "weighted-random-picker",
               "single-profile-handler")
"""Plugin types of v1.4.0's endpoint picker (pkg/epp/framework/plugins/scheduling) this schema admits."""
EPP_CONFIG = obj(
    ("apiVersion", "kind"), apiVersion={"const": "inference.networking.x-k8s.io/v1alpha1"},
    kind={"const": "EndpointPickerConfig"},
    plugins=array(obj(("type",), type={"enum": list(EPP_PLUGINS)}, name={"type": "string"},
                      parameters={"type": "object"})),
    schedulingProfiles=array(obj(("name", "plugins"), name={"type": "string"}, plugins=array(
        obj(("pluginRef",), pluginRef={"type": "string"}, weight={"type": "integer"})))),
    saturationDetector=obj(queueDepthThreshold={"type": "integer"}, kvCacheUtilThreshold={"type": "number"},
                           metricsStalenessThreshold={"type": "string"}),
    featureGates=array({"type": "string"}))


def validate(doc: dict, schema: dict) -> None:
    jsonschema.Draft202012Validator(schema).validate(doc)


def validate_extension(doc: dict) -> None:
    validate(doc, SCHEMAS[doc["apiVersion"], doc["kind"]])


def validate_core(doc: dict) -> None:
    for version in KUBERNETES_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


# ---- every file, every document -------------------------------------------------------------------------------

def test_every_document_parses_and_the_kustomization_lists_every_file():
    (kustomization,) = objects("Kustomization")
    listed = kustomization["resources"]
    assert len(set(listed)) == len(listed), listed
    on_disk = {p.name for p in K8S.iterdir()} - {"kustomization.yaml"}
    assert set(listed) == on_disk, f"listed but missing: {set(listed) - on_disk}; not listed: {on_disk - set(listed)}"
    api_versions = {doc["apiVersion"] for _, doc in documents()}
    assert api_versions <= set(CORE_API_VERSIONS) | {api for api, _ in SCHEMAS}, api_versions  # all validated below


def ids(table: list[tuple[str, dict]]) -> list[str]:
    return [f"{name}:{doc['kind']}:{doc.get('metadata', {}).get('name', '')}" for name, doc in table]


CORE = [(name, doc) for name, doc in documents() if doc["apiVersion"] in CORE_API_VERSIONS]
EXTENSION = [(name, doc) for name, doc in documents() if doc["apiVersion"] not in CORE_API_VERSIONS]


@pytest.mark.parametrize("name, doc", CORE, ids=ids(CORE))
def test_core_objects_match_the_kubernetes_schemas(name, doc):
    validate_core(doc)


@pytest.mark.parametrize("name, doc", EXTENSION, ids=ids(EXTENSION))
def test_extension_objects_match_their_crd_schemas(name, doc):
    validate_extension(doc)


def test_the_config_files_inside_config_maps_match_their_formats():
    validate(config_map_file("adalora-lora-syncer", "configmap.yaml"), SYNCER_CONFIG)
    epp = config_map_file("adalora-epp", "epp-config.yaml")
    validate(epp, EPP_CONFIG)
    defined = {p.get("name", p["type"]) for p in epp["plugins"]}
    for profile in epp["schedulingProfiles"]:
        assert {p["pluginRef"] for p in profile["plugins"]} <= defined, profile
    assert "prefix-cache-scorer" not in defined  # the server reuses no KV cache across requests


# ---- the validators refuse what the API server would --------------------------------------------------------

def parent(doc: dict, path: tuple) -> tuple[dict | list, str | int]:
    """The container of the node at `path` (keys and list indices) in `doc`, and the node's key there."""
    *parents, key = path
    return functools.reduce(lambda node, k: node[k], parents, doc), key


def renamed(path: tuple, new: str) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        node, key = parent(doc, path)
        node[new] = node.pop(key)
    return change


def set_at(path: tuple, value: object) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        node, key = parent(doc, path)
        node[key] = value
    return change


def deleted(path: tuple) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        node, key = parent(doc, path)
        del node[key]
    return change


def config_map_doc(name: str, key: str) -> Callable[[], dict]:
    return lambda: copy.deepcopy(config_map_file(name, key))


def first(kind: str) -> Callable[[], dict]:
    return lambda: copy.deepcopy(objects(kind)[0])


REFUSED = [
    # (what, the document, the change, the validator)
    ("pool: targetPort for targetPorts", first("InferencePool"), renamed(("spec", "targetPorts"), "targetPort"),
     validate_extension),
    ("pool: picker Service without a port", first("InferencePool"), deleted(("spec", "endpointPickerRef", "port")),
     validate_extension),
    ("pool: port number as a string", first("InferencePool"), set_at(("spec", "targetPorts", 0, "number"), "8000"),
     validate_extension),
    ("pool: a repeated target port", first("InferencePool"),
     set_at(("spec", "targetPorts"), [{"number": 8000}, {"number": 8000}]), validate_extension),
    ("objective: poolref for poolRef", first("InferenceObjective"), renamed(("spec", "poolRef"), "poolref"),
     validate_extension),
    ("objective: priority as a word", first("InferenceObjective"), set_at(("spec", "priority"), "high"),
     validate_extension),
    ("rewrite: weight 0", first("InferenceModelRewrite"), set_at(("spec", "rules", 0, "targets", 0, "weight"), 0),
     validate_extension),
    ("rewrite: Prefix match", first("InferenceModelRewrite"),
     set_at(("spec", "rules", 0, "matches", 0, "model", "type"), "Prefix"), validate_extension),
    ("route: backendRef kinds", first("HTTPRoute"), renamed(("spec", "rules", 0, "backendRefs", 0, "kind"), "kinds"),
     validate_extension),
    ("route: timeout in words", first("HTTPRoute"), set_at(("spec", "rules", 0, "timeouts", "request"), "5 minutes"),
     validate_extension),
    ("deployment: terminationGracePeriod", first("Deployment"),
     renamed(("spec", "template", "spec", "terminationGracePeriodSeconds"), "terminationGracePeriod"), validate_core),
    ("service: port as a word", first("Service"), set_at(("spec", "ports", 0, "port"), "eighty"), validate_core),
    ("syncer: ensureExists", config_map_doc("adalora-lora-syncer", "configmap.yaml"),
     renamed(("vLLMLoRAConfig", "ensureExist"), "ensureExists"), lambda d: validate(d, SYNCER_CONFIG)),
    ("picker: an unknown plugin", config_map_doc("adalora-epp", "epp-config.yaml"),
     set_at(("plugins", 0, "type"), "lora-affinity"), lambda d: validate(d, EPP_CONFIG)),
]


@pytest.mark.parametrize("what, make, change, check", REFUSED, ids=[row[0] for row in REFUSED])
def test_the_validators_refuse_a_broken_document(what, make, change, check):
    doc = make()
    check(doc)  # the document as shipped passes
    change(doc)
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        check(doc)


# ---- the server pod agrees with `adalora serve` ---------------------------------------------------------------

def test_the_server_args_parse_with_adalora_serve_and_use_the_declared_ports():
    server, config = container("adalora", "server"), served()
    assert "command" not in server  # the image's ENTRYPOINT, `adalora`, runs the args
    assert server["image"].split("/")[-1].split(":")[0] == "adalora"
    assert config.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert ports == {"grpc": config.port, "http": config.http_port, "metrics": config.metrics_port}
    assert config.admin_credentials or not config.admin_open  # admin never open to the network
    assert secret_ref(server, "ADALORA_ADMIN_TOKEN")["optional"] is True  # no Secret: admin stays closed


def test_the_service_reaches_the_servers_ports():
    service, server, config = one("Service", "adalora"), container("adalora", "server"), served()
    labels = one("Deployment", "adalora")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    targets = {p["name"]: port_number(server, p["targetPort"]) for p in service["spec"]["ports"]}
    assert targets == {"grpc": config.port, "http": config.http_port, "metrics": config.metrics_port}


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_the_probes_read_healthz_on_the_metrics_port(probe):
    server = container("adalora", "server")
    get = server[probe]["httpGet"]
    assert get["path"] == "/healthz"
    assert port_number(server, get["port"]) == served().metrics_port


def test_termination_outlasts_the_drain():
    server, spec, config = container("adalora", "server"), pod_spec("adalora"), served()
    grace, delay = config.grace_s, config.drain_delay_s
    pre_stop = server.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert spec["terminationGracePeriodSeconds"] > pre_stop + delay + grace
    readiness, liveness = server["readinessProbe"], server["livenessProbe"]
    # the picker sees the pod not Ready while it still takes requests: none it sends meets a closed port
    assert readiness["failureThreshold"] * readiness["periodSeconds"] < delay
    assert liveness["failureThreshold"] * liveness["periodSeconds"] > delay + grace  # never restarted mid-drain
    assert pod_spec("adalora-epp")["terminationGracePeriodSeconds"] >= spec["terminationGracePeriodSeconds"]


def test_the_volumes_hold_the_servers_paths_read_only():
    server, config = container("adalora", "server"), served()
    replicas = one("Deployment", "adalora")["spec"]["replicas"]
    for volume, path in (("base-model", config.base_model), ("adapters", config.adapter_dir)):
        mount = mount_of("adalora", server, volume)
        assert mount["mountPath"] == path and mount["readOnly"] is True, mount
        claim = one("PersistentVolumeClaim", mount["source"]["persistentVolumeClaim"]["claimName"])
        if replicas > 1:  # every replica mounts the same volume, on any node
            assert {"ReadWriteMany", "ReadOnlyMany"} & set(claim["spec"]["accessModes"]), claim


def test_the_syncer_reads_its_config_map_as_a_folder():
    syncer = container("adalora", "lora-syncer")
    assert syncer in pod_spec("adalora")["initContainers"] and syncer["restartPolicy"] == "Always"  # a sidecar
    assert not re.search(r":(latest|main)$", syncer["image"]), syncer["image"]
    path = env_value(syncer, SYNCER_CONFIG_ENV)
    mount = mount_of("adalora", syncer, "lora-syncer-config")
    assert "subPath" not in mount  # a subPath mount never sees the ConfigMap change
    assert mount["mountPath"] == posixpath.dirname(path)
    assert posixpath.basename(path) in one("ConfigMap", mount["source"]["configMap"]["name"])["data"]


def test_the_server_exports_what_the_endpoint_picker_reads():
    """The targeted picker scrapes GET /metrics on the pool's target port: the HTTP API's, which serves it."""
    config = served()
    metrics = Metrics(config.max_slots, config.max_batch_size)
    api = HttpApi(config, Gate(), metrics)
    assert "/metrics" in {route.path for route in api.app.routes}
    body, _ = exposition(metrics.registry, None)
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert set(EPP_METRICS) <= set(families), set(EPP_METRICS) - set(families)
    (lora,) = families["vllm:lora_requests_info"].samples
    assert lora.labels["max_lora"] == str(config.max_slots)


# ---- the pool, its picker and the adapters name the same things -----------------------------------------------

def test_the_pool_selects_the_server_pods_on_the_http_port():
    (pool,) = objects("InferencePool")
    spec, config = pool["spec"], served()
    selector = spec["selector"]["matchLabels"].items()
    assert selector <= one("Deployment", "adalora")["spec"]["template"]["metadata"]["labels"].items()
    assert not selector <= one("Deployment", "adalora-epp")["spec"]["template"]["metadata"]["labels"].items()
    assert [p["number"] for p in spec["targetPorts"]] == [config.http_port]
    assert spec["appProtocol"] == "http"  # uvicorn: HTTP/1.1 only


def test_the_pool_and_its_endpoint_picker_point_at_each_other():
    (pool,) = objects("InferencePool")
    ref, epp = pool["spec"]["endpointPickerRef"], container("adalora-epp", "epp")
    assert ref.get("kind", "Service") == "Service" and ref.get("group", "") == ""
    service = one("Service", ref["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert port_number(epp, port["targetPort"]) == 9002  # the picker's ext-proc port
    assert service["spec"]["selector"].items() <= one("Deployment", "adalora-epp")["spec"]["template"]["metadata"][
        "labels"].items()
    args = epp["args"]
    assert flag(args, "--pool-name") == pool["metadata"]["name"]
    assert flag(args, "--pool-group") == pool["apiVersion"].split("/")[0]
    config_path = flag(args, "--config-file")
    mount = mount_of("adalora-epp", epp, "config")
    assert posixpath.dirname(config_path) == mount["mountPath"]
    assert posixpath.basename(config_path) in one("ConfigMap", mount["source"]["configMap"]["name"])["data"]


def test_the_endpoint_picker_may_read_what_it_watches():
    deployment = one("Deployment", "adalora-epp")
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    assert one("ServiceAccount", account)
    (binding,) = [b for b in objects("RoleBinding") if {"kind": "ServiceAccount", "name": account} in b["subjects"]]
    rules = one("Role", binding["roleRef"]["name"])["rules"]
    watched = {("", "pods")} | {(doc["apiVersion"].split("/")[0], doc["kind"].lower() + "s")
                                for doc in objects("InferencePool") + objects("InferenceObjective")
                                + objects("InferenceModelRewrite")}
    for group, plural in watched:
        assert any(group in r["apiGroups"] and plural in r["resources"]
                   and {"get", "list", "watch"} <= set(r["verbs"]) for r in rules), (group, plural)


def test_every_adapter_has_an_objective_a_rewrite_and_a_syncer_entry():
    (pool,) = objects("InferencePool")
    config = served()
    for doc in objects("InferenceObjective") + objects("InferenceModelRewrite"):
        ref = doc["spec"]["poolRef"]
        assert ref["name"] == pool["metadata"]["name"], doc["metadata"]
        assert ref.get("group", "inference.networking.k8s.io") == pool["apiVersion"].split("/")[0]
        assert ref.get("kind", "InferencePool") == "InferencePool"
    objectives = {doc["metadata"]["name"] for doc in objects("InferenceObjective")}
    rewrites = {doc["metadata"]["name"]: doc["spec"]["rules"] for doc in objects("InferenceModelRewrite")}
    assert objectives == set(rewrites)  # one of each per client-facing adapter name
    targets = set()
    for name, rules in rewrites.items():
        assert {m["model"]["value"] for rule in rules for m in rule["matches"]} == {name}
        targets |= {t["modelRewrite"] for rule in rules for t in rule["targets"]}
    assert all(ID_PATTERN.fullmatch(t) for t in targets), targets  # store ids, served by folder name
    assert config.model_name not in targets | set(rewrites)
    models = syncer_models()
    assert {m["id"] for m in models} == targets
    assert all(m["source"] == posixpath.join(config.adapter_dir, m["id"]) for m in models), models
    syncer_config = config_map_file("adalora-lora-syncer", "configmap.yaml")["vLLMLoRAConfig"]
    assert "ensureNotExist" not in syncer_config  # its unload calls cannot authenticate (docs/DEPLOY.md)
    assert (syncer_config["host"], syncer_config["port"]) == ("localhost", config.http_port)
    assert syncer_config["defaultBaseModel"] == config.model_name


def duration_seconds(text: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    return sum(int(n) * units[u] for n, u in re.findall(r"([0-9]+)(h|ms|m|s)", text))


def test_the_route_sends_the_generation_routes_to_the_pool():
    (route,) = objects("HTTPRoute")
    (pool,) = objects("InferencePool")
    config = served()
    routes = {r.path: r.methods for r in HttpApi(config, Gate(), Metrics(config.max_slots)).app.routes
              if hasattr(r, "methods")}
    for rule in route["spec"]["rules"]:
        assert rule["backendRefs"] == [{"group": "inference.networking.k8s.io", "kind": "InferencePool",
                                        "name": pool["metadata"]["name"]}]
        paths = {m["path"]["value"] for m in rule["matches"]}
        assert paths <= GENERATION_ROUTES and all("POST" in routes[p] for p in paths), paths
        # the server's own deadline (504 with its reason) comes before the gateway's
        assert duration_seconds(rule["timeouts"]["request"]) > config.http_timeout_s
    assert duration_seconds("1m30s") == 90 and duration_seconds("250ms") == 0.25
