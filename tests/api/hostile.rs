//! Hostile HTTP/2 clients against the real binary: streams that announce a message and stall,
//! many streams on one connection, silent and idle connections. The server's memory must
//! stay within the bound the README states, and a normal client must still be answered.

use std::time::{Duration, Instant};

use bytes::Bytes;
use kemon_keys::vault::MasterKey;
use tokio::io::AsyncReadExt;

use crate::helpers::*;

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib * 1024
}

/// A gRPC request's headers for VerifyKey, as a raw HTTP/2 client sends them.
fn verify_headers(server: &ServerProcess) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/kemon.keys.v1.KeyService/VerifyKey",
            server.addr
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap()
}

/// The 5-byte gRPC message prefix announcing `len` bytes, and a few of them.
fn announce(len: u32) -> Bytes {
    let mut frame = vec![0u8];
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(b"\x0a\x03sk_");
    Bytes::from(frame)
}

/// One raw HTTP/2 connection holding `streams` stalled requests, each announcing `len` bytes
/// and sending 5. Returns what must be kept alive for the streams to stay open.
async fn stalled_streams(
    server: &ServerProcess,
    streams: usize,
    len: u32,
) -> (
    h2::client::SendRequest<Bytes>,
    Vec<(h2::client::ResponseFuture, h2::SendStream<Bytes>)>,
) {
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, mut connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    // Drive the connection until the server's SETTINGS are in: its stream limit.
    let _ = tokio::time::timeout(Duration::from_millis(100), &mut connection).await;
    assert_eq!(
        connection.max_concurrent_send_streams(),
        100,
        "SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut client = client.ready().await.expect("ready");
    let mut open = Vec::with_capacity(streams);
    for _ in 0..streams {
        client = client.ready().await.expect("a stream slot");
        let (response, mut body) = client
            .send_request(verify_headers(server), false)
            .expect("send request");
        body.send_data(announce(len), false).expect("send data");
        open.push((response, body));
    }
    (client, open)
}

#[tokio::test]
async fn hostile_clients_cannot_drive_memory_or_hold_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let master_key = MasterKey::generate().to_hex();
    let server = ServerProcess::start(
        tmp.path(),
        &master_key,
        &[
            "--handshake-timeout-secs",
            "1",
            "--idle-timeout-secs",
            "2",
            "--request-timeout-secs",
            "3",
        ],
    )
    .await;
    let mut client = server.client().await;
    let (_, secret) = client
        .create(private_key("normal client", &["tickets:read"]))
        .await;
    let baseline = rss_bytes(server.pid());

    // A message announced over the request limit is refused at once, before any buffer is
    // sized from the announcement.
    let (_keep, mut open) = stalled_streams(&server, 1, 4 * 1024 * 1024).await;
    let (response, _body) = open.pop().unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), response)
        .await
        .expect("answered at once")
        .expect("a response");
    let status = response
        .headers()
        .get("grpc-status")
        .map(|v| v.to_str().unwrap().to_owned());
    assert!(
        matches!(status.as_deref(), Some("11" | "8")),
        "OUT_OF_RANGE or RESOURCE_EXHAUSTED expected: {status:?}"
    );

    // Eight connections, each at its stream limit with requests announcing the largest
    // message allowed and stalling.
    const CONNECTIONS: usize = 8;
    const STREAMS: usize = 100;
    let mut hostile = Vec::new();
    for _ in 0..CONNECTIONS {
        hostile.push(stalled_streams(&server, STREAMS, 16 * 1024).await);
    }
    // Meanwhile a normal client is answered.
    let started = Instant::now();
    for _ in 0..20 {
        let response = client.verify(&secret, &["tickets:read"], "").await;
        assert_eq!(code(&response), kemon_keys::proto::v1::VerifyCode::Valid);
    }
    let verify_ms = started.elapsed().as_secs_f64() * 1000.0 / 20.0;

    let under_attack = rss_bytes(server.pid());
    let per_connection = under_attack.saturating_sub(baseline) / CONNECTIONS as u64;
    println!(
        "RSS: baseline {} KiB, with {CONNECTIONS}x{STREAMS} stalled streams {} KiB \
         ({} KiB per connection); VerifyKey meanwhile {verify_ms:.2} ms per call",
        baseline / 1024,
        under_attack / 1024,
        per_connection / 1024
    );
    // The README states 4 MiB per connection as the worst case.
    assert!(
        per_connection <= 4 * 1024 * 1024,
        "{per_connection} bytes per connection"
    );

    // Stalled requests are cancelled by the request timeout; their streams end.
    let (_, streams) = hostile.pop().unwrap();
    for (response, _body) in streams {
        let response = tokio::time::timeout(Duration::from_secs(10), response)
            .await
            .expect("a stalled request is ended by the request timeout");
        let status = response.ok().and_then(|r| {
            r.headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_owned())
        });
        assert_ne!(status.as_deref(), Some("0"), "a stalled request succeeded");
    }
    drop(hostile);

    // A connection that never speaks is closed after the handshake timeout.
    let mut silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a silent connection was kept open");

    // An HTTP/2 connection with no call in flight is closed after the idle timeout; one
    // with a call in flight is not.
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (idle_client, connection) = h2::client::handshake(tcp).await.unwrap();
    let idle_connection = tokio::spawn(connection);
    let ended = tokio::time::timeout(Duration::from_secs(10), idle_connection).await;
    assert!(ended.is_ok(), "an idle connection was kept open");
    drop(idle_client);

    // The normal client's connection was idle too; it reconnects and is answered.
    let mut client = server.client().await;
    let response = client.verify(&secret, &["tickets:read"], "").await;
    assert_eq!(code(&response), kemon_keys::proto::v1::VerifyCode::Valid);
    println!(
        "RSS after the hostile connections closed: {} KiB",
        rss_bytes(server.pid()) / 1024
    );
    drop(client);
    server.stop().await;
}
