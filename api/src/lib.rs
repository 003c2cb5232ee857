//! podvisor's control API: Cloud Hypervisor's REST API (`http://localhost/api/v1/...`) on a
//! Unix socket, described exactly by `api/openapi.yaml`.
//!
//! This crate is the HTTP side only; it runs no VM. The VMM plugs in by implementing
//! [`VmmBackend`]:
//!
//! - [`parse_request`] maps (method, path, body) to an [`ApiRequest`] or an [`ApiError`]
//!   (404 unknown path, 405 wrong method, 400 bad JSON or a config that fails
//!   `VmConfig::validate`, 413 a body over [`MAX_BODY_BYTES`]). It is pure: unit-tested and
//!   fuzzed (`api/fuzz`).
//! - [`serve`] binds the socket (mode 0600; a stale socket replaced, a live one refused) and
//!   serves on its own threads until [`ApiServer::shutdown`]. Each request that routes is handed
//!   to [`VmmBackend::handle`], whose [`ApiResponse`] or [`ApiError`] becomes the answer.
//! - [`lifecycle::next_state`] holds the state rules (409 with a reason for the wrong state) so
//!   every backend applies the same ones; [`fake::FakeVmm`] is a backend that runs no VM.
//! - [`Client`] is a blocking client over the socket (`podvisor ctl`).
//!
//! ```no_run
//! use std::sync::Arc;
//! let server = api::serve("/run/podvisor.sock".as_ref(), Arc::new(api::fake::FakeVmm::new()))?;
//! // ... until the VMM ends:
//! server.shutdown();
//! # Ok::<(), api::Error>(())
//! ```

mod client;
mod error;
pub mod fake;
pub mod lifecycle;
pub mod metrics;
mod routes;
mod server;
mod socket;
mod types;

pub use client::{Client, Reply};
pub use error::Error;
pub use routes::{
    allowed_method, encode_response, parse_request, readiness, Route, API_PREFIX, MAX_BODY_BYTES,
    READYZ, ROUTES,
};
pub use server::{
    bind, bind_probes, serve, serve_probes, serve_with, ApiServer, Listening, ServerOptions,
};
pub use types::{
    ApiError, ApiRequest, ApiResponse, ErrorBody, ErrorStatus, VmCounters, VmInfo, VmmBackend,
    VmmPingResponse,
};
pub use vmm::lifecycle::VmState;
