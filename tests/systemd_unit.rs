//! The hardened unit in `config/mailmoat.service` passes `systemd-analyze verify` and
//! scores as well hardened by `systemd-analyze security`.

mod common;

use std::path::Path;

/// The unit, pointing at the binary under test, in a fresh directory.
fn unit_copy(edit: impl Fn(String) -> String) -> (tempfile::TempDir, String) {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/mailmoat.service");
    let unit = std::fs::read_to_string(source)
        .unwrap()
        .replace("/usr/local/bin/mailmoat", env!("CARGO_BIN_EXE_mailmoat"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mailmoat.service");
    std::fs::write(&path, edit(unit)).unwrap();
    (dir, path.display().to_string())
}

#[test]
fn the_unit_verifies_without_a_single_warning() {
    let (_dir, path) = unit_copy(|unit| unit);
    let (code, out, err) = common::run_program("systemd-analyze", &["verify", &path]);
    assert_eq!((code, out.as_str(), err.as_str()), (0, "", ""));

    // The check sees mistakes: a misspelt key is reported (verify still exits 0).
    let (_dir, path) = unit_copy(|unit| unit.replace("NoNewPrivileges=", "NoNewPrivilege="));
    let (_, _, err) = common::run_program("systemd-analyze", &["verify", &path]);
    assert!(err.contains("Unknown key 'NoNewPrivilege'"), "{err}");
}

#[test]
fn the_unit_is_hardened() {
    let (_dir, path) = unit_copy(|unit| unit);
    let (code, out, err) =
        common::run_program("systemd-analyze", &["security", "--offline=yes", &path]);
    assert_eq!(code, 0, "{out}{err}");
    let level: f64 = out
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for mailmoat.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"));
    // systemd rates 0-10; below 2.0 is "OK", the best band.
    assert!(level < 2.0, "exposure {level}:\n{out}");
    for setting in [
        "CapabilityBoundingSet=~CAP_SYS_ADMIN",
        "ProtectSystem=",
        "NoNewPrivileges=",
    ] {
        let line = out.lines().find(|l| l.contains(setting)).unwrap_or("");
        assert!(line.trim_start().starts_with('✓'), "{setting}: {line:?}");
    }
}
