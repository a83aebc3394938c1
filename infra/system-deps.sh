#!/usr/bin/env bash
# The Debian packages the test suite talks to for real: PostgreSQL (the projection store's
# integration tests, `infra/postgres/pg.sh`), Chromium and ChromeDriver (the dashboard's
# end-to-end test). Installs only what is missing, so on a machine that has them it returns at
# once without touching apt. Needs root (or sudo) only when something must be installed.
#
#   infra/system-deps.sh            install what is missing
#   infra/system-deps.sh --check    list what is missing; exit 1 if anything is
set -euo pipefail

missing=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" > /dev/null || missing+=(postgresql)
[ -x /usr/bin/chromium ] || missing+=(chromium)
[ -x /usr/bin/chromedriver ] || missing+=(chromium-driver)

if [ "${#missing[@]}" -eq 0 ]; then
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    echo "missing: ${missing[*]}"
    exit 1
fi
if ! command -v apt-get > /dev/null; then
    echo "system-deps.sh: no apt-get here; install ${missing[*]} by hand" >&2
    exit 1
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
    command -v sudo > /dev/null || {
        echo "system-deps.sh: installing ${missing[*]} needs root (or sudo)" >&2
        exit 1
    }
    SUDO=(sudo)
fi
echo "system-deps.sh: installing ${missing[*]} from Debian's packages" >&2
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
