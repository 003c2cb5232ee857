//! The route table and the pure mapping from an HTTP request (method, path, body) to an
//! [`ApiRequest`], and from an answer back to a status and body. No I/O here: the server, the
//! unit tests and the fuzz target all call these functions.

use vmm::config::VmConfig;
use vmm::migration::{Endpoint, SendOptions};

use crate::types::{
    ApiError, ApiRequest, ApiResponse, ErrorBody, ErrorStatus, RestoreConfig,
    VmReceiveMigrationData, VmSendMigrationData, VmSnapshotConfig,
};

/// Every endpoint lives under this path.
pub const API_PREFIX: &str = "/api/v1/";

/// Where a readiness probe asks whether the VM runs (outside [`API_PREFIX`], as `/metrics`).
pub const READYZ: &str = "/readyz";

/// The answer to `GET /readyz` from `vm.info`'s: 200 `ok` while the VM runs, else 503 with the
/// reason (no VM yet, paused, shut down, ...).
pub fn readiness(info: &Result<ApiResponse, ApiError>) -> (u16, String) {
    match info {
        Ok(ApiResponse::Info(info)) if info.state == vmm::lifecycle::VmState::Running => {
            (200, "ok\n".into())
        }
        Ok(ApiResponse::Info(info)) => (503, format!("not ready: the VM is {:?}\n", info.state)),
        Ok(_) => (503, "not ready\n".into()),
        Err(e) if e.status == ErrorStatus::NotFound => (503, "not ready: no VM yet\n".into()),
        Err(e) => (503, format!("not ready: {}\n", e.message)),
    }
}

/// Largest request body accepted; larger ones get 413 before they are read.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// One served endpoint. `api/openapi.yaml` documents exactly these (a test compares them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Route {
    /// The path after [`API_PREFIX`], e.g. `vm.info`.
    pub endpoint: &'static str,
    /// `GET` or `PUT`.
    pub method: &'static str,
}

const fn route(endpoint: &'static str, method: &'static str) -> Route {
    Route { endpoint, method }
}

/// The served routes.
pub const ROUTES: &[Route] = &[
    route("vmm.ping", "GET"),
    route("vmm.shutdown", "PUT"),
    route("vmm.metrics", "GET"),
    route("vm.create", "PUT"),
    route("vm.boot", "PUT"),
    route("vm.delete", "PUT"),
    route("vm.info", "GET"),
    route("vm.counters", "GET"),
    route("vm.pause", "PUT"),
    route("vm.resume", "PUT"),
    route("vm.shutdown", "PUT"),
    route("vm.reboot", "PUT"),
    route("vm.power-button", "PUT"),
    route("vm.snapshot", "PUT"),
    route("vm.restore", "PUT"),
    route("vm.send-migration", "PUT"),
    route("vm.receive-migration", "PUT"),
    route("vm.cancel-migration", "PUT"),
];

/// The endpoint a path names: the part after [`API_PREFIX`], or `vmm.metrics` for
/// `/metrics` (where Prometheus looks by default).
fn endpoint_of(path: &str) -> Option<&str> {
    if path == "/metrics" {
        return Some("vmm.metrics");
    }
    path.strip_prefix(API_PREFIX)
}

