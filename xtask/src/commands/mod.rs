//! One module per `cargo xtask` command. Commands share code only through [`crate::utils`] and the
//! public APIs named here: the pipeline measures training steps through [`bench::train`], and every
//! command that needs the models calls [`setup::run`] first.

pub mod bench;
pub mod browser;
pub mod chaos;
pub mod fuzz;
pub mod loadtest;
pub mod pipeline;
pub mod repro;
pub mod setup;
pub mod sweep;
pub mod test;
