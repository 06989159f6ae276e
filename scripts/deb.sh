#!/usr/bin/env bash
# A Debian package of longlink, with dpkg-deb alone (no debhelper, no cargo-deb):
#
#   scripts/deb.sh [BINARY] [OUTDIR]
#
# BINARY: the longlink to package; default the static build of scripts/build-static.sh
# (target/<host triple>/release/longlink) if present, else target/release/longlink.
# OUTDIR: where longlink_<version>_<arch>.deb goes; default target/deb.
# The last line on stdout is the path of the .deb (everything else goes to stderr).
#
# The package: /usr/bin/longlink (debug info stripped); /lib/systemd/system/longlink.service (scripts/longlink.service
# with ExecStart at /usr/bin and the system user longlink instead of DynamicUser=);
# /etc/longlink/longlink.toml (longlink.example.toml, a conffile); README, OPERATIONS, PROTOCOL
# and copyright under /usr/share/doc/longlink. Its maintainer scripts create the user
# longlink (the operator enables the unit once the config is theirs), reload a running
# gateway at an upgrade (the live upgrade: no connection is dropped), stop it at a removal,
# and delete the user at a purge.
#
# Environment: DEB_MAINTAINER overrides the Maintainer field (default: Cargo.toml's first
# author, else "longlink developers"); DEB_COMPRESS the compressor (dpkg-deb -Z: xz, gzip, zstd, none).
set -euo pipefail
umask 022

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
die() {
  echo "deb.sh: $*" >&2
  exit 1
}

