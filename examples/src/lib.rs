//! Runnable examples of fleet. The binaries (`control-panel`, `agent`, `fleet-bench`) arrive with
//! issues #5 and #8; see `examples/README.md`.

#![forbid(unsafe_code)]
