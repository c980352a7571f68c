#!/bin/bash
# Entry point of the CPU MAP image. `show`, `env`, `extract` and `help` go to the MAP tools script of holoscan-cli
# 4.2.0, as in any MAP. Anything else runs the application.json command in place of this shell, so that
#   - the container's exit status is the application's (the tools script logs it, then exits 0), and
#   - SIGTERM from `docker stop` / Kubernetes reaches the application (exit 143, nothing partial written) instead of
#     a shell that does not pass it on.
ulimit -s 32768 2>/dev/null  # Holoscan wants a 32 MB stack
case "${1:-}" in
    show | env | extract | help) exec /var/holoscan/tools "$@" ;;
esac
command=$(jq -r '.command | fromjson | join(" ")' "${HOLOSCAN_APP_MANIFEST_PATH:-/etc/holoscan/app.json}") || {
    echo "cannot read the command from ${HOLOSCAN_APP_MANIFEST_PATH:-/etc/holoscan/app.json}" >&2
    exit 1
}
exec ${command} "$@"
