#!/usr/bin/env bash
# Configure a site node after its first start: a second partition on the same port, a closed
# partition for research, and the site's modalities with their coercion rules.
# Usage: examples/setup-site.sh examples/site-node.toml
set -euo pipefail
export PACSNODE_CONFIG=${1:?settings file}

pacsnode partition add CARDIO --port 11112 --description "Cardiology" --duplicate-policy compare
pacsnode partition add RESEARCH --port 11113 --no-accept-any --duplicate-policy reject

pacsnode device add CT-ROOM-1 --ae-title CT1 --host 127.0.0.1 --port 104 --partition SITEA \
    --rule "prefix AccessionNumber SITEA-" --rule 'set InstitutionName "SITE A HOSPITAL"'
pacsnode device add RESEARCH-WS --ae-title RWS1 --host 127.0.0.1 --port 11112 \
    --partition RESEARCH --type VIEWER --no-storage
pacsnode partition list
pacsnode device list
