//! KubeVirt: a `VirtualMachineInstance` (kubevirt.io/v1, YAML or JSON) read ([`spec`]),
//! turned into the VM podvisor runs and the files its volumes need ([`translate`]), at the
//! paths KubeVirt gives them in a pod ([`layout`]), and its NICs' places on the pod's
//! networks ([`network`]).

pub mod layout;
pub mod network;
pub mod quantity;
pub mod spec;
pub mod translate;
pub mod volumes;

#[cfg(test)]
mod tests;

pub use layout::PodLayout;
pub use translate::{translate, Options};

/// Parses a VMI from YAML (JSON is YAML too). A field of the wrong type is named by its path.
pub fn parse(text: &str) -> Result<spec::Vmi, String> {
    let value: serde_json::Value =
        serde_yaml::from_str(text).map_err(|e| format!("not a YAML or JSON document: {e}"))?;
    if !value.is_object() {
        return Err("not a VirtualMachineInstance: the document is not an object".into());
    }
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })
}