# A key of Cargo.toml's [package] section, as written (quotes and all).
cargo_field() {
  awk -v k="$1" '
    /^[ \t]*\[/ { p = ($0 ~ /^[ \t]*\[package\][ \t]*$/) }
    p && $0 ~ "^[ \t]*" k "[ \t]*=" { sub(/^[^=]*=[ \t]*/, ""); print; exit }
  ' "$REPO/Cargo.toml"
}
unquote() { sed -n 's/^"\([^"]*\)".*$/\1/p'; }

version=$(cargo_field version | unquote)
[[ $version =~ ^[0-9][0-9A-Za-z.+-]*$ ]] || die "no usable [package] version in Cargo.toml: '$version'"
# A SemVer pre-release (1.0.0-rc.1) sorts before its release in Debian with ~, and a - would
# make the rest a Debian revision.
debversion=${version//-/\~}
license=$(cargo_field license | unquote)
[ -n "$license" ] || die "no [package] license in Cargo.toml"
description=$(cargo_field description | unquote)
[ -n "$description" ] || die "no [package] description in Cargo.toml"
maintainer=${DEB_MAINTAINER:-$(cargo_field authors | sed -n 's/^\[[ \t]*"\([^"]*\)".*$/\1/p')}
maintainer=${maintainer:-longlink developers}
arch=$(dpkg --print-architecture)

if [ $# -ge 1 ]; then
  bin=$1
else
  # The path scripts/build-static.sh builds to: target/<rustc's host triple>/release.
  triple=$(rustc -vV 2>/dev/null | sed -n 's/^host: //p' || true)
  triple=${triple:-$(uname -m)-unknown-linux-gnu}
  bin="$REPO/target/$triple/release/longlink"
  [ -f "$bin" ] || bin="$REPO/target/release/longlink"
fi
outdir=${2:-$REPO/target/deb}
[ -f "$bin" ] && [ -x "$bin" ] || die "no executable binary at $bin (cargo build --release, or scripts/build-static.sh)"
# The binary must be the version the package says it is (a stale build is refused).
said=$("$bin" --version) || die "$bin --version failed"
[ "$said" = "longlink $version" ] || die "$bin says '$said', Cargo.toml says $version"

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
install -d -m 0755 "$root"

# --- files ---------------------------------------------------------------------------------
install -D -m 0755 "$bin" "$root/usr/bin/longlink"
# Without its debug info (the release profile keeps line tables: 48 MB, not 8), as Debian
# ships binaries; its symbols stay, for backtraces.
command -v strip >/dev/null || die "strip (binutils) is needed"
strip --strip-debug "$root/usr/bin/longlink"

# The unit: scripts/longlink.service (the one source of truth), transformed for the package.
unit="$root/lib/systemd/system/longlink.service"
install -d -m 0755 "$(dirname "$unit")"
sed \
  -e 's|^# longlink under systemd (docs/OPERATIONS.md)\. Install:$|# longlink under systemd (/usr/share/doc/longlink/OPERATIONS.md), as its Debian package\n# installs it (made from scripts/longlink.service by scripts/deb.sh). The package creates\n# the user longlink; write /etc/longlink/longlink.toml, then `systemctl enable --now longlink`.|' \
  -e '/^#   install .*$/d' \
  -e '/^#   systemctl enable --now longlink$/d' \
  -e 's|^ExecStart=/usr/local/bin/longlink |ExecStart=/usr/bin/longlink |' \
  -e 's|^DynamicUser=yes$|User=longlink\nGroup=longlink\n# (DynamicUser=yes implied this.)\nRemoveIPC=yes|' \
  "$REPO/scripts/longlink.service" >"$unit"
chmod 0644 "$unit"
# Check the transform did its work, and nothing else: apart from comments, ExecStart and the
# user lines, the unit is scripts/longlink.service line for line.
grep -qx 'ExecStart=/usr/bin/longlink serve --config /etc/longlink/longlink.toml' "$unit" ||
  die "the unit's ExecStart is not /usr/bin/longlink serve --config /etc/longlink/longlink.toml"
[ "$(grep -c '^ExecStart=' "$unit")" = 1 ] || die "the unit has more than one ExecStart"
grep -qx 'User=longlink' "$unit" && grep -qx 'Group=longlink' "$unit" || die "the unit has no User=/Group=longlink"
! grep -q -e '^DynamicUser=' -e '/usr/local' "$unit" || die "the unit still has DynamicUser= or /usr/local"
rest() { grep -v -e '^#' -e '^ExecStart=' -e '^DynamicUser=' -e '^User=' -e '^Group=' -e '^RemoveIPC=' "$1"; }
diff -u <(rest "$REPO/scripts/longlink.service") <(rest "$unit") >&2 ||
  die "the unit differs from scripts/longlink.service in more than ExecStart and the user"

# The config: the example, which the packaged binary must accept.
install -D -m 0644 "$REPO/longlink.example.toml" "$root/etc/longlink/longlink.toml"
"$root/usr/bin/longlink" check-config "$root/etc/longlink/longlink.toml" >&2 ||
  die "longlink.example.toml does not pass the packaged binary's check-config"

doc="$root/usr/share/doc/longlink"
install -d -m 0755 "$doc"
install -m 0644 "$REPO/README.md" "$REPO/docs/OPERATIONS.md" "$REPO/docs/PROTOCOL.md" "$doc/"
{
  echo "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
  echo "Upstream-Name: longlink"
  echo
  echo "Files: *"
  echo "Copyright: $maintainer"
  echo "License: $license"
  if [ -f "$REPO/LICENSE" ]; then
    sed -e 's/^$/./' -e 's/^/ /' "$REPO/LICENSE"
  else
    echo " On Debian systems, the full text of the $license license can be found in"
    echo " /usr/share/common-licenses/$license."
  fi
} >"$doc/copyright"
chmod 0644 "$doc/copyright"

# Installed-Size: the files, before DEBIAN/ exists (KiB).
installed_size=$(du -sk --apparent-size "$root" | cut -f1)

# --- dependencies --------------------------------------------------------------------------
# passwd (useradd, groupadd, userdel) is Priority: required but not Essential, so it is named.
# A dynamically linked binary (target/release) also needs the packages of its libraries:
# libc6 at least the newest GLIBC_ symbol version it uses. The static build needs none.
depends="passwd"
if ldd "$bin" >/dev/null 2>&1; then
  command -v objdump >/dev/null || die "objdump (binutils) is needed for a dynamic binary's libc6 version"
  glibc=$(objdump -T "$bin" 2>/dev/null | grep -o 'GLIBC_2\.[0-9.]*' | sed 's/^GLIBC_//' | sort -uV | tail -n1 || true)
  while read -r lib; do
    pkg=$(dpkg -S "$lib" 2>/dev/null | head -n1 | cut -d: -f1) ||
      pkg=$(dpkg -S "$(realpath "$lib")" 2>/dev/null | head -n1 | cut -d: -f1) ||
      die "no package owns $lib (ldd $bin)"
    [ -n "$pkg" ] || die "no package owns $lib (ldd $bin)"
    if [ "$pkg" = libc6 ] && [ -n "$glibc" ]; then pkg="libc6 (>= $glibc)"; fi
    case ", $depends, " in *", $pkg, "*) ;; *) depends="$depends, $pkg" ;; esac
  done < <(ldd "$bin" | sed -n 's/^.* => \(\/[^ ]*\) (0x[0-9a-f]*)$/\1/p')
fi

# --- control files -------------------------------------------------------------------------
install -d -m 0755 "$root/DEBIAN"
cat >"$root/DEBIAN/control" <<EOF
Package: longlink
Version: $debversion
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $installed_size
Depends: $depends
Section: net
Priority: optional
Description: long-connection gateway for persistent client connections
$(printf '%s.\n' "$description" | fold -s -w 78 | sed -e 's/ *$//' -e 's/^/ /')
 .
 longlink holds TCP, WebSocket and long-poll client connections in one process
 and lets backends push to them through an internal HTTP API. It runs under
 systemd as Type=notify, upgrades its binary or config without dropping a
 connection (systemctl reload longlink) and drains a node before it goes down.
 .
 The unit runs as the system user longlink, which the package creates, with
 /etc/longlink/longlink.toml as its config.
EOF

echo /etc/longlink/longlink.toml >"$root/DEBIAN/conffiles"

# md5sums of every file but the conffiles (dpkg keeps those itself); `dpkg --verify` reads it.
(cd "$root" && find usr lib -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum) >"$root/DEBIAN/md5sums"

cat >"$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# longlink: the system user and the config's mode; the unit is left for the operator to enable
# (never started here); a running gateway takes the new binary and config over at an upgrade,
# keeping every connection.
set -e

case "$1" in
configure)
    if ! getent group longlink >/dev/null; then
        groupadd --system longlink
    fi
    if ! getent passwd longlink >/dev/null; then
        useradd --system --gid longlink --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --comment "longlink gateway" longlink
    fi
    # The config may hold the API token and JWT secrets: readable by the gateway's group
    # only. A stat override, so dpkg keeps it so at upgrades (and an operator's own stays).
    if ! dpkg-statoverride --list /etc/longlink/longlink.toml >/dev/null 2>&1; then
        dpkg-statoverride --update --add root longlink 0640 /etc/longlink/longlink.toml
    fi
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
    # Not enabled, not started: the example config admits anyone with the demo app's
    # published token on every address. The operator writes the real config first.
    if [ -z "$2" ]; then
        echo "longlink: edit /etc/longlink/longlink.toml (your apps, tokens, listeners), check it with" >&2
        echo "longlink:   longlink check-config /etc/longlink/longlink.toml" >&2
        echo "longlink: then: systemctl enable --now longlink" >&2
    fi
    # An upgrade: the running gateway starts the binary now at /usr/bin/longlink with the
    # config now on disk and hands it every connection (docs/OPERATIONS.md, live upgrade);
    # if the new one fails, the old one goes on serving and logs why.
    if [ -n "$2" ] && [ -d /run/systemd/system ] && systemctl is-active --quiet longlink.service; then
        systemctl reload longlink.service || echo "longlink: reload failed; see journalctl -u longlink" >&2
    fi
    ;;
