#!/usr/bin/env bash
# compose-test.sh: docker-compose.yml for real (`make compose-test`; .ci/run runs it after `make test`).
# Installs Docker from Debian and starts dockerd when missing, builds the base image from Debian
# packages and the project's image, then deploy/test_compose_up.py brings the stack up, checks
# greedy output through the orchestrator and the gateway against plain decoding, scales to two
# target and two draft replicas, kills a target mid-stream, and takes everything down again.
# Prints how long each part took. Leaves the images (the next build reuses their layers), and
# nothing else: the compose project's containers, network and volume are removed, and a dockerd
# started here is stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
source deploy/docker-env.sh

project="specserve-test-$$"
report=$(mktemp "${TMPDIR:-/tmp}/specserve-compose.XXXXXX")
leftovers() {
  local label="label=com.docker.compose.project=$project"
  { docker container ls --all --quiet --filter "$label"; docker network ls --quiet --filter "$label"
    docker volume ls --quiet --filter "$label"; } 2>/dev/null | sed 's/^/  /'
}
finish() {
  local rc=$?
  if [ -n "$(leftovers)" ]; then  # the test's own teardown did not run or did not finish
    "${COMPOSE[@]}" --project-name "$project" --file docker-compose.yml down --volumes --remove-orphans --timeout 5 >/dev/null 2>&1 || true
  fi
  rm -f "$report"
  docker_down
  exit $rc
}
trap finish EXIT

clock() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(clock)" 'BEGIN { printf "%.0f s", b - a }'; }

t=$(clock); docker_up; compose_command; docker_ready=$(since "$t")
t=$(clock); bash deploy/base-image.sh; base=$(since "$t")
build_log="${TMPDIR:-/tmp}/specserve-image-build.log"
t=$(clock)
bash deploy/build-image.sh >"$build_log" 2>&1 || { tail -n 60 "$build_log"; exit 1; }
build=$(since "$t")

t=$(clock)
SPECSERVE_COMPOSE="${COMPOSE[*]}" SPECSERVE_COMPOSE_PROJECT="$project" SPECSERVE_COMPOSE_REPORT="$report" \
  "$PYTHON" -m pytest -q -p no:cacheprovider deploy/test_compose_up.py
tests=$(since "$t")

left=$(leftovers)
if [ -n "$left" ]; then
  echo "compose-test: the compose project $project left behind:"; echo "$left"
  exit 1
fi
echo "compose-test: times: docker ready $docker_ready, base image $base, image build $build, tests $tests;" \
  "from \`up\`: $(python3 -c 'import json,sys; t=json.load(open(sys.argv[1])); print(", ".join(f"{k} {v:.0f} s" if k.endswith("_s") else f"{k} {v}" for k, v in t.items()))' "$report")"
