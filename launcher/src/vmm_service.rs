//! The VMM as a service: the lifecycle controller (`vmm::controller`) behind the REST API,
//! for `podvisor serve` and `podvisor run --api-socket`.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::Path;
use std::sync::Arc;

use api::{ApiError, ApiRequest, ApiResponse, ErrorStatus, VmInfo, VmmBackend, VmmPingResponse};
use vmm::controller::{ControlError, Controller, Reply, Request};
use vmm::events::EventMonitor;
use vmm::host_paths::HostPaths;

/// Where lifecycle events go: `path=FILE` (appended) or `fd=N` (a descriptor the caller
/// passed, e.g. a pipe).
pub fn parse_event_monitor(spec: &str) -> Result<EventMonitor, String> {
    let bad = || format!("invalid --event-monitor '{spec}': expected path=FILE or fd=N");
    if let Some(path) = spec.strip_prefix("path=") {
        if path.is_empty() {
            return Err(bad());
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("cannot open event monitor file {path}: {e}"))?;
        return Ok(EventMonitor::new(file));
    }
    if let Some(fd) = spec.strip_prefix("fd=") {
        let fd: i32 = fd.parse().map_err(|_| bad())?;
        // SAFETY: F_GETFD only queries the descriptor; it fails for one that is not open.
        if fd < 0 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(format!(
                "--event-monitor fd={fd}: not an open file descriptor"
            ));
        }
        // SAFETY: the caller passed this open descriptor for podvisor to write events to; it
        // is owned by the monitor from here on and used by nothing else.
        return Ok(EventMonitor::new(unsafe { File::from_raw_fd(fd) }));
    }
    Err(bad())
}

/// The real VMM behind the API.
pub struct VmmService {
    controller: Controller,
    /// Which host files a client's configuration may name.
    host_paths: HostPaths,
}

impl VmmService {
    pub fn new(controller: Controller, host_paths: HostPaths) -> Self {
        VmmService {
            controller,
            host_paths,
        }
    }

    /// Refuses (400) a path or configuration the client may not name.
    fn allowed(&self, checked: Result<(), String>) -> Result<(), ApiError> {
        checked.map_err(|e| ApiError::new(ErrorStatus::BadRequest, e))
    }

    fn call(&self, request: Request) -> Result<Reply, ApiError> {
        self.controller.handle(request).map_err(|e| match e {
            ControlError::NoVm(m) => ApiError::new(ErrorStatus::NotFound, m),
            ControlError::WrongState(m) => ApiError::new(ErrorStatus::Conflict, m),
            ControlError::Invalid(m) => ApiError::new(ErrorStatus::BadRequest, m),
            ControlError::Failed(m) => ApiError::new(ErrorStatus::Internal, m),
        })
    }

    fn done(&self, request: Request) -> Result<ApiResponse, ApiError> {
        self.call(request).map(|_| ApiResponse::Empty)
    }
}

impl VmmBackend for VmmService {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        match request {
            ApiRequest::VmmPing => Ok(ApiResponse::Ping(VmmPingResponse::current())),
            ApiRequest::VmmMetrics => {
                // No VM: the page says so (state None) instead of failing.
                let info = match self.handle(ApiRequest::VmInfo) {
                    Ok(ApiResponse::Info(info)) => Some(info),
                    _ => None,
                };
                let counters = match self.handle(ApiRequest::VmCounters) {
                    Ok(ApiResponse::Counters(c)) => c,
                    _ => Default::default(),
                };
                Ok(ApiResponse::Metrics(api::metrics::render(
                    info.as_deref(),
                    &counters,
                    &process_stats(),
                )))
            }
            ApiRequest::VmmShutdown => self.done(Request::ShutdownVmm),
            ApiRequest::VmCreate(config) => {
                self.allowed(self.host_paths.check_config(&config))?;
                self.done(Request::Create(config))
            }
            ApiRequest::VmBoot => self.done(Request::Boot),
            ApiRequest::VmDelete => self.done(Request::Delete),
            ApiRequest::VmPause => self.done(Request::Pause),
            ApiRequest::VmResume => self.done(Request::Resume),
            ApiRequest::VmShutdown => self.done(Request::Shutdown),
            ApiRequest::VmReboot => self.done(Request::Reboot),
            ApiRequest::VmPowerButton => self.done(Request::PowerButton),
            ApiRequest::VmSnapshot { dir } => {
                self.allowed(self.host_paths.check("snapshot", &dir))?;
                self.done(Request::Snapshot(dir))
            }
            ApiRequest::VmRestore { dir, net } => {
                self.allowed(self.host_paths.check("snapshot", &dir))?;
                self.done(Request::Restore(dir, net))
            }
            ApiRequest::VmSendMigration { endpoint, options } => {
                self.done(Request::SendMigration(endpoint, options))
            }
            ApiRequest::VmReceiveMigration { endpoint, net } => {
                if let vmm::migration::Endpoint::Unix(path) = &endpoint {
                    self.allowed(self.host_paths.check("receiver socket", path))?;
                }
                self.done(Request::ReceiveMigration(endpoint, net))
            }
            ApiRequest::VmCancelMigration => self.done(Request::CancelMigration),
            ApiRequest::VmInfo => match self.call(Request::Info)? {
                Reply::Info {
                    config,
                    state,
                    migration,
                } => Ok(ApiResponse::Info(Box::new(VmInfo {
                    memory_actual_size: Some(config.memory.size),
                    config: *config,
                    state,
                    migration: migration.map(Box::new),
                }))),
                other => Err(ApiError::internal(format!("vm.info: unexpected {other:?}"))),
            },
            ApiRequest::VmCounters => match self.call(Request::Counters)? {
                Reply::Counters(c) => Ok(ApiResponse::Counters(c)),
                other => Err(ApiError::internal(format!(
                    "vm.counters: unexpected {other:?}"
                ))),
            },
        }
    }
}

