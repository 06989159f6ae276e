#!/usr/bin/env bash
# The phone's side of scan-to-login, as the app's backend would do it once the phone has
# scanned the code and the user confirmed: set the code's status twice through the
# gateway's internal API. Usage: phone.sh CODE [API_ADDR] [USER]
#   API_ADDR: the internal API (default 127.0.0.1:7180); LONGLINK_TOKEN: its token, if set.
set -euo pipefail
code=${1:?usage: phone.sh CODE [API_ADDR] [USER]}
api=${2:-127.0.0.1:7180}
user=${3:-alice}
case $user in *[!A-Za-z0-9_.-]*|"") echo "phone.sh: USER is letters, digits, _ . - only" >&2; exit 2 ;; esac
auth=()
if [ -n "${LONGLINK_TOKEN:-}" ]; then auth=(-H "Authorization: Bearer $LONGLINK_TOKEN"); fi
set_status() {
  curl -sS --fail-with-body ${auth[@]+"${auth[@]}"} -d "$1" "http://$api/v1/status/$code"
  echo
}
set_status '"scanned"'
sleep "${PHONE_PAUSE:-1}"
set_status "{\"state\":\"confirmed\",\"user\":\"$user\"}"
