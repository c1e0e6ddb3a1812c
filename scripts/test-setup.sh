#!/usr/bin/env bash
# System packages the test suite needs beyond Python: Debian's Chromium and ChromeDriver for the
# end-to-end browser test. Installed when missing and when we may (root with apt); otherwise the browser
# test is skipped with a message that says why.
set -u
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing chromium and chromium-driver for the browser test" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
        || echo "could not install chromium; the browser test will be skipped" >&2
fi
exit 0