/// This process's vCPU threads' CPU time (threads named `vcpuN`) and resident memory, from
/// /proc.
fn process_stats() -> api::metrics::ProcessStats {
    // SAFETY: sysconf only reads a configuration value.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let page = 4096u64;
    let mut vcpu_seconds = Vec::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = task.path();
        let Ok(comm) = std::fs::read_to_string(path.join("comm")) else {
            continue;
        };
        let Some(id) = comm
            .trim()
            .strip_prefix("vcpu")
            .and_then(|n| n.parse().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        // Fields after the command's closing parenthesis: utime and stime are the 12th and
        // 13th of them.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
        let time = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        vcpu_seconds.push((id, (time(11) + time(12)) as f64 / ticks));
    }
    vcpu_seconds.sort_by_key(|(id, _)| *id);
    let resident_bytes = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * page);
    api::metrics::ProcessStats {
        vcpu_seconds,
        resident_bytes,
    }
}

/// The sockets a VMM is served on, bound before the VM starts so that a client connecting
/// during the boot waits for its answer instead of finding no socket.
pub struct Listeners {
    api: Option<api::Listening>,
    probes: Option<api::Listening>,
}

impl Listeners {
    /// Binds the API's Unix socket and the TCP address of `/readyz` and `/metrics`, each if
    /// given.
    pub fn bind(
        socket: Option<&Path>,
        http_listen: Option<std::net::SocketAddr>,
    ) -> Result<Self, String> {
        Ok(Listeners {
            api: socket
                .map(api::bind)
                .transpose()
                .map_err(|e| e.to_string())?,
            probes: http_listen
                .map(api::bind_probes)
                .transpose()
                .map_err(|e| e.to_string())?,
        })
    }
}

/// Serves `listeners` for `controller` until the VMM ends; returns how it ended.
pub fn serve_until_end(
    listeners: Listeners,
    controller: Controller,
    vmm_thread: std::thread::JoinHandle<Result<vmm::controller::Ended, vmm::Error>>,
    host_paths: HostPaths,
) -> Result<(), String> {
    let service: Arc<dyn api::VmmBackend> =
        Arc::new(VmmService::new(controller.clone(), host_paths));
    let served: Result<Vec<api::ApiServer>, String> = [listeners.api, listeners.probes]
        .into_iter()
        .flatten()
        .map(|listening| listening.serve(service.clone()).map_err(|e| e.to_string()))
        .collect();
    let servers = match served {
        Ok(servers) => servers,
        Err(e) => {
            // Nothing serves the VM: end it rather than run it unreachable.
            let _ = controller.handle(vmm::controller::Request::ShutdownVmm);
            let _ = vmm_thread.join();
            return Err(e);
        }
    };
    let result = vmm_thread
        .join()
        .map_err(|_| "the VMM thread panicked".to_owned())
        .and_then(|r| r.map_err(|e| e.to_string()));
    for server in servers {
        server.shutdown();
    }
    result.map(|_| ())
}
