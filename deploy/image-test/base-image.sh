#!/usr/bin/env bash
# Builds the image test's stand-in for python:3.11-slim-bookworm without any registry: Debian bookworm
# made by debootstrap from the archive apt already uses, with python3 + venv, slimmed like Docker's
# debian:*-slim, plus the host's extra CA certificates (pip inside a build must trust what the host's
# pip trusts), and imported with `podman import`.
#
#   deploy/image-test/base-image.sh    # prints the tag, e.g. localhost/pae-base:bookworm-1a2b3c4d5e6f
#
# The tag carries a hash of this script, the mirror and the host's CA bundle: a rerun with nothing
# changed finds the image and returns at once. DEBIAN_MIRROR overrides the mirror.
set -euo pipefail

SUITE=bookworm
PACKAGES=python3,python3-venv,ca-certificates,passwd
HOST_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

first_debian_mirror() {
    # The archive (not security) URI of apt's own sources, deb822 or one-line format, comments skipped.
    cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | grep -v '^[[:space:]]*#' | grep -oE 'https?://[^[:space:]]+/debian/?([[:space:]]|$)' \
        | head -n 1 | tr -d '[:space:]' || true
}

mirror="${DEBIAN_MIRROR:-$(first_debian_mirror)}"
[ -n "${mirror}" ] || { echo "base-image: no Debian mirror in apt's sources; set DEBIAN_MIRROR" >&2; exit 1; }
key=$( { cat "$0"; echo "${mirror}"; cat "${HOST_CA_BUNDLE}"; } | sha256sum | cut -c1-12)
tag="localhost/pae-base:${SUITE}-${key}"
if podman image exists "${tag}"; then
    echo "${tag}"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "${work}"' EXIT
rootfs="${work}/rootfs"
echo "base-image: debootstrap ${SUITE} from ${mirror}" >&2
debootstrap --variant=minbase --include="${PACKAGES}" "${SUITE}" "${rootfs}" "${mirror}" >"${work}/debootstrap.log" 2>&1 \
    || { tail -n 30 "${work}/debootstrap.log" >&2; exit 1; }

# Slim: what Docker's debian:*-slim leaves out, for this install and every later apt-get in a build.
cat >"${rootfs}/etc/dpkg/dpkg.cfg.d/slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"${rootfs}/etc/apt/apt.conf.d/90slim"
find "${rootfs}/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
find "${rootfs}/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf "${rootfs}"/usr/share/man/* "${rootfs}"/usr/share/info/* "${rootfs}"/var/cache/apt/archives/*.deb \
    "${rootfs}"/var/lib/apt/lists/* "${rootfs}"/var/log/* "${rootfs}"/tmp/*

# The host bundle's certificates that Debian's own bundle lacks become local CAs of the image.
python3 - "${HOST_CA_BUNDLE}" "${rootfs}" <<'EOF'
import re
import sys
from pathlib import Path

bundle, rootfs = Path(sys.argv[1]), Path(sys.argv[2])
pem = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
known = set(pem.findall((rootfs / "etc/ssl/certs/ca-certificates.crt").read_text()))
extra = [cert for cert in pem.findall(bundle.read_text()) if cert not in known]
target = rootfs / "usr/local/share/ca-certificates"
for i, cert in enumerate(extra):
    (target / f"host-ca-{i}.crt").write_text(cert + "\n")
print(f"base-image: {len(extra)} host CA certificate(s) added", file=sys.stderr)
EOF
chroot "${rootfs}" update-ca-certificates >/dev/null 2>&1

tar -C "${rootfs}" --numeric-owner -c . | podman import \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["/bin/bash"]' \
    - "${tag}" >"${work}/import.log" 2>&1 || { cat "${work}/import.log" >&2; exit 1; }
echo "${tag}"
