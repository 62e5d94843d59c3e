//! The log's own rules, the same whatever backend stores it: the record and its hash chains
//! ([`chain`]), events to and from their stored form ([`events`]), and many keys' folded
//! states held compactly while a whole log is replayed ([`fold`]), or in parts through
//! temporary files when they do not fit in memory ([`spill`]). Depends on the domain and the
//! protos only; the store, the audit tools and the API build on it.

pub mod chain;
pub mod events;
pub mod fold;
pub mod spill;
