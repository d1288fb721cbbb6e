//! # fleet-store-sled
//!
//! The embedded, crash-safe default store of fleet, on [sled](https://docs.rs/sled) 0.34: one
//! control-plane process keeps its whole fleet on local disk with no other service to run.
//!
//! This crate is being built under issue #4; until then it only reserves its place in the
//! workspace. Use [`fleet_core::MemoryStore`] meanwhile.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use fleet_core;
