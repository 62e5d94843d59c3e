//! The call log of the real binary (JSON lines on stderr): one line per call, with its method,
//! gRPC code, latency, key id and, for VerifyKey, the verify code; streams logged when they end.

use std::collections::HashMap;
use std::sync::mpsc;

use kemon_keys::domain::KeyId;
use kemon_keys::proto::v1 as pb;
use kemon_keys::proto::v1::audit_service_client::AuditServiceClient;
use kemon_keys::vault::MasterKey;
use serde_json::Value;
use tonic::Code;

use crate::helpers::*;

/// The `call` lines of a server that has exited, by method, in the order written.
fn call_lines(log: mpsc::Receiver<String>) -> (HashMap<String, Vec<Value>>, String) {
    let mut calls: HashMap<String, Vec<Value>> = HashMap::new();
    let mut all = String::new();
    // The server has exited: its stderr is closed, so this ends.
    for line in log.iter() {
        all.push_str(&line);
        all.push('\n');
        let value: Value = serde_json::from_str(&line).expect("JSON log line");
        if value["message"] == "call" {
            let method = value["span"]["method"]
                .as_str()
                .unwrap_or_else(|| panic!("no method: {line}"))
                .to_owned();
            calls.entry(method).or_default().push(value);
        }
    }
    (calls, all)
}

/// The one line of `method`.
#[track_caller]
fn only<'a>(calls: &'a HashMap<String, Vec<Value>>, method: &str) -> &'a Value {
    match calls.get(method).map(Vec::as_slice) {
        Some([line]) => line,
        other => panic!("{method}: expected one line, got {other:?}"),
    }
}

#[track_caller]
fn assert_line(line: &Value, level: &str, code: &str) {
    assert_eq!(line["level"], level, "{line}");
    assert_eq!(line["code"], code, "{line}");
    assert_eq!(line["target"], "kemon_keys::grpc", "{line}");
    assert_eq!(line["span"]["name"], "rpc", "{line}");
    assert!(line["latency_us"].is_u64(), "{line}");
}

#[tokio::test]
async fn each_call_logs_one_line_with_its_method_code_and_key() {
    let tmp = tempfile::tempdir().unwrap();
    let master_key = MasterKey::generate().to_hex();
    let mut server =
        ServerProcess::start_logging(tmp.path(), &master_key, "info,kemon_keys=debug").await;
    let channel = server.channel().await;
    let mut client = server.client().await;
    let mut audit = AuditServiceClient::new(channel.clone());

    let (key, secret) = client
        .create(private_key("logged", &["tickets:read"]))
        .await;
    let verified = client.verify(&secret, &["tickets:write"], "").await;
    assert_eq!(code(&verified), pb::VerifyCode::InsufficientScope);
    let missing = KeyId::generate(T0_MS).to_string();
    let not_found = client
        .try_get_key(&missing)
        .await
        .expect_err("a missing key");
    assert_eq!(not_found.code(), Code::NotFound);

    // A stream read to its end: its code comes from the trailers.
    let mut events = audit
        .read_events(auditor(pb::ReadEventsRequest::default()))
        .await
        .expect("read_events")
        .into_inner();
    while events.message().await.expect("an event").is_some() {}

    // A stream the client leaves.
    let mut left = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest::default()))
        .await
        .expect("subscribe_events")
        .into_inner();
    left.message().await.expect("a message").expect("caught up");
    drop(left);

    // A stream the server ends on shutdown, with a status in its trailers.
    let mut open = audit
        .subscribe_events(auditor(pb::SubscribeEventsRequest::default()))
        .await
        .expect("subscribe_events")
        .into_inner();
    let ended = tokio::spawn(async move {
        loop {
            match open.message().await {
                Ok(Some(_)) => {}
                Ok(None) => panic!("the subscription ended without a status"),
                Err(status) => return status,
            }
        }
    });
    let log = std::mem::replace(&mut server.log, mpsc::channel().1);
    server.stop().await;
    assert_eq!(ended.await.unwrap().code(), Code::Unavailable);

    let (calls, all) = call_lines(log);
    assert!(!all.contains(&secret), "a secret in the log");

    let line = only(&calls, "CreateKey");
    assert_line(line, "INFO", "Ok");
    assert_eq!(line["span"]["key_id"], key.key_id.as_str(), "{line}");
    assert_eq!(line["reason"], "", "{line}");

    let line = only(&calls, "VerifyKey");
    assert_line(line, "DEBUG", "Ok");
    assert_eq!(line["span"]["key_id"], key.key_id.as_str(), "{line}");
    assert_eq!(
        line["span"]["verify_code"], "VERIFY_CODE_INSUFFICIENT_SCOPE",
        "{line}"
    );

    let line = only(&calls, "GetKey");
    assert_line(line, "INFO", "NotFound");
    assert_eq!(line["span"]["key_id"], missing.as_str(), "{line}");
    assert_eq!(line["reason"], not_found.message(), "{line}");

    assert_line(only(&calls, "ReadEvents"), "INFO", "Ok");

    let subscriptions = &calls["SubscribeEvents"];
    // The one the client left may be noticed only as the server shuts down: the lines'
    // order is not fixed, their codes are.
    let mut codes: Vec<&str> = subscriptions
        .iter()
        .map(|line| line["code"].as_str().expect("code"))
        .collect();
    codes.sort_unstable();
    assert_eq!(codes, ["Cancelled", "Unavailable"], "{subscriptions:?}");
    let shut_down = subscriptions
        .iter()
        .find(|line| line["code"] == "Unavailable")
        .expect("the subscription ended by shutdown");
    assert_line(shut_down, "INFO", "Unavailable");
    assert!(
        shut_down["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("the server is shutting down")),
        "{shut_down}"
    );

    // Health checks (the start-up wait polls them) are logged too, at DEBUG.
    let health = &calls["grpc.health.v1.Health/Check"];
    assert!(
        health.iter().all(|line| line["level"] == "DEBUG"),
        "{health:?}"
    );
}
