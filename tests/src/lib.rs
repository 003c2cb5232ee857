//! Helpers for podvisor's end-to-end tests.
