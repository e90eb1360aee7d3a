#!/bin/sh
# The launcher: wait for the SuperLink, register every silo's public key, submit one run with
# `flwr run`, stream its log, and exit 0 only if the run finished (its metrics.json exists).
#   SEEDTUNE_SUPERLINK   host:port of the SuperLink's API          (default superlink:9093)
#   SEEDTUNE_RUN_NAME    the run's folder under /runs; an unfinished run of that name resumes
#   SEEDTUNE_RUN_CONFIG  run-config overrides, e.g. 'schedule.steps=100 federation.silos=3'
set -eu
SUPERLINK="${SEEDTUNE_SUPERLINK:-superlink:9093}"
RUN_DIR="/runs/${SEEDTUNE_RUN_NAME:-default}"
mkdir -p "$FLWR_HOME"
cat > "$FLWR_HOME/config.toml" <<TOML
[superlink]
default = "deployment"

[superlink.deployment]
address = "$SUPERLINK"
root-certificates = "/credentials/ca.crt"
TOML

echo "launcher: waiting for the SuperLink at $SUPERLINK"
python3 - "$SUPERLINK" <<'PY'
import socket, sys, time
host, port = sys.argv[1].rsplit(":", 1)
deadline = time.monotonic() + 180
while True:
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"launcher: error: no SuperLink at {sys.argv[1]} after 180 s")
        time.sleep(1)
PY

for key in /credentials/silo-*.pub; do
    if output=$(flwr supernode register "$key" deployment 2>&1); then
        echo "launcher: registered $(basename "$key" .pub)"
    elif echo "$output" | grep -qi "already"; then
        echo "launcher: $(basename "$key" .pub) was registered before"
    else
        echo "$output" >&2
        echo "launcher: error: could not register $key" >&2
        exit 1
    fi
done

echo "launcher: submitting the run (run-dir $RUN_DIR)"
flwr run /app deployment --stream --run-config "run-dir=\"$RUN_DIR\" ${SEEDTUNE_RUN_CONFIG:-}"
if [ -f "$RUN_DIR/metrics.json" ]; then  # `flwr run --stream` exits 0 even when the run failed
    echo "launcher: the run finished; model and log in $RUN_DIR"
else
    echo "launcher: error: the run did not finish (no $RUN_DIR/metrics.json); see the log above" >&2
    exit 1
fi
