//! Domain values to and from their protobuf forms: shared by the API (`grpc`) and the event
//! payloads of the log (`log::events`), which use the same messages and enums.

use crate::domain::{Environment, KeyType};
use crate::proto::v1 as pb;

/// Unix milliseconds as a protobuf Timestamp.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A protobuf Timestamp as Unix milliseconds (sub-millisecond precision dropped).
pub fn timestamp_ms(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos.div_euclid(1_000_000)))
}

/// Milliseconds as a protobuf Duration.
pub fn duration(ms: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: ms / 1000,
        nanos: i32::try_from((ms % 1000) * 1_000_000).unwrap_or(0),
    }
}

/// A protobuf Duration as whole milliseconds; `None` when it is not a valid Duration (seconds
/// and nanos of different signs, nanos out of range) or not a whole number of milliseconds.
pub fn duration_ms(d: &prost_types::Duration) -> Option<i64> {
    let valid = d.nanos.abs() < 1_000_000_000
        && !(d.seconds > 0 && d.nanos < 0)
        && !(d.seconds < 0 && d.nanos > 0);
    if !valid || d.nanos % 1_000_000 != 0 {
        return None;
    }
    d.seconds
        .checked_mul(1000)?
        .checked_add(i64::from(d.nanos / 1_000_000))
}

pub fn key_type_to_pb(t: KeyType) -> pb::KeyType {
    match t {
        KeyType::Private => pb::KeyType::Private,
        KeyType::Public => pb::KeyType::Public,
    }
}

pub fn key_type_from_pb(v: i32) -> Option<KeyType> {
    match pb::KeyType::try_from(v).ok()? {
        pb::KeyType::Private => Some(KeyType::Private),
        pb::KeyType::Public => Some(KeyType::Public),
        pb::KeyType::Unspecified => None,
    }
}

pub fn environment_to_pb(e: Environment) -> pb::Environment {
    match e {
        Environment::Production => pb::Environment::Production,
        Environment::Test => pb::Environment::Test,
    }
}

pub fn environment_from_pb(v: i32) -> Option<Environment> {
    match pb::Environment::try_from(v).ok()? {
        pb::Environment::Production => Some(Environment::Production),
        pb::Environment::Test => Some(Environment::Test),
        pb::Environment::Unspecified => None,
    }
}