/// Decodes one request. Bodies of endpoints that take none are ignored, as Cloud Hypervisor
/// does; `vm.create`'s body must be a valid `VmConfig` (JSON, then [`VmConfig::validate`]).
pub fn parse_request(method: &str, path: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let endpoint = endpoint_of(path)
        .ok_or_else(|| ApiError::not_found(format!("no such path '{}'", printable(path))))?;
    let route = ROUTES
        .iter()
        .find(|r| r.endpoint == endpoint)
        .ok_or_else(|| {
            ApiError::not_found(format!("no such endpoint '{}'", printable(endpoint)))
        })?;
    if route.method != method {
        return Err(ApiError::new(
            ErrorStatus::MethodNotAllowed,
            format!(
                "{} takes {}, not {}",
                route.endpoint,
                route.method,
                printable(method)
            ),
        ));
    }
    if body.len() > MAX_BODY_BYTES {
        return Err(too_large(body.len() as u64));
    }
    Ok(match route.endpoint {
        "vmm.ping" => ApiRequest::VmmPing,
        "vmm.shutdown" => ApiRequest::VmmShutdown,
        "vmm.metrics" => ApiRequest::VmmMetrics,
        "vm.create" => ApiRequest::VmCreate(Box::new(parse_vm_config(body)?)),
        "vm.boot" => ApiRequest::VmBoot,
        "vm.delete" => ApiRequest::VmDelete,
        "vm.info" => ApiRequest::VmInfo,
        "vm.counters" => ApiRequest::VmCounters,
        "vm.pause" => ApiRequest::VmPause,
        "vm.resume" => ApiRequest::VmResume,
        "vm.shutdown" => ApiRequest::VmShutdown,
        "vm.reboot" => ApiRequest::VmReboot,
        "vm.power-button" => ApiRequest::VmPowerButton,
        "vm.cancel-migration" => ApiRequest::VmCancelMigration,
        "vm.snapshot" => {
            let body: VmSnapshotConfig = parse_body("vm.snapshot", "VmSnapshotConfig", body)?;
            ApiRequest::VmSnapshot {
                dir: dir_from_url(&body.destination_url)?,
            }
        }
        "vm.restore" => {
            let body: RestoreConfig = parse_body("vm.restore", "RestoreConfig", body)?;
            no_net_fds("vm.restore", body.net_fds.is_some())?;
            ApiRequest::VmRestore {
                dir: dir_from_url(&body.source_url)?,
                net: body.net,
            }
        }
        "vm.send-migration" => {
            let body: VmSendMigrationData =
                parse_body("vm.send-migration", "VmSendMigrationData", body)?;
            let endpoint = migration_endpoint(&body.destination_url)?;
            if body.local && !matches!(endpoint, Endpoint::Unix(_)) {
                return Err(ApiError::bad_request(
                    "vm.send-migration: local (guest memory handed over on one host) needs a \
                     unix:/PATH destination",
                ));
            }
            let defaults = SendOptions::default();
            ApiRequest::VmSendMigration {
                endpoint,
                options: SendOptions {
                    downtime_limit_ms: body.downtime_limit_ms.unwrap_or(defaults.downtime_limit_ms),
                    bandwidth_limit: body.bandwidth_limit,
                    completion_timeout_s: body
                        .completion_timeout_s
                        .unwrap_or(defaults.completion_timeout_s),
                    auto_converge: body.auto_converge,
                    local: body.local,
                },
            }
        }
        "vm.receive-migration" => {
            let body: VmReceiveMigrationData =
                parse_body("vm.receive-migration", "VmReceiveMigrationData", body)?;
            no_net_fds("vm.receive-migration", body.net_fds.is_some())?;
            ApiRequest::VmReceiveMigration {
                endpoint: migration_endpoint(&body.receiver_url)?,
                net: body.net,
            }
        }
        other => {
            return Err(ApiError::internal(format!(
                "route {other} has no request (a bug)"
            )))
        }
    })
}

/// The methods a path is served with (for a 405's `Allow` header).
pub fn allowed_method(path: &str) -> Option<&'static str> {
    let endpoint = endpoint_of(path)?;
    ROUTES
        .iter()
        .find(|r| r.endpoint == endpoint)
        .map(|r| r.method)
}

/// The 413 answer for a body of `len` bytes.
pub fn too_large(len: u64) -> ApiError {
    ApiError::new(
        ErrorStatus::PayloadTooLarge,
        format!("request body is {len} bytes or more; the limit is {MAX_BODY_BYTES}"),
    )
}

fn parse_body<T: serde::de::DeserializeOwned>(
    endpoint: &str,
    what: &str,
    body: &[u8],
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(format!(
            "{endpoint} needs a {what} JSON body"
        )));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("invalid {what}: {e}")))
}

