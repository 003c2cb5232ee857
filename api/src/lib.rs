//! podvisor's control API.
//!
//! The REST API on a Unix socket (Cloud Hypervisor's OpenAPI shapes) lands here; the VM
//! configuration types it will accept already live in `vmm::config`, shared with the CLI.
