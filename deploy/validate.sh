#!/usr/bin/env bash
# Schema checks of deploy/ with third-party validators, beyond `cargo test --test deploy`
# (which needs no network and checks the files against the code). Installs the validators
# from PyPI into a virtualenv under target/ on first use:
#
# - yamllint: every YAML file.
# - compose-spec: compose.yaml against the Compose specification (merge keys applied).
# - kubernetes-validate --strict: the built-in Kubernetes kinds (unknown fields rejected),
#   file by file and, where kubectl is installed, as `kubectl kustomize` builds them.
# - cloudcoil-models-keda: the KEDA ScaledObject and TriggerAuthentication against models
#   generated from KEDA's CRDs (2.16: later releases need Python 3.14).
#
# Usage: bash deploy/validate.sh
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VALIDATE_VENV:-target/deploy-validate-venv}
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q \
    yamllint==1.38.0 kubernetes-validate==1.37.0 compose-spec==0.2.1 cloudcoil-models-keda==2.16.1.0
fi

echo "yamllint"
"$venv/bin/yamllint" --strict -d '{extends: default, rules: {line-length: {max: 100},
  document-start: disable, truthy: {check-keys: false}, comments: {min-spaces-from-content: 1}}}' deploy/

echo "compose specification"
"$venv/bin/python" - deploy/compose.yaml <<'PY'
import sys
import compose_spec

compose = compose_spec.PyOptions(apply_merge=True).from_yaml(open(sys.argv[1]).read())
compose.validate()
compose.validate_volumes()
compose.validate_networks()
compose.to_spec()  # the full pydantic model of the specification
print(f"  {sys.argv[1]}: {len(compose.service_names())} services valid")
PY

echo "kubernetes"
k8s=()
for file in deploy/kubernetes/*.yaml; do
  case $file in
    */kustomization.yaml | */keda.yaml) ;;
    *) k8s+=("$file") ;;
  esac
done
"$venv/bin/kubernetes-validate" --strict --quiet "${k8s[@]}"
echo "  ${#k8s[@]} files valid"
# The kustomization as a whole, where kubectl (with its built-in kustomize) is installed.
if command -v kubectl >/dev/null 2>&1; then
  built=$(mktemp)
  trap 'rm -f "$built"' EXIT
  kubectl kustomize deploy/kubernetes >"$built"
  "$venv/bin/kubernetes-validate" --strict --quiet --no-warn "$built"
  echo "  kubectl kustomize deploy/kubernetes: $(grep -c '^kind:' "$built") resources valid"
else
  echo "  no kubectl: the kustomization itself was not built"
fi

echo "KEDA"
"$venv/bin/python" - deploy/kubernetes/keda.yaml <<'PY'
import sys
import yaml
from cloudcoil.models.keda import v1alpha1

models = {"ScaledObject": v1alpha1.ScaledObject, "TriggerAuthentication": v1alpha1.TriggerAuthentication}


def unknown(given, parsed, path=""):
    """Fields the model dropped: pydantic ignores unknown fields instead of refusing them."""
    if isinstance(given, dict):
        return [
            p
            for key, value in given.items()
            for p in ([f"{path}/{key}"] if key not in parsed else unknown(value, parsed[key], f"{path}/{key}"))
        ]
    if isinstance(given, list):
        return [p for i, (a, b) in enumerate(zip(given, parsed)) for p in unknown(a, b, f"{path}/{i}")]
    return []


failed = False
for document in yaml.safe_load_all(open(sys.argv[1])):
    model = models[document["kind"]].model_validate(document)
    dropped = unknown(document, model.model_dump(mode="json", by_alias=True, exclude_none=True))
    name = f"{document['kind']}/{document['metadata']['name']}"
    if dropped:
        failed = True
        print(f"  {name}: unknown fields {dropped}")
    else:
        print(f"  {name} valid")
sys.exit(1 if failed else 0)
PY
echo "deploy/ is valid"
