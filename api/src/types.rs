//! The boundary between the HTTP layer and the VMM: requests in, answers out.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vmm::config::{NetRetap, VmConfig};
use vmm::lifecycle::VmState;
use vmm::migration::{Endpoint, MigrationInfo, SendOptions};

/// One API action, decoded from an HTTP request (see [`crate::parse_request`]). The states each
/// `vm.*` action is allowed in, and the state after it, are [`vmm::lifecycle::RULES`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET vmm.ping`: is the VMM alive? Answer [`ApiResponse::Ping`].
    VmmPing,
    /// `PUT vmm.shutdown`: stop the VM (if any) and end the VMM process. Answer
    /// [`ApiResponse::Empty`] first: the server writes the answer, the launcher then calls
    /// [`crate::ApiServer::shutdown`], which waits for answers in flight.
    VmmShutdown,
    /// `GET vmm.metrics` (also `GET /metrics`): answer [`ApiResponse::Metrics`], the VM's
    /// state and counters for Prometheus ([`crate::metrics`]). Any state, with a VM or not.
    VmmMetrics,
    /// `PUT vm.create`: remember this (already validated) configuration. No VM → `Created`.
    VmCreate(Box<VmConfig>),
    /// `PUT vm.boot`: `Created` or `Shutdown` → `Running`.
    VmBoot,
    /// `PUT vm.delete`: drop the VM (stopping it if it runs); no VM afterwards. Any state.
    VmDelete,
    /// `GET vm.info`: answer [`ApiResponse::Info`]. Any state.
    VmInfo,
    /// `GET vm.counters`: answer [`ApiResponse::Counters`]. Any state.
    VmCounters,
    /// `PUT vm.pause`: `Running` → `Paused`.
    VmPause,
    /// `PUT vm.resume`: `Paused` → `Running`.
    VmResume,
    /// `PUT vm.shutdown`: `Running` or `Paused` → `Shutdown`.
    VmShutdown,
    /// `PUT vm.reboot`: `Running` → `Running`, from a fresh boot.
    VmReboot,
    /// `PUT vm.power-button`: press the ACPI power button (the guest decides what to do).
    /// `Running` only.
    VmPowerButton,
    /// `PUT vm.snapshot {"destination_url":"file:///DIR"}`: write the paused VM into DIR
    /// (absent or empty). `Paused` only; the VM stays paused.
    VmSnapshot { dir: PathBuf },
    /// `PUT vm.restore {"source_url":"file:///DIR"}`: bring back the VM snapshotted in DIR,
    /// paused, its network interfaces on the taps `net` names instead of the snapshot's.
    /// No VM → `Paused`.
    VmRestore { dir: PathBuf, net: Vec<NetRetap> },
    /// `PUT vm.send-migration {"destination_url":"unix:/PATH"|"tcp:HOST:PORT", ...}`: live-migrate
    /// the running VM to a podvisor waiting in `vm.receive-migration`; answers when the guest
    /// runs there. `Running` → no VM (on failure the VM runs on here, unchanged).
    VmSendMigration {
        endpoint: Endpoint,
        options: SendOptions,
    },
    /// `PUT vm.receive-migration {"receiver_url":...}`: wait for a source and take its VM;
    /// answers when the guest runs here; its network interfaces on the taps `net` names instead
    /// of the source's. No VM → `Running`.
    VmReceiveMigration {
        endpoint: Endpoint,
        net: Vec<NetRetap>,
    },
    /// `PUT vm.cancel-migration`: stop the outgoing migration under way; the guest runs on
    /// here and `vm.send-migration` answers that it was cancelled. `Running` only, and only
    /// while a migration is under way and the destination has not been told to run the guest
    /// (409 otherwise).
    VmCancelMigration,
}

/// `vm.send-migration`'s body: Cloud Hypervisor's `VmSendMigrationData` and, optional, the
/// limits KubeVirt's migration policies set.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSendMigrationData {
    pub destination_url: String,
    /// Cloud Hypervisor's same-host migration: the guest memory's memfd is handed over on the
    /// Unix socket instead of being copied (400 with a tcp: destination).
    #[serde(default)]
    pub local: bool,
    /// The longest pause of the guest for the last pass, in ms (default 300).
    #[serde(default)]
    pub downtime_limit_ms: Option<u64>,
    /// At most this many bytes per second on the wire (default: no limit).
    #[serde(default)]
    pub bandwidth_limit: Option<u64>,
    /// Give up when memory has not converged after this many seconds (default 600).
    #[serde(default)]
    pub completion_timeout_s: Option<u64>,
    /// Slow the guest down while it writes memory faster than it can be sent.
    #[serde(default)]
    pub auto_converge: bool,
}

