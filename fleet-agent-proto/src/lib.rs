//! # fleet-agent-proto
//!
//! The wire protocol between fleet agents and the control plane (JSON over HTTPS with mutual
//! TLS): message types, limits and error codes, with a `server` feature (a hyper service any
//! control plane can mount) and a `client` feature (the agent side).
//!
//! This crate is being built under issue #5; until then it only reserves its place in the
//! workspace.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use fleet_core;
