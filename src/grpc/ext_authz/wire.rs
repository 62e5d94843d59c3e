//! The part of a `CheckRequest` that Check reads, parsed straight off the wire; an allowed
//! request's `CheckResponse`, written straight to it; and the service that serves Check so.
//!
//! Envoy describes the whole HTTP request in a Check: both peers' addresses, the time, the
//! request id, method, path, host, every allowed header, metadata contexts. Decoding all of it
//! into envoy-types' `CheckRequest` (a dozen owned strings, two hash maps with a freshly seeded
//! hasher each) and dropping it again cost more than the decision itself: ~13 000
//! instructions a call under callgrind, against ~3 000 for SHA3-256 and the cache lookup.
//! Check needs three things of it, so it reads those and skips the rest:
//! - `attributes.request.http.headers` (field 1 → 4 → 2 → 3), every entry, as slices of the
//!   received buffer;
//! - `attributes.context_extensions["kemon_scopes"]` (field 1 → 10);
//! - nothing else.
//!
//! Building an allowed answer as envoy-types' `CheckResponse` (seven owned strings, a
//! `Struct` with a hash map) to encode and drop it cost ~8 000 instructions a call more than
//! writing its bytes: [`allowed`] writes them, and a unit test holds them to what prost writes
//! for the same message.
//!
//! The parse follows protobuf's rules: fields in any order, a message field given twice is
//! merged (headers from both, the last value of a map key wins), unknown fields are skipped by
//! wire type, and a truncated or malformed message is refused. One departure: prost refuses a
//! whole message with any string that is not UTF-8, but the headers are kept as bytes, and
//! Check checks as text only those it reads (the credential, the origin, `x-kemon-*` names).
//! A header it does not read (a cookie in Latin-1) does not decide whether a key is accepted,
//! and is not checked (callgrind: the parse fell from ~2 930 to ~2 510 instructions a call).
//! The route's `kemon_scopes` is checked when parsed.

use std::ops::Range;
use std::sync::Arc;
use std::task::{Context, Poll};

use prost::Message;
use prost::bytes::{Buf, Bytes};
use tonic::Status;
use tonic::body::Body;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::{BoxFuture, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};

use super::{CheckAnswer, ExtAuthzApi, SCOPES_EXTENSION, headers_to_remove, key_id, scope_names};
use crate::cache::CachedKey;

/// What a Check reads of its request: the HTTP request's headers and the route's required
/// scopes, as ranges of the received message.
#[derive(Debug, Clone, Default)]
pub struct CheckInput {
    message: Bytes,
    headers: Vec<(Range<usize>, Range<usize>)>,
    scopes: Option<Range<usize>>,
}

impl CheckInput {
    /// The HTTP request's headers as their bytes, names in the case Envoy sent them (lower
    /// case), not checked as UTF-8: a Check compares every name but reads only a few values,
    /// and checks those.
    pub fn raw_headers(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.headers
            .iter()
            .map(|(name, value)| (&self.message[name.clone()], &self.message[value.clone()]))
    }

    /// The route's `kemon_scopes`, when it has one.
    pub fn route_scopes(&self) -> Option<&str> {
        // Checked as UTF-8 when parsed: never empty for want of it.
        self.scopes
            .as_ref()
            .map(|r| std::str::from_utf8(&self.message[r.clone()]).unwrap_or_default())
    }

    /// Parses an encoded `CheckRequest`.
    pub fn parse(message: Bytes) -> Result<CheckInput, WireError> {
        let mut input = CheckInput {
            message,
            headers: Vec::with_capacity(8),
            scopes: None,
        };
        let data = input.message.clone();
        let mut top = Reader::new(&data, 0..data.len());
        while let Some(field) = top.next()? {
            if let Field::Bytes(1, attributes) = field {
                input.attributes(&data, attributes)?;
            }
        }
        Ok(input)
    }

