//! An in-memory backend that runs no VM: it keeps a config and a state and follows
//! [`crate::lifecycle::next_state`]. For tests and benchmarks (here and in the launcher), and a
//! reference for the real VMM's backend.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use vmm::config::VmConfig;
use vmm::lifecycle::VmState;

use crate::lifecycle::next_state;
use crate::types::{
    ApiError, ApiRequest, ApiResponse, ErrorStatus, VmCounters, VmInfo, VmmBackend, VmmPingResponse,
};

/// A pretend VMM.
#[derive(Default)]
pub struct FakeVmm {
    vm: Mutex<Option<(VmConfig, VmState)>>,
    shutdown: AtomicBool,
    requests: AtomicU64,
}

impl FakeVmm {
    pub fn new() -> Self {
        Self::default()
    }

    /// A fake that already has `config`, in `state`.
    pub fn with_vm(config: VmConfig, state: VmState) -> Self {
        FakeVmm {
            vm: Mutex::new(Some((config, state))),
            ..Default::default()
        }
    }

    /// The state now (`None`: no VM).
    pub fn state(&self) -> Option<VmState> {
        self.lock().as_ref().map(|(_, s)| *s)
    }

    /// Whether `vmm.shutdown` was asked for.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(VmConfig, VmState)>> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn counters(&self, config: &VmConfig) -> VmCounters {
        let n = self.requests.load(Ordering::Relaxed);
        let mut counters = VmCounters::new();
        for (i, disk) in config.disks.iter().enumerate() {
            let id = disk.id.clone().unwrap_or_else(|| format!("_disk{i}"));
            let c = BTreeMap::from([
                ("read_bytes".to_owned(), 512 * n),
                ("read_ops".to_owned(), n),
                ("write_bytes".to_owned(), 0),
                ("write_ops".to_owned(), 0),
            ]);
            counters.insert(id, c);
        }
        for (i, net) in config.net.iter().enumerate() {
            let id = net.id.clone().unwrap_or_else(|| format!("_net{i}"));
            let c = BTreeMap::from([
                ("rx_bytes".to_owned(), 0),
                ("rx_frames".to_owned(), 0),
                ("tx_bytes".to_owned(), 0),
                ("tx_frames".to_owned(), 0),
            ]);
            counters.insert(id, c);
        }
        counters
    }
}

impl VmmBackend for FakeVmm {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut vm = self.lock();
        let next = next_state(&request, vm.as_ref().map(|(_, s)| *s))?;
        if let ApiRequest::VmReceiveMigration { .. } = request {
            // No source to take a VM's configuration from.
            return Err(ApiError::bad_request(
                "vm.receive-migration: the fake VMM cannot receive a VM",
            ));
        }
        if let ApiRequest::VmCancelMigration = request {
            // It never migrates, so nothing is ever under way (the real VMM's words).
            return Err(ApiError::new(
                ErrorStatus::Conflict,
                vmm::migration::CancelRefused::NoMigration.to_string(),
            ));
        }
        let response = match &request {
            ApiRequest::VmmPing => ApiResponse::Ping(VmmPingResponse::current()),
            ApiRequest::VmmMetrics => {
                let info = vm.as_ref().map(|(config, state)| VmInfo {
                    config: config.clone(),
                    state: *state,
                    memory_actual_size: Some(config.memory.size),
                    migration: None,
                });
                let counters = vm
                    .as_ref()
                    .map(|(config, _)| self.counters(config))
                    .unwrap_or_default();
                ApiResponse::Metrics(crate::metrics::render(
                    info.as_ref(),
                    &counters,
                    &crate::metrics::ProcessStats::default(),
                ))
            }
            ApiRequest::VmInfo | ApiRequest::VmCounters => {
                let Some((config, state)) = vm.as_ref() else {
                    return Err(ApiError::internal("no VM after the state check (a bug)"));
                };
                if request == ApiRequest::VmInfo {
                    ApiResponse::Info(Box::new(VmInfo {
                        config: config.clone(),
                        state: *state,
                        memory_actual_size: Some(config.memory.size),
                        migration: None,
                    }))
                } else {
                    ApiResponse::Counters(self.counters(config))
                }
            }
            _ => ApiResponse::Empty,
        };
        if request == ApiRequest::VmmShutdown {
            self.shutdown.store(true, Ordering::SeqCst);
        }
        // A restore takes the snapshot's configuration (and refuses a snapshot that is not one).
        let restored = match &request {
            ApiRequest::VmRestore { dir, net } => {
                let mut config = vmm::snapshot::read(dir)
                    .map_err(|e| ApiError::bad_request(e.to_string()))?
                    .config;
                vmm::backends::retap(&mut config, net).map_err(ApiError::bad_request)?;
                Some(config)
            }
            _ => None,
        };
        *vm = match (request, next, vm.take()) {
            (ApiRequest::VmCreate(config), Some(state), _) => Some((*config, state)),
            (ApiRequest::VmRestore { .. }, Some(state), _) => restored.map(|c| (c, state)),
            (_, Some(state), Some((config, _))) => Some((config, state)),
            _ => None,
        };
        Ok(response)
    }
}
