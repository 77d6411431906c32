#!/usr/bin/env bash
# Validates deploy/ without a cluster and without network access (after a first install).
#
#   deploy/validate.sh
#
# 1. Every manifest under deploy/kubernetes is checked against the Kubernetes OpenAPI JSON schemas
#    with kubernetes-validate in strict mode (unknown fields are errors), for each Kubernetes
#    version in SHOAL_K8S_VERSIONS. The schemas ship inside the pip package, so nothing is fetched
#    while validating. A resource whose kind/apiVersion has no schema (a typo such as apps/v2)
#    fails too: kubernetes-validate only warns about those.
# 2. kustomization.yaml must list every manifest in its directory and every file it lists must
#    exist.
# 3. If `kubectl` or `kustomize` is installed, the kustomization is built and its output checked
#    as in 1.
# 4. deploy/grafana: the dashboard must be valid JSON, the scrape config valid YAML.
#
# kubernetes-validate is installed with pip, once, into a virtualenv under
# ${XDG_CACHE_HOME:-$HOME/.cache}/shoal-venv (override with SHOAL_VENV). Exits non-zero on any
# failure, and ends with a line "deploy: N passed, N failed".
set -euo pipefail

KUBERNETES_VALIDATE_VERSION=1.37.0
# Oldest supported first; 1.37 is the newest schema kubernetes-validate 1.37.0 ships.
read -r -a K8S_VERSIONS <<<"${SHOAL_K8S_VERSIONS:-1.29.0 1.37.0}"

deploy_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
k8s_dir="$deploy_dir/kubernetes"
grafana_dir="$deploy_dir/grafana"
venv="${SHOAL_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/shoal-venv}"

passed=0
failed=0
pass() { passed=$((passed + 1)); echo "ok    $*"; }
fail() { failed=$((failed + 1)); echo "FAIL  $*" >&2; }
indent() { sed 's/^/      /' >&2; }

installed_version() {
    "$venv/bin/python" -c \
        'import importlib.metadata as m; print(m.version("kubernetes-validate"))' 2>/dev/null || true
}

ensure_validator() {
    if [[ "$(installed_version)" == "$KUBERNETES_VALIDATE_VERSION" ]]; then
        return
    fi
    mkdir -p "$(dirname "$venv")"
    # Two runs at once must not build the same virtualenv.
    if command -v flock >/dev/null; then
        exec 9>"$venv.lock"
        flock 9
        if [[ "$(installed_version)" == "$KUBERNETES_VALIDATE_VERSION" ]]; then
            return
        fi
    fi
    echo "installing kubernetes-validate==$KUBERNETES_VALIDATE_VERSION into $venv" >&2
    if [[ ! -x "$venv/bin/pip" ]]; then
        rm -rf "$venv"
        python3 -m venv "$venv" || {
            echo "cannot create a virtualenv with python3 (on Debian: apt-get install python3-venv)" >&2
            exit 2
        }
    fi
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
    if [[ "$(installed_version)" != "$KUBERNETES_VALIDATE_VERSION" ]]; then
        echo "kubernetes-validate $KUBERNETES_VALIDATE_VERSION did not install into $venv" >&2
        exit 2
    fi
}

# validate LABEL FILE...: every resource in FILEs, against every version.
validate() {
    local label="$1"
    shift
    local version out rc bad resources
    for version in "${K8S_VERSIONS[@]}"; do
        rc=0
        out="$("$venv/bin/kubernetes-validate" --strict -k "$version" "$@" 2>&1)" || rc=$?
        bad="$(grep -E '^(WARN|ERROR)' <<<"$out" || true)"
        resources="$(grep -c ' passed for resource ' <<<"$out" || true)"
        if [[ $rc -ne 0 || -n "$bad" ]]; then
            fail "$label (Kubernetes $version)"
            indent <<<"${bad:-$out}"
        elif [[ "$resources" -eq 0 ]]; then
            fail "$label (Kubernetes $version): no Kubernetes resource found"
        else
            pass "$label (Kubernetes $version): $resources resources"
        fi
    done
}