    fn attributes(&mut self, data: &[u8], range: Range<usize>) -> Result<(), WireError> {
        let mut attributes = Reader::new(data, range);
        while let Some(field) = attributes.next()? {
            match field {
                Field::Bytes(4, request) => {
                    let mut request = Reader::new(data, request);
                    while let Some(field) = request.next()? {
                        if let Field::Bytes(2, http) = field {
                            let mut http = Reader::new(data, http);
                            while let Some(field) = http.next()? {
                                if let Field::Bytes(3, entry) = field {
                                    self.headers.push(map_entry(data, entry)?);
                                }
                            }
                        }
                    }
                }
                Field::Bytes(10, entry) => {
                    let (key, value) = map_entry(data, entry)?;
                    if &data[key] == SCOPES_EXTENSION.as_bytes() {
                        if std::str::from_utf8(&data[value.clone()]).is_err() {
                            return Err(WireError("context_extensions.kemon_scopes is not UTF-8"));
                        }
                        self.scopes = Some(value);
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// A `map<string, string>` entry: key (1) and value (2), each absent meaning empty.
fn map_entry(data: &[u8], range: Range<usize>) -> Result<(Range<usize>, Range<usize>), WireError> {
    let mut entry = Reader::new(data, range.clone());
    let (mut key, mut value) = (range.start..range.start, range.start..range.start);
    while let Some(field) = entry.next()? {
        match field {
            Field::Bytes(1, k) => key = k,
            Field::Bytes(2, v) => value = v,
            _ => {}
        }
    }
    Ok((key, value))
}

/// Why a message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WireError(&'static str);

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "invalid CheckRequest: {}", self.0)
    }
}

/// One field: its number and, for length-delimited ones, where its bytes are.
enum Field {
    Bytes(u32, Range<usize>),
    Other,
}

/// Reads the fields of one message, `range` of `data`.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
    end: usize,
}

impl<'a> Reader<'a> {
    fn new(data: &'a [u8], range: Range<usize>) -> Reader<'a> {
        Reader {
            data,
            at: range.start,
            end: range.end,
        }
    }

    fn varint(&mut self) -> Result<u64, WireError> {
        let mut value = 0u64;
        for shift in (0..70).step_by(7) {
            if self.at >= self.end {
                return Err(WireError("truncated varint"));
            }
            let byte = self.data[self.at];
            self.at += 1;
            if shift == 63 && byte > 1 {
                return Err(WireError("varint overflows 64 bits"));
            }
            value |= u64::from(byte & 0x7f) << shift;
            if byte < 0x80 {
                return Ok(value);
            }
        }
        Err(WireError("varint longer than 10 bytes"))
    }

    fn skip(&mut self, n: u64) -> Result<Range<usize>, WireError> {
        let n = usize::try_from(n).map_err(|_| WireError("length out of range"))?;
        if n > self.end - self.at {
            return Err(WireError("field runs past the end of its message"));
        }
        let start = self.at;
        self.at += n;
        Ok(start..self.at)
    }

    /// The next field, or `None` at the end of the message.
    fn next(&mut self) -> Result<Option<Field>, WireError> {
        if self.at >= self.end {
            return Ok(None);
        }
        let key = self.varint()?;
        let number = u32::try_from(key >> 3).map_err(|_| WireError("field number too large"))?;
        if number == 0 {
            return Err(WireError("field number 0"));
        }
        match key & 7 {
            0 => {
                self.varint()?;
                Ok(Some(Field::Other))
            }
            1 => self.skip(8).map(|_| Some(Field::Other)),
            2 => {
                let length = self.varint()?;
                self.skip(length).map(|r| Some(Field::Bytes(number, r)))
            }
            5 => self.skip(4).map(|_| Some(Field::Other)),
            _ => Err(WireError(
                "unsupported wire type (groups are not used by Envoy)",
            )),
        }
    }
}

/// Appends a varint.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// Appends a length-delimited field `number` holding `bytes`.
fn put_bytes(out: &mut Vec<u8>, number: u32, bytes: &[u8]) {
    put_varint(out, u64::from(number) << 3 | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// Appends a string field, omitted when empty (proto3's default), as prost does.
fn put_string(out: &mut Vec<u8>, number: u32, text: &str) {
    if !text.is_empty() {
        put_bytes(out, number, text.as_bytes());
    }
}

/// `CheckResponse.status`: `google.rpc.Status { code: OK, message: "allowed" }`.
const ALLOWED_STATUS: &[u8] = b"\x0a\x09\x12\x07allowed";

/// `CheckResponse.dynamic_metadata`: `{"verify_code": "VERIFY_CODE_VALID"}`, a `Struct`
/// (field 1, map entry: key 1, `Value` 2 with `string_value` 3).
const VALID_METADATA: &[u8] =
    b"\x22\x24\x0a\x22\x0a\x0bverify_code\x12\x13\x1a\x11VERIFY_CODE_VALID";

/// The encoded `CheckResponse` of an allowed request: status OK; an `OkHttpResponse` (field
/// 3) setting the five `x-kemon-*` headers (overwriting, `append_action` 2) and removing the
/// headers [`headers_to_remove`] names; and the verify code's metadata.
pub(super) fn allowed(
    key: &CachedKey,
    forged: Option<&CheckInput>,
    api_key_header: &str,
) -> Vec<u8> {
    let scopes = scope_names(key.granted());
    let upstream: [(&str, &str); 5] = [
        ("x-kemon-key-id", &key_id(key)),
        ("x-kemon-workspace-id", &key.workspace_id),
        ("x-kemon-key-type", key.key_type.as_str()),
        ("x-kemon-scopes", &scopes),
        ("x-kemon-environment", key.environment.as_str()),
    ];
    let mut ok = Vec::with_capacity(320);
    let mut option = Vec::with_capacity(96);
    let mut header = Vec::with_capacity(96);
    for (name, value) in upstream {
        header.clear();
        put_string(&mut header, 1, name);
        put_string(&mut header, 2, value);
        option.clear();
        put_bytes(&mut option, 1, &header);
        // append_action: OVERWRITE_IF_EXISTS_OR_ADD.
        option.extend_from_slice(&[0x18, 0x02]);
        put_bytes(&mut ok, 2, &option);
    }
    for name in headers_to_remove(forged, api_key_header) {
        // Repeated strings keep empty entries (only singular ones are omitted).
        put_bytes(&mut ok, 5, name.as_bytes());
    }
    let mut out = Vec::with_capacity(ALLOWED_STATUS.len() + ok.len() + 8 + VALID_METADATA.len());
    out.extend_from_slice(ALLOWED_STATUS);
    put_bytes(&mut out, 3, &ok);
    out.extend_from_slice(VALID_METADATA);
    out
}

/// The codec of Check: [`CheckInput`] in, a [`CheckAnswer`] out.
#[derive(Debug, Clone, Default)]
pub struct CheckCodec;

#[derive(Debug, Clone, Default)]
pub struct CheckDecoder;

#[derive(Debug, Clone, Default)]
pub struct CheckEncoder;

impl Codec for CheckCodec {
    type Encode = CheckAnswer;
    type Decode = CheckInput;
    type Encoder = CheckEncoder;
    type Decoder = CheckDecoder;

    fn encoder(&mut self) -> CheckEncoder {
        CheckEncoder
    }

    fn decoder(&mut self) -> CheckDecoder {
        CheckDecoder
    }
}

impl Decoder for CheckDecoder {
    type Item = CheckInput;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<CheckInput>, Status> {
        let message = buf.copy_to_bytes(buf.remaining());
        CheckInput::parse(message)
            .map(Some)
            .map_err(|e| Status::invalid_argument(e.to_string()))
    }
}

impl Encoder for CheckEncoder {
    type Item = CheckAnswer;
    type Error = Status;

    fn encode(&mut self, item: CheckAnswer, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use prost::bytes::BufMut;
        match item {
            CheckAnswer::Encoded(bytes) => {
                buf.put_slice(&bytes);
                Ok(())
            }
            // EncodeBuf grows as needed: encoding cannot run out of space.
            CheckAnswer::Message(message) => message
                .encode(buf)
                .map_err(|e| Status::internal(format!("encoding a CheckResponse: {e}"))),
        }
    }
}

/// `envoy.service.auth.v3.Authorization` with [`CheckCodec`]: what envoy-types' generated
/// `AuthorizationServer` does, with this module's parse in place of prost's decode.
#[derive(Clone)]
pub struct AuthorizationService {
    api: Arc<ExtAuthzApi>,
    max_decoding_message_size: usize,
}

impl AuthorizationService {
    pub fn new(api: ExtAuthzApi, max_decoding_message_size: usize) -> AuthorizationService {
        AuthorizationService {
            api: Arc::new(api),
            max_decoding_message_size,
        }
    }
}

impl NamedService for AuthorizationService {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

/// The Check method, for [`Grpc::unary`].
struct CheckMethod(Arc<ExtAuthzApi>);

impl UnaryService<CheckInput> for CheckMethod {
    type Response = CheckAnswer;
    type Future = std::future::Ready<Result<tonic::Response<CheckAnswer>, Status>>;

    fn call(&mut self, request: tonic::Request<CheckInput>) -> Self::Future {
        std::future::ready(self.0.decide(request.get_ref()).map(tonic::Response::new))
    }
}

impl<B> tower_service::Service<http::Request<B>> for AuthorizationService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != "/envoy.service.auth.v3.Authorization/Check" {
            return Box::pin(async {
                Ok(Status::unimplemented("Authorization has only Check").into_http())
            });
        }
        let method = CheckMethod(self.api.clone());
        let limit = self.max_decoding_message_size;
        Box::pin(async move {
            let mut grpc = Grpc::new(CheckCodec).apply_max_message_size_config(Some(limit), None);
            Ok(grpc.unary(method, request).await.map(SmallFrames::wrap))
        })
    }
}

/// The largest DATA frame h2 copies into its write buffer. h2 (0.4, `codec/framed_write.rs`,
/// `CHAIN_THRESHOLD`) sends a DATA payload of 256 bytes or more from the payload itself, and
/// buffers nothing after it until it is written: the trailers then go out in a second write.
/// Health's and VerifyKey's answers are smaller and leave in one write with their head and
/// trailers; an allowed Check answer (five headers, the headers to remove, the verify code's
/// metadata) is 300–400 bytes, and took two writes, so two system calls on this side and two
/// wake-ups on Envoy's (`strace -c`: 1.9 `writev` per Check against 0.94 per VerifyKey).
const H2_COPIED_DATA: usize = 255;

/// Answers longer than this are passed on whole: a split costs 9 bytes per frame on the wire.
const SPLIT_UP_TO: usize = 4096;

pin_project_lite::pin_project! {
    /// A response body whose data frames are at most [`H2_COPIED_DATA`] bytes, so that h2
    /// copies the whole answer, and its trailers, into one write. gRPC's own framing (length
    /// prefix) does not depend on how HTTP/2 cuts the bytes.
    struct SmallFrames<B> {
        #[pin]
        inner: B,
        rest: Bytes,
    }
}

impl SmallFrames<Body> {
    fn wrap(inner: Body) -> Body {
        Body::new(SmallFrames {
            inner,
            rest: Bytes::new(),
        })
    }
}

impl<B> http_body::Body for SmallFrames<B>
where
    B: http_body::Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, B::Error>>> {
        let this = self.project();
        if !this.rest.is_empty() {
            let piece = this.rest.split_to(this.rest.len().min(H2_COPIED_DATA));
            return Poll::Ready(Some(Ok(http_body::Frame::data(piece))));
        }
        let frame = match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            other => return other,
        };
        match frame.into_data() {
            Ok(mut data) if data.len() > H2_COPIED_DATA && data.len() <= SPLIT_UP_TO => {
                *this.rest = data.split_off(H2_COPIED_DATA);
                Poll::Ready(Some(Ok(http_body::Frame::data(data))))
            }
            Ok(data) => Poll::Ready(Some(Ok(http_body::Frame::data(data)))),
            Err(frame) => Poll::Ready(Some(Ok(frame))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        let inner = self.inner.size_hint();
        let rest = self.rest.len() as u64;
        // Upper first: a lower bound above the upper one panics.
        let mut hint = http_body::SizeHint::new();
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(rest));
        }
        hint.set_lower(inner.lower().saturating_add(rest));
        hint
    }
}

#[cfg(test)]
mod tests {
    /// An answer longer than h2 copies leaves in pieces it does copy, in order, then the
    /// trailers; a long one passes whole.
    #[tokio::test]
    async fn answers_leave_in_data_frames_h2_copies() {
        use std::collections::VecDeque;
        use std::pin::Pin;

        /// A body of given frames.
        struct Frames(VecDeque<http_body::Frame<Bytes>>);

        impl http_body::Body for Frames {
            type Data = Bytes;
            type Error = std::convert::Infallible;

            fn poll_frame(
                mut self: Pin<&mut Self>,
                _: &mut Context<'_>,
            ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
                Poll::Ready(self.0.pop_front().map(Ok))
            }
        }

        async fn frames(len: usize) -> (Vec<usize>, Vec<u8>, bool) {
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let mut trailers = http::HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
            let inner = Frames(VecDeque::from([
                http_body::Frame::data(Bytes::from(bytes)),
                http_body::Frame::trailers(trailers),
            ]));
            let mut body = super::SmallFrames::wrap(Body::new(inner));
            let (mut sizes, mut joined, mut trailed) = (Vec::new(), Vec::new(), false);
            while let Some(frame) =
                std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut body), cx))
                    .await
            {
                let frame = frame.expect("frame");
                assert!(!trailed, "data after the trailers");
                match frame.into_data() {
                    Ok(data) => {
                        sizes.push(data.len());
                        joined.extend_from_slice(&data);
                    }
                    Err(frame) => trailed = frame.is_trailers(),
                }
            }
            (sizes, joined, trailed)
        }
        let expected = |len: usize| (0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>();
        for (len, sizes) in [
            (100, vec![100]),
            (255, vec![255]),
            (256, vec![255, 1]),
            (700, vec![255, 255, 190]),
            (5000, vec![5000]),
        ] {
            let (got, joined, trailed) = frames(len).await;
            assert_eq!(got, sizes, "{len}");
            assert_eq!(joined, expected(len), "{len}");
            assert!(trailed, "{len}");
        }
    }