esac

exit 0
EOF

cat >"$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
# longlink: stop the gateway when the package goes (at an upgrade it stays up: postinst
# reloads it into the new binary).
set -e

case "$1" in
remove)
    if [ -d /run/systemd/system ]; then
        systemctl stop longlink.service || true
    fi
    ;;
esac

exit 0
EOF

cat >"$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
# longlink: at a purge, the enablement link and the system user go too.
set -e

case "$1" in
purge)
    # The unit file is gone already, so `systemctl disable` cannot find it: the link
    # `systemctl enable` made (WantedBy=multi-user.target) is removed by hand.
    rm -f /etc/systemd/system/multi-user.target.wants/longlink.service
    if dpkg-statoverride --list /etc/longlink/longlink.toml >/dev/null 2>&1; then
        dpkg-statoverride --remove /etc/longlink/longlink.toml || true
    fi
    if getent passwd longlink >/dev/null && command -v userdel >/dev/null 2>&1; then
        userdel longlink || echo "longlink: could not remove the user longlink" >&2
    fi
    if getent group longlink >/dev/null && command -v groupdel >/dev/null 2>&1; then
        groupdel longlink || echo "longlink: could not remove the group longlink" >&2
    fi
    ;;
esac

case "$1" in
remove | purge)
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
    ;;
esac

exit 0
EOF

chmod 0644 "$root/DEBIAN/control" "$root/DEBIAN/conffiles" "$root/DEBIAN/md5sums"
for s in postinst prerm postrm; do
  chmod 0755 "$root/DEBIAN/$s"
  sh -n "$root/DEBIAN/$s" || die "DEBIAN/$s: syntax error"
done

# --- build ---------------------------------------------------------------------------------
mkdir -p "$outdir"
deb="$(cd "$outdir" && pwd)/longlink_${debversion}_${arch}.deb"
compress=()
if [ -n "${DEB_COMPRESS:-}" ]; then compress=("-Z$DEB_COMPRESS"); fi
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >&2
echo "$deb"