/// Cloud Hypervisor's `net_fds` hands taps over as descriptors on the API socket; this API
/// takes none, so a request relying on them is refused rather than restored without them.
fn no_net_fds(what: &str, given: bool) -> Result<(), ApiError> {
    if given {
        return Err(ApiError::bad_request(format!(
            "{what}: net_fds (taps passed as file descriptors) is not supported; name the taps \
             instead: \"net\": [{{\"id\": \"<interface id>\", \"tap\": \"<tap name>\"}}]"
        )));
    }
    Ok(())
}

fn migration_endpoint(url: &str) -> Result<Endpoint, ApiError> {
    Endpoint::parse(url).map_err(|e| ApiError::bad_request(e.to_string()))
}

fn dir_from_url(url: &str) -> Result<std::path::PathBuf, ApiError> {
    vmm::snapshot::dir_from_url(url).map_err(ApiError::bad_request)
}

fn parse_vm_config(body: &[u8]) -> Result<VmConfig, ApiError> {
    let config: VmConfig = parse_body("vm.create", "VmConfig", body)?;
    config
        .validate()
        .map_err(|e| ApiError::bad_request(format!("invalid VmConfig: {e}")))?;
    Ok(config)
}

/// At most 64 characters of `s`, control characters escaped: safe to echo in an error.
fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(64).flat_map(char::escape_default).collect();
    if s.chars().nth(64).is_some() {
        out.push_str("...");
    }
    out
}

/// The media type of an answer's body.
pub fn content_type(result: &Result<ApiResponse, ApiError>) -> &'static str {
    match result {
        Ok(ApiResponse::Metrics(_)) => "text/plain; version=0.0.4",
        _ => "application/json",
    }
}

/// The HTTP status and body (JSON, or a metrics page; none for 204) of an answer.
pub fn encode_response(result: &Result<ApiResponse, ApiError>) -> (u16, Option<Vec<u8>>) {
    let json = match result {
        Ok(ApiResponse::Empty) => return (204, None),
        Ok(ApiResponse::Ping(p)) => serde_json::to_vec(p),
        Ok(ApiResponse::Info(i)) => serde_json::to_vec(i),
        Ok(ApiResponse::Counters(c)) => serde_json::to_vec(c),
        Ok(ApiResponse::Metrics(page)) => Ok(page.clone().into_bytes()),
        Err(e) => return (e.status.code(), Some(error_body(&e.message))),
    };
    match json {
        Ok(body) => (200, Some(body)),
        Err(e) => (
            500,
            Some(error_body(&format!("cannot encode the answer: {e}"))),
        ),
    }
}

