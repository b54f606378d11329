#!/usr/bin/env bash
# Install the Debian packages the full test run uses: a PostgreSQL server (multi-worker
# store tests, started by pytest-postgresql) and Chromium with its matching chromedriver
# (headless UI checks through Selenium). Needs root and apt-get; otherwise it says so and
# the tests that need them skip with a printed reason.
set -u
need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || [ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || need+=(postgresql)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "sysdeps: not root or no apt-get; missing ${need[*]} — the tests needing them will skip" >&2
  exit 0
fi
echo "sysdeps: installing ${need[*]} (Debian packages) ..."
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
  && echo "sysdeps: installed ${need[*]}" \
  || echo "sysdeps: could not install ${need[*]} — the tests needing them will skip" >&2
exit 0
