#!/usr/bin/env bash
# Runs every check and test of Shoal, installing first what a fresh Debian 12 machine lacks.
# This is the README's test command; .ci/run calls it and nothing else.
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages the integration tests drive for real: the origin registry (CNCF
# distribution), containerd + ctr (the client), skopeo (the other client).
missing=()
command -v docker-registry >/dev/null || missing+=(docker-registry)
{ command -v containerd >/dev/null && command -v ctr >/dev/null; } || missing+=(containerd)
command -v skopeo >/dev/null || missing+=(skopeo)
# protoc: the build scripts of containerd-client (the agent's containerd API client) and k8s-cri
# (the CRI client in tests/auth.rs) compile their .proto files.
command -v protoc >/dev/null || missing+=(protobuf-compiler)
# Headless Chromium loads the tracker's dashboard in tests/tracker.rs.
command -v chromium >/dev/null || missing+=(chromium)
# deploy/validate.sh installs kubernetes-validate into a virtualenv.
python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root=()
  [ "$(id -u)" -eq 0 ] || as_root=(sudo)
  "${as_root[@]}" apt-get update
  DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y "${missing[@]}"
fi

export CARGO_TERM_COLOR=never
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The integration tests run the real binaries as processes.
cargo build --workspace --bins
cargo test --workspace
# Kubernetes manifests against the Kubernetes schemas, offline once installed.
bash deploy/validate.sh