fn error_body(message: &str) -> Vec<u8> {
    let body = ErrorBody {
        error: message.to_owned(),
    };
    serde_json::to_vec(&body).unwrap_or_else(|_| b"{\"error\":\"unknown\"}".to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{VmInfo, VmmPingResponse};
    use vmm::lifecycle::VmState;

    const CONFIG: &str = r#"{
        "payload": {"kernel": "/k", "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 536870912},
        "disks": [{"path": "/d.raw", "readonly": true, "direct": false}],
        "net": [{"tap": "tap0", "ip": "10.0.0.1", "mask": "255.255.255.0", "mac": "52:54:00:00:00:01"}],
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "File", "file": "/tmp/s"},
        "console": {"mode": "Off"}
    }"#;

    fn p(method: &str, endpoint: &str, body: &str) -> Result<ApiRequest, ApiError> {
        parse_request(method, &format!("{API_PREFIX}{endpoint}"), body.as_bytes())
    }

    fn status(r: Result<ApiRequest, ApiError>) -> u16 {
        r.map(|_| 200).unwrap_or_else(|e| e.status.code())
    }

    #[test]
    fn every_route() {
        let expected = [
            ("vmm.ping", ApiRequest::VmmPing),
            ("vmm.shutdown", ApiRequest::VmmShutdown),
            ("vmm.metrics", ApiRequest::VmmMetrics),
            ("vm.boot", ApiRequest::VmBoot),
            ("vm.delete", ApiRequest::VmDelete),
            ("vm.info", ApiRequest::VmInfo),
            ("vm.counters", ApiRequest::VmCounters),
            ("vm.pause", ApiRequest::VmPause),
            ("vm.resume", ApiRequest::VmResume),
            ("vm.shutdown", ApiRequest::VmShutdown),
            ("vm.reboot", ApiRequest::VmReboot),
            ("vm.power-button", ApiRequest::VmPowerButton),
            ("vm.cancel-migration", ApiRequest::VmCancelMigration),
        ];
        let count = expected.len();
        for (endpoint, request) in expected {
            let method = allowed_method(&format!("{API_PREFIX}{endpoint}")).unwrap();
            assert_eq!(p(method, endpoint, ""), Ok(request), "{endpoint}");
            let other = if method == "GET" { "PUT" } else { "GET" };
            for wrong in [other, "POST", "DELETE", "PATCH", "HEAD", "get", ""] {
                assert_eq!(status(p(wrong, endpoint, "")), 405, "{wrong} {endpoint}");
            }
        }
        match p("PUT", "vm.create", CONFIG).unwrap() {
            ApiRequest::VmCreate(c) => {
                assert_eq!(c.cpus.boot_vcpus, 2);
                assert_eq!(c.memory.size, 512 << 20);
                assert!(c.disks[0].readonly);
                assert_eq!(c.net[0].tap.as_deref(), Some("tap0"));
                assert_eq!(c.serial, vmm::config::ConsoleConfig::File("/tmp/s".into()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(status(p("GET", "vm.create", CONFIG)), 405);
        assert_eq!(
            p(
                "PUT",
                "vm.snapshot",
                r#"{"destination_url":"file:///tmp/s"}"#
            ),
            Ok(ApiRequest::VmSnapshot {
                dir: "/tmp/s".into()
            })
        );
        assert_eq!(
            p(
                "PUT",
                "vm.restore",
                r#"{"source_url":"file:///tmp/s","prefault":true}"#
            ),
            Ok(ApiRequest::VmRestore {
                dir: "/tmp/s".into(),
                net: vec![],
            })
        );
        assert_eq!(
            p(
                "PUT",
                "vm.restore",
                r#"{"source_url":"file:///tmp/s","net":[{"id":"_net0","tap":"tap7"}]}"#
            ),
            Ok(ApiRequest::VmRestore {
                dir: "/tmp/s".into(),
                net: vec![vmm::config::NetRetap {
                    id: "_net0".into(),
                    tap: "tap7".into()
                }],
            })
        );
        for (endpoint, body, needle) in [
            ("vm.snapshot", "", "needs a VmSnapshotConfig"),
            (
                "vm.snapshot",
                r#"{"destination_url":"tcp:1:2"}"#,
                "not a file:// URL",
            ),
            (
                "vm.snapshot",
                r#"{"destination_url":"file://rel"}"#,
                "absolute",
            ),
            ("vm.restore", r#"{"source":"file:///x"}"#, "unknown field"),
            (
                "vm.restore",
                r#"{"source_url":"file:///x","net_fds":[{"id":"n","num_fds":1}]}"#,
                "net_fds (taps passed as file descriptors) is not supported",
            ),
            (
                "vm.restore",
                r#"{"source_url":"file:///x","net":[{"id":"n"}]}"#,
                "missing field `tap`",
            ),
            (
                "vm.receive-migration",
                r#"{"receiver_url":"unix:/m","net_fds":[]}"#,
                "name the taps instead",
            ),
            ("vm.send-migration", "", "needs a VmSendMigrationData"),
            (
                "vm.send-migration",
                r#"{"destination_url":"file:///x"}"#,
                "neither unix:/PATH nor tcp:HOST:PORT",
            ),
            (
                "vm.send-migration",
                r#"{"destination_url":"tcp:h:1","local":true}"#,
                "needs a unix:/PATH destination",
            ),
            (
                "vm.receive-migration",
                r#"{"receiver_url":"tcp:nohost"}"#,
                "tcp:HOST:PORT",
            ),
        ] {
            let e = p("PUT", endpoint, body).unwrap_err();
            assert_eq!(e.status, ErrorStatus::BadRequest, "{endpoint} {body}");
            assert!(
                e.message.contains(needle),
                "{endpoint} {body}: {}",
                e.message
            );
        }
        assert_eq!(
            p(
                "PUT",
                "vm.send-migration",
                r#"{"destination_url":"tcp:10.0.0.2:6000","downtime_limit_ms":50}"#
            ),
            Ok(ApiRequest::VmSendMigration {
                endpoint: Endpoint::Tcp("10.0.0.2:6000".into()),
                options: SendOptions {
                    downtime_limit_ms: 50,
                    ..SendOptions::default()
                },
            })
        );
        assert_eq!(
            p(
                "PUT",
                "vm.send-migration",
                r#"{"destination_url":"unix:/run/m.sock","local":true}"#
            ),
            Ok(ApiRequest::VmSendMigration {
                endpoint: Endpoint::Unix("/run/m.sock".into()),
                options: SendOptions {
                    local: true,
                    ..SendOptions::default()
                },
            })
        );
        assert_eq!(
            p(
                "PUT",
                "vm.receive-migration",
                r#"{"receiver_url":"unix:/run/m.sock"}"#
            ),
            Ok(ApiRequest::VmReceiveMigration {
                endpoint: Endpoint::Unix("/run/m.sock".into()),
                net: vec![],
            })
        );
        assert_eq!(
            p(
                "PUT",
                "vm.receive-migration",
                r#"{"receiver_url":"unix:/m","net":[{"id":"a","tap":"b"}]}"#
            ),
            Ok(ApiRequest::VmReceiveMigration {
                endpoint: Endpoint::Unix("/m".into()),
                net: vec![vmm::config::NetRetap {
                    id: "a".into(),
                    tap: "b".into()
                }],
            })
        );
        assert_eq!(ROUTES.len(), count + 5);
    }

    #[test]
    fn metrics_at_prometheus_path_too() {
        assert_eq!(allowed_method("/metrics"), Some("GET"));
        assert_eq!(allowed_method("/api/v1/vmm.metrics"), Some("GET"));
        for path in ["/metrics", "/api/v1/vmm.metrics"] {
            assert_eq!(parse_request("GET", path, b""), Ok(ApiRequest::VmmMetrics));
        }
        assert_eq!(
            parse_request("PUT", "/metrics", b"").unwrap_err().status,
            ErrorStatus::MethodNotAllowed
        );
        let page = Ok(ApiResponse::Metrics("a 1\n".into()));
        assert_eq!(encode_response(&page), (200, Some(b"a 1\n".to_vec())));
        assert_eq!(content_type(&page), "text/plain; version=0.0.4");
    }

    #[test]
    fn unknown_paths() {
        for path in [
            "/",
            "",
            "/api/v1/",
            "/api/v1/vm.infox",
            "/api/v1/vm.info/",
            "/api/v2/vm.info",
            "/api/v1//vm.info",
            "api/v1/vm.info",
            "/api/v1/vm.snapshots",
            "/api/v1/vmm.info",
            "/api/v1/VM.INFO",
        ] {
            let e = parse_request("GET", path, b"").unwrap_err();
            assert_eq!(e.status, ErrorStatus::NotFound, "{path}");
        }
        let e = parse_request("GET", "/\u{1b}[31m", b"").unwrap_err();
        assert!(e.message.contains("\\u{1b}"), "{}", e.message);
    }

    #[test]
    fn bad_bodies() {
        for (body, needle) in [
            ("", "needs a VmConfig"),
            ("  \n", "needs a VmConfig"),
            ("{", "EOF"),
            ("null", "invalid type"),
            ("[]", "invalid length"),
            ("{}", "missing field `payload`"),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":"2"},"memory":{"size":1}}"#,
                "invalid type: string",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":300},"memory":{"size":1}}"#,
                "300",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":-1},"memory":{"size":1}}"#,
                "-1",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1},"memory":{"size":1}}"#,
                "at least",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1,"max_vcpus":4},"memory":{"size":536870912}}"#,
                "hotplug",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1},"memory":{"size":536870912},"console":{"mode":"Tty"}}"#,
                "virtio-console",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1},"memory":{"size":536870912},"serial":{"mode":"Pty"}}"#,
                "unknown serial mode 'Pty'",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1},"memory":{"size":536870912},"net":[{"ip":"1.2.3"}]}"#,
                "invalid",
            ),
            ("\u{0}\u{ff}", "invalid VmConfig"),
        ] {
            let e = p("PUT", "vm.create", body).unwrap_err();
            assert_eq!(e.status, ErrorStatus::BadRequest, "{body}: {e}");
            assert!(e.message.contains(needle), "{body}: {}", e.message);
        }
        let e =
            parse_request("PUT", "/api/v1/vm.create", &vec![b' '; MAX_BODY_BYTES + 1]).unwrap_err();
        assert_eq!(e.status, ErrorStatus::PayloadTooLarge);
        // Bodies of endpoints that take none are ignored.
        assert_eq!(p("PUT", "vm.boot", "{garbage"), Ok(ApiRequest::VmBoot));
    }

    #[test]
    fn responses() {
        assert_eq!(encode_response(&Ok(ApiResponse::Empty)), (204, None));
        let (code, body) = encode_response(&Ok(ApiResponse::Ping(VmmPingResponse::current())));
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_slice(&body.unwrap()).unwrap();
        assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
        let config = match p("PUT", "vm.create", CONFIG).unwrap() {
            ApiRequest::VmCreate(c) => *c,
            _ => unreachable!(),
        };
        let info = VmInfo {
            config,
            state: VmState::Paused,
            memory_actual_size: Some(512 << 20),
            migration: Some(Box::new(vmm::migration::MigrationInfo {
                state: vmm::migration::MigrationState::Failed,
                progress: vmm::migration::Progress {
                    round: 3,
                    bytes_sent: 1 << 20,
                    ..Default::default()
                },
                error: Some("the other side: out of memory".into()),
            })),
        };
        let (code, body) = encode_response(&Ok(ApiResponse::Info(Box::new(info.clone()))));
        assert_eq!(code, 200);
        let v: serde_json::Value = serde_json::from_slice(body.as_ref().unwrap()).unwrap();
        assert_eq!(v["state"], "Paused");
        assert_eq!(v["config"]["cpus"]["boot_vcpus"], 2);
        assert_eq!(v["config"]["memory"]["size"], 536870912u64);
        assert_eq!(v["config"]["payload"]["kernel"], "/k");
        assert_eq!(v["config"]["serial"]["mode"], "File");
        assert_eq!(v["migration"]["state"], "Failed");
        assert_eq!(v["migration"]["round"], 3);
        assert_eq!(v["migration"]["error"], "the other side: out of memory");
        assert_eq!(
            serde_json::from_slice::<VmInfo>(&body.unwrap()).unwrap(),
            info
        );
        let err = ApiError::from(
            vmm::lifecycle::next_state(vmm::lifecycle::Action::Pause, Some(VmState::Created))
                .unwrap_err(),
        );
        let (code, body) = encode_response(&Err(err));
        assert_eq!(code, 409);
        let b: ErrorBody = serde_json::from_slice(&body.unwrap()).unwrap();
        assert_eq!(b.error, "vm.pause: the VM is Created; it must be Running");
    }
}
