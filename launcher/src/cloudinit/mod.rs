//! cloud-init's disks, built in-process: NoCloud (`cidata`: user-data, meta-data,
//! network-config) and the OpenStack config drive (`config-2`: openstack/latest/...), both
//! ISO 9660 images with Joliet names ([`iso9660`]).

pub mod iso9660;

/// What the guest's cloud-init is given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seed {
    pub instance_id: String,
    pub hostname: String,
    pub user_data: String,
    /// Network configuration (NoCloud: `network-config`, YAML; config drive:
    /// `network_data.json`).
    pub network_data: Option<String>,
}

/// A NoCloud seed disk (label `cidata`).
pub fn nocloud(seed: &Seed) -> Vec<u8> {
    let mut root = iso9660::Folder::default();
    root.add_file("user-data", seed.user_data.clone().into_bytes());
    let meta = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_scalar(&seed.instance_id),
        yaml_scalar(&seed.hostname)
    );
    root.add_file("meta-data", meta.into_bytes());
    if let Some(net) = &seed.network_data {
        root.add_file("network-config", net.clone().into_bytes());
    }
    iso9660::image("cidata", &root)
}

/// A NoCloud seed disk of the user's own files (`podvisor run --cloud-init`): `meta-data` as
/// given, or, without one, an `instance-id` derived from the other two (the same files keep
/// the same instance; changed ones make a new instance, whose per-instance modules run again).
pub fn nocloud_files(
    user_data: &[u8],
    meta_data: Option<&[u8]>,
    network_config: Option<&[u8]>,
) -> Vec<u8> {
    let mut root = iso9660::Folder::default();
    root.add_file("user-data", user_data.to_vec());
    let meta = match meta_data {
        Some(m) => m.to_vec(),
        None => {
            let mut hash = crc32fast::Hasher::new();
            hash.update(user_data);
            hash.update(network_config.unwrap_or_default());
            format!("instance-id: podvisor-{:08x}\n", hash.finalize()).into_bytes()
        }
    };
    root.add_file("meta-data", meta);
    if let Some(net) = network_config {
        root.add_file("network-config", net.to_vec());
    }
    iso9660::image("cidata", &root)
}

/// An OpenStack config drive (label `config-2`).
pub fn config_drive(seed: &Seed) -> Vec<u8> {
    let mut root = iso9660::Folder::default();
    let meta = serde_json::json!({
        "uuid": seed.instance_id,
        "hostname": seed.hostname,
        "name": seed.hostname,
    });
    root.add_file(
        "openstack/latest/meta_data.json",
        meta.to_string().into_bytes(),
    );
    root.add_file(
        "openstack/latest/user_data",
        seed.user_data.clone().into_bytes(),
    );
    if let Some(net) = &seed.network_data {
        root.add_file(
            "openstack/latest/network_data.json",
            net.clone().into_bytes(),
        );
    }
    iso9660::image("config-2", &root)
}

/// `s` as a YAML scalar that reads back as itself (quoted unless plainly safe).
fn yaml_scalar(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if plain {
        s.to_owned()
    } else {
        serde_json::to_string(s).expect("a string encodes")
    }
}

#[cfg(test)]
mod tests;
