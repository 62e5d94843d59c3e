//! What auditors use: the hash chains, replay and verification of a log, and its export.
//! Reads the log through `store`; never writes it.

pub mod chain;
pub mod cli;
pub mod export;
pub mod replay;
pub mod verify;
