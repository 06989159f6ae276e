//! The Debian package `scripts/deb.sh` builds from the binary this test built, taken apart
//! with dpkg-deb: the exact files with their modes and owners, the control fields, the
//! conffile, the md5sums; the packaged config through the packaged binary's `check-config`;
//! the packaged unit through `systemd-analyze verify`; and the maintainer scripts, run with
//! logging stand-ins for useradd, systemctl and the rest as the only commands on PATH (so
//! nothing on this machine changes). Without dpkg-deb or systemd-analyze (scripts/deps.sh
//! installs systemd) the parts that need them are skipped, except under CI=true.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

const REPO: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_longlink");
const EXEC_START: &str = "ExecStart=/usr/bin/longlink serve --config /etc/longlink/longlink.toml";

fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether `tool` is installed; under CI=true it must be.
fn have(tool: &str) -> bool {
    match Command::new(tool).arg("--version").output() {
        Ok(_) => true,
        Err(e) if ci() => panic!("{tool}: {e} (scripts/deps.sh installs it)"),
        Err(_) => {
            eprintln!("{tool} is not installed (scripts/deps.sh installs it): skipped");
            false
        }
    }
}

/// A command's stdout, asserting it succeeded.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The lines of `text` that start with `prefix`.
fn starting_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

fn read(p: impl AsRef<Path>) -> String {
    let p = p.as_ref();
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn the_deb_package_holds_the_binary_unit_config_and_docs_and_makes_its_user() {
    if !have("dpkg-deb") {
        return;
    }
    let tmp = common::temp_dir("deb");
    let outdir = tmp.0.join("out");
    // Uncompressed: a debug binary is over 100 MB, and xz (dpkg-deb's default, what deb.sh
    // uses unless told) takes half a minute over it; the contents are what is checked here.
    let said = run(Command::new("bash")
        .arg("scripts/deb.sh")
        .arg(BIN)
        .arg(&outdir)
        .env("DEB_COMPRESS", "none")
        .current_dir(REPO));
    let arch = run(Command::new("dpkg").arg("--print-architecture"))
        .trim()
        .to_string();
    // deb.sh writes a SemVer pre-release's - as ~ (a - would start a Debian revision).
    let version = env!("CARGO_PKG_VERSION").replace('-', "~");
    let deb_path = outdir.join(format!("longlink_{version}_{arch}.deb"));
    let deb = deb_path.as_path();
    assert_eq!(said.lines().last(), Some(deb.to_str().unwrap()), "{said}");
    assert!(deb.is_file(), "{}", deb.display());

    // Every path in the archive, with its mode and owner.
    let listing = run(Command::new("dpkg-deb").arg("-c").arg(deb));
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        // drwxr-xr-x root/root 0 2025-01-01 00:00 ./etc/
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 6, "{line}");
        files.insert(f[5].to_string(), (f[0].to_string(), f[1].to_string()));
    }
    let (dir, file, exe) = ("drwxr-xr-x", "-rw-r--r--", "-rwxr-xr-x");
    let want: BTreeMap<String, (String, String)> = [
        ("./", dir),
        ("./etc/", dir),
        ("./etc/longlink/", dir),
        ("./etc/longlink/longlink.toml", file),
        ("./lib/", dir),
        ("./lib/systemd/", dir),
        ("./lib/systemd/system/", dir),
        ("./lib/systemd/system/longlink.service", file),
        ("./usr/", dir),
        ("./usr/bin/", dir),
        ("./usr/bin/longlink", exe),
        ("./usr/share/", dir),
        ("./usr/share/doc/", dir),
        ("./usr/share/doc/longlink/", dir),
        ("./usr/share/doc/longlink/OPERATIONS.md", file),
        ("./usr/share/doc/longlink/PROTOCOL.md", file),
        ("./usr/share/doc/longlink/README.md", file),
        ("./usr/share/doc/longlink/copyright", file),
    ]
    .into_iter()
    .map(|(p, m)| (p.to_string(), (m.to_string(), "root/root".to_string())))
    .collect();
    assert_eq!(files, want, "{listing}");

    // The control fields.
    let field = |f: &str| {
        run(Command::new("dpkg-deb").arg("-f").arg(deb).arg(f))
            .trim()
            .to_string()
    };
    assert_eq!(field("Package"), "longlink");
    assert_eq!(field("Version"), version);
    assert_eq!(field("Architecture"), arch);
    assert_eq!(field("Section"), "net");
    assert_eq!(field("Priority"), "optional");
    assert!(!field("Maintainer").is_empty());
    let description = field("Description");
    assert!(
        description.lines().count() > 1 && !description.lines().next().unwrap().is_empty(),
        "a short and a long description: {description}"
    );
    let size: u64 = field("Installed-Size")
        .parse()
        .expect("Installed-Size in KiB");

    // useradd and friends are in passwd, which is not Essential.
    let depends = field("Depends");
    assert!(depends.split(", ").any(|d| d == "passwd"), "{depends}");
    // A dynamically linked binary (a plain `cargo build`) needs its C library.
    let dynamic = Command::new("ldd")
        .arg(BIN)
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("libc.so.6"));
    if dynamic {
        assert!(
            depends.split(", ").any(|d| d.starts_with("libc6")),
            "{depends}"
        );
    }

    // The control files.
    let control = tmp.0.join("DEBIAN");
    run(Command::new("dpkg-deb").arg("-e").arg(deb).arg(&control));
    assert_eq!(
        read(control.join("conffiles")).lines().collect::<Vec<_>>(),
        ["/etc/longlink/longlink.toml"]
    );
    for s in ["postinst", "prerm", "postrm"] {
        let p = control.join(s);
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755, "DEBIAN/{s}: {mode:o}");
        let text = read(&p);
        assert!(text.starts_with("#!/bin/sh\n"), "DEBIAN/{s}:\n{text}");
        assert!(text.lines().any(|l| l == "set -e"), "DEBIAN/{s}:\n{text}");
        run(Command::new("sh").arg("-n").arg(p));
    }
    let postinst = read(control.join("postinst"));
    assert!(postinst.contains("useradd --system"), "{postinst}");

    // The files.
    let root = tmp.0.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root));
    // dpkg --verify's sums match what was packaged (the conffile is dpkg's own business).
    let sums = read(control.join("md5sums"));
    for p in [
        "usr/bin/longlink",
        "lib/systemd/system/longlink.service",
        "usr/share/doc/longlink/copyright",
    ] {
        assert!(
            sums.lines().any(|l| l.ends_with(&format!("  {p}"))),
            "{p} not in md5sums:\n{sums}"
        );
    }
    run(Command::new("md5sum")
        .args(["--check", "--quiet", "--strict"])
        .arg(control.join("md5sums"))
        .current_dir(&root));

    // The binary given to deb.sh, without its debug info.
    let bin = root.join("usr/bin/longlink");
    let stripped = tmp.0.join("stripped");
    run(Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&stripped)
        .arg(BIN));
    assert!(
        std::fs::read(&bin).unwrap() == std::fs::read(&stripped).unwrap(),
        "/usr/bin/longlink is not the binary given to deb.sh, stripped of its debug info"
    );
    assert!(std::fs::metadata(&bin).unwrap().len() < std::fs::metadata(BIN).unwrap().len());
    // Installed-Size: the packaged binary is most of it; the rest is well under a MiB.
    let bin_kib = std::fs::metadata(&bin).unwrap().len() / 1024;
    assert!(
        (bin_kib..bin_kib + 1024).contains(&size),
        "Installed-Size {size} KiB, the packaged binary {bin_kib} KiB"
    );
    let config = root.join("etc/longlink/longlink.toml");
    assert_eq!(
        read(&config),
        read(Path::new(REPO).join("longlink.example.toml"))
    );
    // The packaged binary accepts the packaged config.
    let checked = run(Command::new(&bin).arg("check-config").arg(config));
    assert!(checked.contains(": ok ("), "{checked}");

    for (doc, from) in [
        ("README.md", "README.md"),
        ("OPERATIONS.md", "docs/OPERATIONS.md"),
        ("PROTOCOL.md", "docs/PROTOCOL.md"),
    ] {
        assert_eq!(
            read(root.join("usr/share/doc/longlink").join(doc)),
            read(Path::new(REPO).join(from)),
            "{doc}"
        );
    }
    let copyright = read(root.join("usr/share/doc/longlink/copyright"));
    assert!(
        copyright
            .lines()
            .any(|l| l.strip_prefix("License: ") == Some(env!("CARGO_PKG_LICENSE"))),
        "{copyright}"
    );

    // The unit: scripts/longlink.service with ExecStart at /usr/bin and the package's user
    // for DynamicUser=yes; every other setting as it is there, in its order.
    let unit = read(root.join("lib/systemd/system/longlink.service"));
    let source = read(Path::new(REPO).join("scripts/longlink.service"));
    let lines = |prefix| starting_with(&unit, prefix);
    assert_eq!(lines("ExecStart="), [EXEC_START], "{unit}");
    assert_eq!(lines("User="), ["User=longlink"], "{unit}");
    assert_eq!(lines("Group="), ["Group=longlink"], "{unit}");
    assert!(lines("DynamicUser=").is_empty(), "{unit}");
    assert!(!unit.contains("/usr/local"), "{unit}");
    let settings = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| {
                !l.starts_with('#')
                    && ![
                        "ExecStart=",
                        "DynamicUser=",
                        "User=",
                        "Group=",
                        "RemoveIPC=",
                    ]
                    .iter()
                    .any(|k| l.starts_with(k))
            })
            .map(String::from)
            .collect()
    };
    assert_eq!(settings(&unit), settings(&source));
    for k in [
        "Type=notify",
        "NotifyAccess=all",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "RuntimeDirectory=longlink",
        "ProtectSystem=strict",
    ] {
        assert!(unit.lines().any(|l| l == k), "{k}:\n{unit}");
    }
    // Its Documentation= is in the package.
    for l in unit.lines() {
        if let Some(doc) = l.strip_prefix("Documentation=file:///") {
            assert!(root.join(doc).is_file(), "{l}");
        }
    }

    if have("systemd-analyze") {
        // `systemd-analyze verify --root=<extracted package>` (systemd 252 has it) resolves
        // everything under that root: it fails on sysinit.target and ExecReload's /bin/kill,
        // which the package rightly does not ship, so it cannot pass on the package alone.
        // Instead the packaged unit, as it is but for ExecStart's /usr/bin/longlink pointing
        // at the extracted binary (not installed at /usr/bin on a test machine), is verified
        // against this machine's systemd, as tests/drain.rs verifies scripts/longlink.service:
        // every directive (User=, Group=, the hardening) is checked, and ExecStart must name
        // an executable, the packaged one.
        let rewritten = unit.replace(
            "ExecStart=/usr/bin/longlink ",
            &format!("ExecStart={} ", bin.display()),
        );
        assert_ne!(rewritten, unit);
        let dir = tmp.0.join("unit");
        std::fs::create_dir(&dir).unwrap();
        let path = dir.join("longlink.service");
        std::fs::write(&path, rewritten).unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && text.trim().is_empty(), "{text}");
    }

    maintainer_scripts(&control, &tmp.0);
}

