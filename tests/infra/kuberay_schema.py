"""A JSON schema (draft 2020-12) for the KubeRay manifests in infra/cluster/, unknown fields rejected.

Written by hand from KubeRay's published CRDs (ray-project/kuberay,
ray-operator/config/crd/bases/ray.io_rayclusters.yaml and ray.io_rayjobs.yaml, API version ray.io/v1,
read at commit feeaf72) and the Kubernetes core/v1 PodSpec/Container/Volume fields those CRDs embed.
The real CRDs reject nothing that the API server prunes silently: a typo such as ``tolerations`` spelled
``toleration`` is dropped on ``kubectl apply`` and the GPU pods then never schedule. So every object this
project's manifests use is modelled with ``additionalProperties: false``; its field names are the CRD's
complete list at that level, and objects we do not use are accepted by name without a deeper model.
"""

from __future__ import annotations

from typing import Any

# Kubernetes quantity ("4", "16Gi", "500m"), the pattern the CRDs carry for resource lists.
QUANTITY = {
    "anyOf": [{"type": "integer"}, {"type": "string"}],
    "pattern": (
        r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
        r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
    ),
}
STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def closed(properties: dict[str, Any], required: tuple[str, ...] = (), *, unmodelled: tuple[str, ...] = ()) -> dict:
    """An object with exactly these fields: ``properties`` modelled, ``unmodelled`` accepted by name only."""
    return {
        "type": "object",
        "properties": {**{name: {} for name in unmodelled}, **properties},
        "required": list(required),
        "additionalProperties": False,
    }


