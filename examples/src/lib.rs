//! Runnable examples of fleet; see `examples/README.md` for where to start. The library holds the
//! pieces the binaries share: the operator API and the demo agents.

#![forbid(unsafe_code)]

pub mod demo;
pub mod operator;
