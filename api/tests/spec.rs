//! `api/openapi.yaml` describes exactly what the router serves.

use std::collections::BTreeSet;

use serde_yaml::Value;

fn spec() -> Value {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.yaml"))
        .expect("api/openapi.yaml is readable");
    serde_yaml::from_str(&text).expect("api/openapi.yaml is valid YAML")
}

#[test]
fn spec_paths_and_methods_match_the_routes() {
    let spec = spec();
    assert_eq!(
        spec["servers"][0]["url"].as_str(),
        Some("http://localhost/api/v1"),
        "server URL must match api::API_PREFIX"
    );
    let paths = spec["paths"].as_mapping().expect("paths is a mapping");
    let mut documented = BTreeSet::new();
    for (path, item) in paths {
        let path = path.as_str().expect("path is a string");
        let endpoint = path.strip_prefix('/').expect("path starts with /");
        for (method, _) in item.as_mapping().expect("path item is a mapping") {
            let method = method.as_str().expect("method is a string").to_uppercase();
            documented.insert((endpoint.to_owned(), method));
        }
    }
    let served: BTreeSet<(String, String)> = api::ROUTES
        .iter()
        .map(|r| (r.endpoint.to_owned(), r.method.to_owned()))
        .collect();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let unserved: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in openapi.yaml: {undocumented:?}"
    );
    assert!(
        unserved.is_empty(),
        "in openapi.yaml but not served: {unserved:?}"
    );
    assert_eq!(api::API_PREFIX, "/api/v1/");
}

/// Every `$ref` points at something the document defines.
#[test]
fn spec_refs_resolve() {
    fn walk(v: &Value, spec: &Value, refs: &mut usize) {
        match v {
            Value::Mapping(m) => {
                for (k, v) in m {
                    if k.as_str() == Some("$ref") {
                        let target = v.as_str().expect("$ref is a string");
                        let mut node = spec;
                        for part in target.trim_start_matches("#/").split('/') {
                            node = &node[part];
                        }
                        assert!(!node.is_null(), "dangling $ref {target}");
                        *refs += 1;
                    } else {
                        walk(v, spec, refs);
                    }
                }
            }
            Value::Sequence(s) => s.iter().for_each(|v| walk(v, spec, refs)),
            _ => {}
        }
    }
    let spec = spec();
    let mut refs = 0;
    walk(&spec, &spec, &mut refs);
    assert!(refs > 10);
}

/// The VmConfig fields the spec lists are the ones podvisor's config type serialises.
#[test]
fn spec_vm_config_fields_match_the_type() {
    let spec = spec();
    let documented: BTreeSet<String> = spec["components"]["schemas"]["VmConfig"]["properties"]
        .as_mapping()
        .expect("VmConfig properties")
        .keys()
        .map(|k| k.as_str().unwrap_or_default().to_owned())
        .collect();
    let full = r#"{"payload":{"kernel":"/k","initramfs":"/i","cmdline":""},
        "cpus":{"boot_vcpus":1,"max_vcpus":1},"memory":{"size":536870912},
        "disks":[{"path":"/d"}],"net":[{}],"rng":{},"serial":{"mode":"Off"},
        "console":{"mode":"Off"},"platform":{"serial_number":"s"}}"#;
    let config: vmm::config::VmConfig = serde_json::from_str(full).unwrap();
    let value = serde_json::to_value(&config).unwrap();
    let fields: BTreeSet<String> = value.as_object().unwrap().keys().cloned().collect();
    assert_eq!(documented, fields);
}

/// Each `vm.*` operation states its row of the lifecycle table (`vmm::lifecycle::RULES`) and
/// lists 404 / 409 exactly when that row can refuse with them.
#[test]
fn spec_states_the_lifecycle_table() {
    use vmm::lifecycle::{Allowed, RULES};
    let spec = spec();
    for rule in RULES {
        let path = format!("/{}", rule.name);
        let item = spec["paths"][path.as_str()]
            .as_mapping()
            .unwrap_or_else(|| panic!("{path} is documented"));
        assert_eq!(item.len(), 1, "{path}: one method");
        let operation = item.values().next().unwrap();
        assert_eq!(
            operation["description"].as_str(),
            Some(rule.describe().as_str()),
            "{path}'s description"
        );
        let responses = operation["responses"].as_mapping().expect("responses");
        let has = |code: u64| responses.contains_key(Value::Number(code.into()));
        let not_found = matches!(rule.allowed, Allowed::In(_) | Allowed::AnyVm);
        let conflict = matches!(rule.allowed, Allowed::In(_) | Allowed::WithoutVm);
        assert_eq!(has(404), not_found, "{path}: 404 listed");
        assert_eq!(has(409), conflict, "{path}: 409 listed");
    }
}
