//! What auditors use: replay and verification of a log (chained by `log::chain`), and its
//! export.
//! Reads the log through `store`; never writes it.

pub mod cli;
pub mod export;
pub mod replay;
pub mod verify;