ensure_validator

shopt -s nullglob
manifests=()
for f in "$k8s_dir"/*.yaml "$k8s_dir"/*.yml; do
    case "$(basename "$f")" in
        kustomization.yaml | kustomization.yml) ;;
        *) manifests+=("$f") ;;
    esac
done
shopt -u nullglob
if [[ ${#manifests[@]} -eq 0 ]]; then
    fail "no manifests found in $k8s_dir"
fi

# 1. Each manifest on its own, so that a failure names its file.
for f in "${manifests[@]}"; do
    validate "${f#"$deploy_dir"/}" "$f"
done

# 2. kustomization.yaml and the directory agree.
if out="$("$venv/bin/python" - "$k8s_dir" <<'EOF'
import os, sys, yaml

root = sys.argv[1]
with open(os.path.join(root, "kustomization.yaml")) as f:
    k = yaml.safe_load(f)
problems = []
listed = k.get("resources") or []
for r in listed:
    if not os.path.exists(os.path.join(root, r)):
        problems.append(f"kustomization.yaml lists {r}, which does not exist")
present = sorted(
    f for f in os.listdir(root)
    if f.endswith((".yaml", ".yml")) and f not in ("kustomization.yaml", "kustomization.yml")
)
for f in present:
    if f not in listed:
        problems.append(f"{f} is not listed in kustomization.yaml resources")
if len(set(listed)) != len(listed):
    problems.append("kustomization.yaml lists a resource twice")
print("\n".join(problems))
sys.exit(1 if problems else 0)
EOF
)"; then
    pass "kubernetes/kustomization.yaml lists exactly the manifests present"
else
    fail "kubernetes/kustomization.yaml"
    indent <<<"$out"
fi

# 3. The kustomization builds, and its output is valid.
build=()
if command -v kubectl >/dev/null; then
    build=(kubectl kustomize "$k8s_dir")
elif command -v kustomize >/dev/null; then
    build=(kustomize build "$k8s_dir")
fi
if [[ ${#build[@]} -gt 0 ]]; then
    built="$(mktemp --suffix=.yaml)"
    trap 'rm -f "$built"' EXIT
    if "${build[@]}" >"$built" 2>"$built.err"; then
        pass "kustomization builds (${build[0]})"
        validate "kustomize build output" "$built"
    else
        fail "${build[*]}"
        indent <"$built.err"
    fi
    rm -f "$built.err"
else
    echo "skip  kustomize build: neither kubectl nor kustomize is installed"
fi

# 4. Grafana files parse.
parse_json='
import json, sys
try:
    json.load(open(sys.argv[1]))
except ValueError as e:
    sys.exit(f"invalid JSON: {e}")'
parse_yaml='
import sys, yaml
try:
    list(yaml.safe_load_all(open(sys.argv[1])))
except yaml.YAMLError as e:
    sys.exit("invalid YAML: " + str(e).replace("\n", " "))'
if [[ -d "$grafana_dir" ]]; then
    for f in "$grafana_dir"/*.json; do
        [[ -e "$f" ]] || continue
        if out="$("$venv/bin/python" - "$f" <<<"$parse_json" 2>&1)"; then
            pass "${f#"$deploy_dir"/} is valid JSON"
        else
            fail "${f#"$deploy_dir"/}: $out"
        fi
    done
    for f in "$grafana_dir"/*.yaml; do
        [[ -e "$f" ]] || continue
        if out="$("$venv/bin/python" - "$f" <<<"$parse_yaml" 2>&1)"; then
            pass "${f#"$deploy_dir"/} is valid YAML"
        else
            fail "${f#"$deploy_dir"/}: $out"
        fi
    done
fi

echo "deploy: $passed passed, $failed failed"
[[ $failed -eq 0 ]]
