//! Envoy's ext_authz Check as the harness sends it: the CheckRequest Envoy sends, encoded once
//! per key, and an answer read only as far as its status.
//!
//! Envoy builds and parses these messages in C++, in its own process; a client that built a
//! `CheckRequest` (a dozen strings and two maps) and decoded the whole `CheckResponse` on
//! every call would spend more per call than the server's Check itself (callgrind: ~29 000
//! instructions a call more than its Health/Check client), on the two cores it shares with
//! the server, and Check's ratio to Health/Check would measure the client as much as the
//! server. Sending pre-encoded bytes keeps the client's share close to the health check's.

use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use prost::Message;
use prost::bytes::{BufMut, Bytes};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Channel;

const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The CheckRequest Envoy 1.40 sends with the shipped sidecar config (deploy/envoy/envoy.yaml)
/// for `GET /v1/tickets` carrying `key` as `x-api-key`, field for field as captured off the
/// wire: both peers' addresses, the request's time and id, only the allowed headers, the
/// route's `kemon_scopes`, and empty metadata contexts. Encoded, ready to send.
pub fn encoded_request(key: &str) -> Bytes {
    Bytes::from(request(key).encode_to_vec())
}

fn request(key: &str) -> CheckRequest {
    use envoy_types::pb::envoy::config::core::v3::address::Address as AddressKind;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::core::v3::{Address, Metadata, SocketAddress};
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Peer, Request as HttpAttributes,
    };
    use envoy_types::pb::google::protobuf::Timestamp;
    let peer = |port: u32| Peer {
        address: Some(Address {
            address: Some(AddressKind::SocketAddress(SocketAddress {
                address: "127.0.0.1".into(),
                port_specifier: Some(PortSpecifier::PortValue(port)),
                ..Default::default()
            })),
        }),
        ..Default::default()
    };
    CheckRequest {
        attributes: Some(AttributeContext {
            source: Some(peer(35838)),
            destination: Some(peer(10000)),
            request: Some(HttpAttributes {
                time: Some(Timestamp {
                    seconds: 1_795_758_554,
                    nanos: 287_207_000,
                }),
                http: Some(HttpRequest {
                    id: "4683757226997317593".into(),
                    method: "GET".into(),
                    headers: [("x-api-key".to_owned(), key.to_owned())].into(),
                    path: "/v1/tickets".into(),
                    host: "api.kemon.test".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    ..Default::default()
                }),
            }),
            context_extensions: [("kemon_scopes".to_owned(), "tickets:read".to_owned())].into(),
            metadata_context: Some(Metadata::default()),
            route_metadata_context: Some(Metadata::default()),
            ..Default::default()
        }),
    }
}

/// One Check of a request from [`encoded_request`]; anything but an OK answer is an error.
pub async fn call(channel: Channel, request: Bytes) -> Result<(), Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
    let answer = grpc
        .unary(
            tonic::Request::new(request),
            http::uri::PathAndQuery::from_static(CHECK_PATH),
            PreEncoded,
        )
        .await?
        .into_inner();
    match answer.status.map(|s| s.code) {
        Some(0) => Ok(()),
        other => Err(Status::internal(format!(
            "Check denied a valid key: {other:?}"
        ))),
    }
}

/// The field of a CheckResponse the harness reads: its status (tag 1). prost skips the rest
/// (the headers, the metadata) unread.
#[derive(Clone, PartialEq, Message)]
struct CheckStatus {
    #[prost(message, optional, tag = "1")]
    status: Option<envoy_types::pb::google::rpc::Status>,
}

/// Sends bytes as they are; decodes a [`CheckStatus`].
#[derive(Debug, Clone, Copy)]
struct PreEncoded;

impl Codec for PreEncoded {
    type Encode = Bytes;
    type Decode = CheckStatus;
    type Encoder = PreEncoded;
    type Decoder = PreEncoded;

    fn encoder(&mut self) -> PreEncoded {
        PreEncoded
    }

    fn decoder(&mut self) -> PreEncoded {
        PreEncoded
    }
}

impl Encoder for PreEncoded {
    type Item = Bytes;
    type Error = Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for PreEncoded {
    type Item = CheckStatus;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<CheckStatus>, Status> {
        CheckStatus::decode(src)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding a CheckResponse: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::ext_authz::v3::CheckRequestExt;

    #[test]
    fn the_encoded_request_is_envoys_check_request_for_the_key() {
        let decoded = CheckRequest::decode(encoded_request("sk_test_abc")).unwrap();
        assert_eq!(decoded, request("sk_test_abc"));
        let headers = decoded.get_client_headers().unwrap();
        assert_eq!(headers["x-api-key"], "sk_test_abc");
        assert_eq!(
            decoded.attributes.unwrap().context_extensions["kemon_scopes"],
            "tickets:read"
        );
    }

    #[test]
    fn only_the_status_of_an_answer_is_read() {
        use envoy_types::ext_authz::v3::CheckResponseExt;
        use envoy_types::ext_authz::v3::pb::CheckResponse;
        let mut answer = CheckResponse::with_status(Status::permission_denied("no"));
        answer.set_http_response(envoy_types::ext_authz::v3::DeniedHttpResponseBuilder::new());
        let read = CheckStatus::decode(answer.encode_to_vec().as_slice()).unwrap();
        assert_eq!(read.status.map(|s| s.code), Some(7));
    }
}