    use std::collections::HashMap;

    use envoy_types::ext_authz::v3::pb::CheckRequest;
    use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{
        HttpRequest, Request as HttpAttributes,
    };

    use super::*;

    fn encoded(headers: &[(&str, &str)], extensions: &[(&str, &str)]) -> Bytes {
        let own = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let request = CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(HttpAttributes {
                    http: Some(HttpRequest {
                        id: "17".into(),
                        method: "GET".into(),
                        headers: own(headers),
                        path: "/v1/tickets".into(),
                        size: 12,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                context_extensions: own(extensions),
                ..Default::default()
            }),
        };
        Bytes::from(request.encode_to_vec())
    }

    fn sorted(input: &CheckInput) -> Vec<(String, String)> {
        let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
        let mut headers: Vec<(String, String)> = input
            .raw_headers()
            .map(|(k, v)| (text(k), text(v)))
            .collect();
        headers.sort();
        headers
    }

    #[test]
    fn reads_every_header_and_the_route_scopes_and_skips_the_rest() {
        let input = CheckInput::parse(encoded(
            &[
                ("x-api-key", "sk_1"),
                ("origin", "https://a.test"),
                ("x-empty", ""),
            ],
            &[("other", "x"), ("kemon_scopes", "tickets:read")],
        ))
        .expect("parses");
        assert_eq!(
            sorted(&input),
            [
                ("origin".to_owned(), "https://a.test".to_owned()),
                ("x-api-key".to_owned(), "sk_1".to_owned()),
                ("x-empty".to_owned(), String::new()),
            ]
        );
        assert_eq!(input.route_scopes(), Some("tickets:read"));
    }

    #[test]
    fn an_empty_request_has_no_headers_and_no_scopes() {
        let input = CheckInput::parse(Bytes::new()).expect("parses");
        assert_eq!(input.raw_headers().count(), 0);
        assert_eq!(input.route_scopes(), None);
    }

    #[test]
    fn a_message_field_sent_twice_is_merged() {
        // Two encodings of CheckRequest concatenated are one message whose attributes merge.
        let mut twice = encoded(&[("a", "1")], &[("kemon_scopes", "tickets:read")]).to_vec();
        twice.extend_from_slice(&encoded(
            &[("b", "2")],
            &[("kemon_scopes", "tickets:write")],
        ));
        let input = CheckInput::parse(Bytes::from(twice)).expect("parses");
        assert_eq!(
            sorted(&input),
            [("a".into(), "1".into()), ("b".into(), "2".into())]
        );
        assert_eq!(input.route_scopes(), Some("tickets:write"));
    }

    #[test]
    fn truncated_or_malformed_messages_are_refused() {
        let whole = encoded(
            &[("x-api-key", "sk_1")],
            &[("kemon_scopes", "tickets:read")],
        );
        // Every proper prefix that cuts a field short is refused, never read as something else.
        for cut in 1..whole.len() {
            let prefix = whole.slice(..cut);
            if let Ok(input) = CheckInput::parse(prefix) {
                // A prefix can only parse if it ends exactly between top-level fields, which
                // this message (one top-level field) has none of.
                panic!("prefix of {cut} bytes parsed: {input:?}");
            }
        }
        assert!(
            CheckInput::parse(Bytes::from_static(&[0x0b])).is_err(),
            "a group"
        );
        assert!(
            CheckInput::parse(Bytes::from_static(&[0x00, 0x00])).is_err(),
            "field 0"
        );
        assert!(
            CheckInput::parse(Bytes::from_static(&[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01
            ]))
            .is_err(),
            "an 11-byte varint"
        );
    }

    #[test]
    fn headers_are_kept_as_bytes_and_the_route_scopes_must_be_utf8() {
        let nest = |field: u8, inner: &[u8]| [&[field, inner.len() as u8][..], inner].concat();
        // CheckRequest{attributes{request{http{headers{key: 0xff, value: 0xfe}}}}}
        let entry = [nest(0x0a, &[0xff]), nest(0x12, &[0xfe])].concat();
        let message = nest(0x0a, &nest(0x22, &nest(0x12, &nest(0x1a, &entry))));
        let input = CheckInput::parse(Bytes::from(message)).expect("parses");
        assert_eq!(
            input.raw_headers().collect::<Vec<_>>(),
            [(&[0xff][..], &[0xfe][..])]
        );
        // CheckRequest{attributes{context_extensions{key: "kemon_scopes", value: 0xff}}}
        let entry = [nest(0x0a, SCOPES_EXTENSION.as_bytes()), nest(0x12, &[0xff])].concat();
        let message = nest(0x0a, &nest(0x52, &entry));
        assert_eq!(
            CheckInput::parse(Bytes::from(message)).unwrap_err(),
            WireError("context_extensions.kemon_scopes is not UTF-8")
        );
    }
}
