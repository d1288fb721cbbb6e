//! `fleet-bench`: end-to-end performance of the real server path over real TLS on loopback; see
//! the binary's documentation and the README's "Performance" section.
//!
//! The server runs in a child process ([`child`]) that `fleet-bench` can pin to its own core, so
//! its CPU time and memory ([`procfs`]) are its own; the load generator ([`run`]) speaks HTTP/1.1
//! through a deliberately small client ([`wire`]) so that it spends less of its core per request
//! than the server does.

pub mod child;
pub mod procfs;
pub mod run;
pub mod stats;
pub mod wire;