/// `vm.receive-migration`'s body (Cloud Hypervisor's `VmReceiveMigrationData`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmReceiveMigrationData {
    pub receiver_url: String,
    /// Other taps for the VM's network interfaces (podvisor's; see [`RestoreConfig::net`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetRetap>,
    /// Cloud Hypervisor's taps as descriptors passed on the socket: refused with a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_fds: Option<serde_json::Value>,
}

/// `vm.snapshot`'s body (Cloud Hypervisor's `VmSnapshotConfig`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSnapshotConfig {
    pub destination_url: String,
}

/// `vm.restore`'s body (Cloud Hypervisor's `RestoreConfig`). Memory is always copied in whole
/// before the VM runs, so `prefault` changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    pub source_url: String,
    #[serde(default)]
    pub prefault: bool,
    /// Other taps for the VM's network interfaces, by interface ID (`[{"id":"net0",
    /// "tap":"tap7"}]`): the snapshot's may not exist here, or be in use. The guest keeps its
    /// MAC. podvisor's counterpart of Cloud Hypervisor's `net_fds`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net: Vec<NetRetap>,
    /// Cloud Hypervisor's taps as descriptors passed on the socket: refused with a reason.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_fds: Option<serde_json::Value>,
}

/// Per-device counters: device id → counter name → value (Cloud Hypervisor's `VmCounters`).
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// A successful answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiResponse {
    /// 204 No Content.
    Empty,
    /// 200 with a [`VmmPingResponse`].
    Ping(VmmPingResponse),
    /// 200 with a [`VmInfo`] (boxed: it holds the whole VM configuration).
    Info(Box<VmInfo>),
    /// 200 with a [`VmCounters`] object.
    Counters(VmCounters),
    /// 200 with a Prometheus text page (`text/plain; version=0.0.4`).
    Metrics(String),
}

/// `vmm.ping`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    pub version: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub build_version: String,
    #[serde(default)]
    pub pid: i64,
    #[serde(default)]
    pub features: Vec<String>,
}

impl VmmPingResponse {
    /// The answer for this process: podvisor's version and PID.
    pub fn current() -> Self {
        VmmPingResponse {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            build_version: String::new(),
            pid: i64::from(std::process::id()),
            features: Vec::new(),
        }
    }
}

/// `vm.info`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    pub config: VmConfig,
    pub state: VmState,
    /// Guest RAM in bytes as the VM has it now (no balloon: the configured size).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_actual_size: Option<u64>,
    /// The VM's outgoing migration while it runs, or the last one that failed (podvisor's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Box<MigrationInfo>>,
}

/// The HTTP status of a refused request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorStatus {
    /// 400: the body is not valid JSON, has the wrong types, or the config fails validation.
    BadRequest,
    /// 404: unknown path, or no VM exists for a VM action.
    NotFound,
    /// 405: the path exists with another method.
    MethodNotAllowed,
    /// 408: the client was too slow sending its body.
    RequestTimeout,
    /// 409: the VM is in the wrong state for this action (the message says which).
    Conflict,
    /// 413: the body is over [`crate::MAX_BODY_BYTES`].
    PayloadTooLarge,
    /// 500: the VMM failed to carry the action out.
    Internal,
    /// 503: the server is overloaded or going away.
    Unavailable,
}

impl ErrorStatus {
    /// The HTTP status code.
    pub fn code(self) -> u16 {
        match self {
            ErrorStatus::BadRequest => 400,
            ErrorStatus::NotFound => 404,
            ErrorStatus::MethodNotAllowed => 405,
            ErrorStatus::RequestTimeout => 408,
            ErrorStatus::Conflict => 409,
            ErrorStatus::PayloadTooLarge => 413,
            ErrorStatus::Internal => 500,
            ErrorStatus::Unavailable => 503,
        }
    }
}

/// A refused or failed request: a status and one line saying why. Sent as
/// `{"error": message}` with the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    pub status: ErrorStatus,
    pub message: String,
}

impl ApiError {
    pub fn new(status: ErrorStatus, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorStatus::BadRequest, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorStatus::NotFound, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorStatus::Internal, message)
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status.code(), self.message)
    }
}

/// The body of every error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

/// What the VMM implements to be driven by the API.
///
/// The server calls [`VmmBackend::handle`] from a small pool of blocking threads, possibly
/// several at once: the backend serialises what must be serialised (a `Mutex` around its VM
/// state is enough) and enforces the state rules of [`vmm::lifecycle`], answering a request in
/// the wrong state with [`ErrorStatus::Conflict`] and a reason, and a VM action with no VM
/// created with [`ErrorStatus::NotFound`] (`ApiError::from(Refusal)` does both). `handle` may block (a boot takes time),
/// but should not wait on the guest indefinitely: other requests keep being served meanwhile,
/// and a client waiting on a request that never ends waits forever.
pub trait VmmBackend: Send + Sync + 'static {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError>;
}