OBJECT_META = closed(
    {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": STRING_MAP, "annotations": STRING_MAP},
    unmodelled=("finalizers", "generateName", "ownerReferences"),
)
RESOURCE_LIST = {"type": "object", "additionalProperties": QUANTITY}
RESOURCES = closed(
    {"requests": RESOURCE_LIST, "limits": RESOURCE_LIST},
    unmodelled=("claims",),
)
CONTAINER = closed(
    {
        "name": {"type": "string"},
        "image": {"type": "string", "minLength": 1},
        "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        "resources": RESOURCES,
        "ports": {
            "type": "array",
            "items": closed(
                {"containerPort": {"type": "integer"}, "name": {"type": "string"}, "protocol": {"type": "string"}},
                ("containerPort",),
                unmodelled=("hostIP", "hostPort"),
            ),
        },
        "volumeMounts": {
            "type": "array",
            "items": closed(
                {"name": {"type": "string"}, "mountPath": {"type": "string"}, "readOnly": {"type": "boolean"}},
                ("mountPath", "name"),
                unmodelled=("mountPropagation", "recursiveReadOnly", "subPath", "subPathExpr"),
            ),
        },
        "env": {
            "type": "array",
            "items": closed(
                {"name": {"type": "string"}, "value": {"type": "string"}}, ("name",), unmodelled=("valueFrom",)
            ),
        },
    },
    ("name",),
    unmodelled=(
        "args", "command", "envFrom", "lifecycle", "livenessProbe", "readinessProbe", "resizePolicy", "restartPolicy",
        "restartPolicyRules", "securityContext", "startupProbe", "stdin", "stdinOnce", "terminationMessagePath",
        "terminationMessagePolicy", "tty", "volumeDevices", "workingDir",
    ),
)  # fmt: skip
VOLUME = closed(
    {
        "name": {"type": "string"},
        "emptyDir": closed({"medium": {"enum": ["", "Memory"]}, "sizeLimit": QUANTITY}),
    },
    ("name",),
    unmodelled=(
        "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi", "downwardAPI",
        "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk", "gitRepo", "glusterfs", "hostPath", "image",
        "iscsi", "nfs", "persistentVolumeClaim", "photonPersistentDisk", "portworxVolume", "projected", "quobyte",
        "rbd", "scaleIO", "secret", "storageos", "vsphereVolume",
    ),
)  # fmt: skip
TOLERATION = closed(
    {
        "key": {"type": "string"},
        "operator": {"enum": ["Exists", "Equal"]},
        "value": {"type": "string"},
        "effect": {"enum": ["NoSchedule", "PreferNoSchedule", "NoExecute"]},
        "tolerationSeconds": {"type": "integer"},
    }
)
POD_SPEC = closed(
    {
        "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
        "volumes": {"type": "array", "items": VOLUME},
        "tolerations": {"type": "array", "items": TOLERATION},
        "nodeSelector": STRING_MAP,
        "serviceAccountName": {"type": "string"},
    },
    ("containers",),
    unmodelled=(
        "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "dnsConfig", "dnsPolicy",
        "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork", "hostPID", "hostUsers",
        "hostname", "hostnameOverride", "imagePullSecrets", "initContainers", "nodeName", "os", "overhead",
        "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims", "resources",
        "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "schedulingGroup", "securityContext",
        "serviceAccount", "setHostnameAsFQDN", "shareProcessNamespace", "subdomain", "terminationGracePeriodSeconds",
        "topologySpreadConstraints",
    ),
)  # fmt: skip
POD_TEMPLATE = closed({"metadata": OBJECT_META, "spec": POD_SPEC}, ("spec",))
# rayStartParams are `ray start` flags as strings: KubeRay rejects `num-cpus: 0` (an integer).
RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
HEAD_GROUP = closed(
    {"rayStartParams": RAY_START_PARAMS, "template": POD_TEMPLATE, "serviceType": {"type": "string"}},
    ("template",),
    unmodelled=("enableIngress", "headService", "ingressOptions", "labels", "resources"),
)
WORKER_GROUP = closed(
    {
        "groupName": {"type": "string", "minLength": 1},
        "minReplicas": {"type": "integer", "minimum": 0},
        "maxReplicas": {"type": "integer", "minimum": 0},
        "replicas": {"type": "integer", "minimum": 0},
        "idleTimeoutSeconds": {"type": "integer"},
        "rayStartParams": RAY_START_PARAMS,
        "template": POD_TEMPLATE,
    },
    ("groupName", "maxReplicas", "minReplicas", "template"),
    unmodelled=("labels", "numOfHosts", "priority", "resources", "scaleStrategy", "suspend"),
)
RAY_CLUSTER_SPEC = closed(
    {
        "rayVersion": {"type": "string"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "headGroupSpec": HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": WORKER_GROUP},
    },
    ("headGroupSpec",),
    unmodelled=(
        "authOptions", "autoscalerOptions", "gcsFaultToleranceOptions", "headServiceAnnotations",
        "historyServerOptions", "managedBy", "networkPolicy", "suspend", "tlsOptions", "upgradeStrategy",
    ),
)  # fmt: skip
RAY_JOB_SPEC = closed(
    {
        "entrypoint": {"type": "string", "minLength": 1},
        "shutdownAfterJobFinishes": {"type": "boolean"},
        "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
        "runtimeEnvYAML": {"type": "string"},
        "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
        "backoffLimit": {"type": "integer", "minimum": 0},
        "activeDeadlineSeconds": {"type": "integer", "minimum": 0},
        "rayClusterSpec": RAY_CLUSTER_SPEC,
    },
    unmodelled=(
        "clusterSelector", "deletionStrategy", "entrypointNumCpus", "entrypointNumGpus", "entrypointResources",
        "jobId", "managedBy", "metadata", "preRunningDeadlineSeconds", "submitterConfig", "submitterPodTemplate",
        "suspend",
    ),
)  # fmt: skip


def resource_schema(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """A whole ``ray.io/v1`` object of ``kind`` (status is the operator's, never in a manifest)."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        **closed(
            {"apiVersion": {"const": "ray.io/v1"}, "kind": {"const": kind}, "metadata": OBJECT_META, "spec": spec},
            ("apiVersion", "kind", "metadata", "spec"),
        ),
    }


SCHEMAS = {
    "RayCluster": resource_schema("RayCluster", RAY_CLUSTER_SPEC),
    "RayJob": resource_schema("RayJob", RAY_JOB_SPEC),
}
