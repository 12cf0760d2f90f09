//! Feature unification only: see this crate's `Cargo.toml`. Nothing to import.
