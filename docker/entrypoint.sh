#!/bin/sh
# The image's entrypoint. `docker run IMAGE run demo` runs dpoflow; any other command runs as given,
# which is what Prefect's Docker and Kubernetes workers need: they start a flow run's container with
# the command `prefect flow-run execute` (its run id in PREFECT__FLOW_RUN_ID).
set -e
case "${1:-}" in
    ""|-*|run|sweep|prepare|validate|show|list|doctor|explain|init|sync|serve|schema)
        exec dpoflow "$@" ;;
    *)
        exec "$@" ;;
esac
