//! The seed disks, read back with the tools a Linux host has: blkid for the label, and
//! libarchive (bsdtar) for the Joliet names and contents (scripts/test-all.sh installs it).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn scratch(name: &str, image: &[u8]) -> PathBuf {
    let path = std::env::temp_dir().join(format!("podvisor-ci-{name}-{}.iso", std::process::id()));
    std::fs::write(&path, image).unwrap();
    path
}

fn tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} (scripts/test-all.sh installs it): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn label(iso: &Path) -> String {
    tool(
        "blkid",
        &["-p", "-o", "value", "-s", "LABEL", iso.to_str().unwrap()],
    )
    .trim()
    .to_owned()
}

fn names(iso: &Path) -> Vec<String> {
    let mut names: Vec<String> = tool("bsdtar", &["-tf", iso.to_str().unwrap()])
        .lines()
        .map(|l| l.trim_end_matches('/').to_owned())
        .filter(|l| l != ".")
        .collect();
    names.sort();
    names
}

fn file(iso: &Path, name: &str) -> String {
    tool("bsdtar", &["-xOf", iso.to_str().unwrap(), name])
}

fn seed() -> Seed {
    Seed {
        instance_id: "web-1.shop".into(),
        hostname: "web-1".into(),
        user_data: "#cloud-config\nruncmd:\n - echo podvisor-cidata-marker\n".into(),
        network_data: Some("version: 2\nethernets: {}\n".into()),
    }
}

#[test]
fn a_nocloud_seed_reads_back_with_its_label_names_and_contents() {
    let iso = scratch("nocloud", &nocloud(&seed()));
    assert_eq!(label(&iso), "cidata");
    assert_eq!(names(&iso), ["meta-data", "network-config", "user-data"]);
    assert_eq!(file(&iso, "user-data"), seed().user_data);
    assert_eq!(
        file(&iso, "meta-data"),
        "instance-id: web-1.shop\nlocal-hostname: web-1\n"
    );
    assert_eq!(file(&iso, "network-config"), "version: 2\nethernets: {}\n");
    std::fs::remove_file(iso).unwrap();
}

#[test]
fn the_users_own_files_make_a_nocloud_seed() {
    let user = b"#cloud-config\nhostname: mine\n";
    let iso = scratch(
        "own",
        &nocloud_files(user, Some(b"instance-id: i-1\n"), None),
    );
    assert_eq!(label(&iso), "cidata");
    assert_eq!(names(&iso), ["meta-data", "user-data"]);
    assert_eq!(file(&iso, "meta-data"), "instance-id: i-1\n");
    assert_eq!(file(&iso, "user-data").as_bytes(), user);
    // Without meta-data: an instance-id that follows the other files.
    let id = |user: &[u8], net: Option<&[u8]>| {
        let iso = scratch("id", &nocloud_files(user, None, net));
        let meta = file(&iso, "meta-data");
        std::fs::remove_file(iso).unwrap();
        meta
    };
    assert!(id(user, None).starts_with("instance-id: podvisor-"));
    assert_eq!(id(user, None), id(user, None));
    assert_ne!(id(user, None), id(user, Some(b"version: 2\n")));
    assert_ne!(id(user, None), id(b"#cloud-config\n", None));
}

#[test]
fn a_config_drive_has_its_folders() {
    let mut s = seed();
    s.network_data = None;
    s.user_data = "x".repeat(5000); // more than one sector
    let iso = scratch("configdrive", &config_drive(&s));
    assert_eq!(label(&iso), "config-2");
    assert_eq!(
        names(&iso),
        [
            "openstack",
            "openstack/latest",
            "openstack/latest/meta_data.json",
            "openstack/latest/user_data"
        ]
    );
    assert_eq!(file(&iso, "openstack/latest/user_data"), s.user_data);
    let meta: serde_json::Value =
        serde_json::from_str(&file(&iso, "openstack/latest/meta_data.json")).unwrap();
    assert_eq!(meta["uuid"], "web-1.shop");
    assert_eq!(meta["hostname"], "web-1");
    std::fs::remove_file(iso).unwrap();
}

#[test]
fn many_files_fill_folders_past_a_sector() {
    let mut root = iso9660::Folder::default();
    for i in 0..150 {
        root.add_file(
            &format!("dir/file-with-a-long-name-{i:03}"),
            format!("{i}").into_bytes(),
        );
    }
    root.add_file("empty", Vec::new());
    let iso = scratch("many", &iso9660::image("many", &root));
    let listed = names(&iso);
    assert_eq!(listed.len(), 152, "{listed:?}");
    assert_eq!(file(&iso, "dir/file-with-a-long-name-149"), "149");
    assert_eq!(file(&iso, "empty"), "");
    std::fs::remove_file(iso).unwrap();
}

#[test]
fn odd_names_stay_yaml() {
    assert_eq!(yaml_scalar("web-1.shop"), "web-1.shop");
    assert_eq!(yaml_scalar("a: b"), "\"a: b\"");
    assert_eq!(yaml_scalar(""), "\"\"");
}