/// The maintainer scripts, with stand-ins that log their arguments for every command they
/// may run (getent answers "found" when EXISTS is set) and nothing else on PATH.
fn maintainer_scripts(control: &Path, tmp: &Path) {
    let (stubs, log) = (tmp.join("stubs"), tmp.join("calls"));
    let (stubs, log) = (stubs.as_path(), log.as_path());
    std::fs::create_dir(stubs).unwrap();
    for c in [
        "getent",
        "groupadd",
        "useradd",
        "userdel",
        "groupdel",
        "systemctl",
        "rm",
        "dpkg-statoverride",
    ] {
        let p = stubs.join(c);
        // Lookups (getent, dpkg-statoverride --list) find something only with EXISTS set.
        let text = format!(
            "#!/bin/sh\necho \"${{0##*/}} $*\" >>'{log}'\ncase \"${{0##*/}} $1\" in getent*|*--list) [ -n \"$EXISTS\" ];; esac\n",
            log = log.display()
        );
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // What a script called, in order.
    let calls = |script: &str, exists: bool, args: &[&str]| -> Vec<String> {
        let _ = std::fs::remove_file(log);
        run(Command::new("/bin/sh")
            .arg(control.join(script))
            .args(args)
            .env_clear()
            .env("PATH", stubs)
            .env("EXISTS", if exists { "1" } else { "" }));
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    };
    let has = |called: &[String], c: &str| called.iter().any(|l| l == c);
    let systemd = Path::new("/run/systemd/system").is_dir();
    let never_started = |called: &[String]| {
        assert!(
            !called
                .iter()
                .any(|l| l.starts_with("systemctl start") || l.starts_with("systemctl restart")),
            "{called:?}"
        );
    };

    // First install, no user yet: a system group and user, no login, no home.
    let c = calls("postinst", false, &["configure", ""]);
    assert!(has(&c, "groupadd --system longlink"), "{c:?}");
    let useradd: Vec<&String> = c.iter().filter(|l| l.starts_with("useradd ")).collect();
    assert_eq!(useradd.len(), 1, "{c:?}");
    for part in [
        " --system ",
        " --gid longlink ",
        " --home-dir /nonexistent ",
        " --shell /usr/sbin/nologin ",
    ] {
        assert!(useradd[0].contains(part), "{part}: {}", useradd[0]);
    }
    assert!(useradd[0].ends_with(" longlink"), "{}", useradd[0]);
    // Not enabled nor started: the example config is the operator's to replace first.
    assert!(
        !c.iter().any(|l| l.starts_with("systemctl enable")),
        "{c:?}"
    );
    assert_eq!(has(&c, "systemctl daemon-reload"), systemd, "{c:?}");
    // The config (secrets) readable by the gateway's group only, kept so by dpkg.
    assert!(
        has(
            &c,
            "dpkg-statoverride --update --add root longlink 0640 /etc/longlink/longlink.toml"
        ),
        "{c:?}"
    );
    never_started(&c);

    // Again with the user and the override there: nothing is made twice.
    let c = calls("postinst", true, &["configure", ""]);
    assert!(
        !c.iter().any(|l| l.starts_with("groupadd")
            || l.starts_with("useradd")
            || l.starts_with("dpkg-statoverride --update")),
        "{c:?}"
    );
    never_started(&c);

    // An upgrade: not enabled (an operator's choice stays); a running gateway is reloaded
    // into the new binary where systemd runs.
    let c = calls("postinst", true, &["configure", "0.0.1"]);
    assert!(
        !c.iter().any(|l| l.starts_with("systemctl enable")),
        "{c:?}"
    );
    assert_eq!(
        has(&c, "systemctl reload longlink.service"),
        systemd,
        "{c:?}"
    );
    never_started(&c);

    // Stopped at a removal (where systemd runs), not at an upgrade.
    let c = calls("prerm", true, &["remove"]);
    assert_eq!(has(&c, "systemctl stop longlink.service"), systemd, "{c:?}");
    let c = calls("prerm", true, &["upgrade", "0.0.2"]);
    assert!(!c.iter().any(|l| l.starts_with("systemctl stop")), "{c:?}");

    // The user goes at a purge only.
    let c = calls("postrm", true, &["remove"]);
    assert!(!c.iter().any(|l| l.starts_with("userdel")), "{c:?}");
    let c = calls("postrm", true, &["purge"]);
    assert!(has(&c, "userdel longlink"), "{c:?}");
    assert!(
        has(&c, "dpkg-statoverride --remove /etc/longlink/longlink.toml"),
        "{c:?}"
    );
    assert!(
        has(
            &c,
            "rm -f /etc/systemd/system/multi-user.target.wants/longlink.service"
        ),
        "{c:?}"
    );
    // A purge with the user already gone does not try to delete it.
    let c = calls("postrm", false, &["purge"]);
    assert!(!c.iter().any(|l| l.starts_with("userdel")), "{c:?}");
}
