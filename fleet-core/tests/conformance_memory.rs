//! The reference store runs the whole conformance suite.

use fleet_core::MemoryStore;

fleet_core::store_conformance_tests!(async { ((), MemoryStore::new()) });
