//! # fleet-store-postgres
//!
//! The PostgreSQL store of fleet (sqlx): several control-plane replicas share one database, each
//! keeping its live view current from the store's change feed.
//!
//! This crate is being built under issue #7; until then it only reserves its place in the
//! workspace.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use fleet_core;
