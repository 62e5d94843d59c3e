//! The server's outer surface: health, reflection, and graceful shutdown.

use std::time::Duration;

use kemon_keys::app::MasterKeySource;
use kemon_keys::proto::v1 as pb;
use prost::Message;
use tonic::{Code, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::helpers::*;

const SERVICE: &str = "kemon.keys.v1.KeyService";

#[tokio::test]
async fn health_reports_serving() {
    let server = TestServer::start().await;
    let mut health = HealthClient::new(server.channel().await);
    for service in ["", SERVICE] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("health check of {service:?}: {s:?}"))
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "kemon.keys.v1.NoSuchService".into(),
        })
        .await
        .expect_err("an unknown service has no health");
    assert_eq!(unknown.code(), Code::NotFound);
}

/// What a reflection service answered: the services listed, and the files holding
/// [`SERVICE`].
struct Reflected {
    services: Vec<String>,
    files: Vec<prost_types::FileDescriptorProto>,
}

macro_rules! reflect {
    ($name:ident, $($version:ident)::+) => {
        async fn $name(server: &TestServer) -> Reflected {
            use $($version)::+::server_reflection_client::ServerReflectionClient;
            use $($version)::+::server_reflection_request::MessageRequest;
            use $($version)::+::server_reflection_response::MessageResponse;
            use $($version)::+::ServerReflectionRequest;

            let mut client = ServerReflectionClient::new(server.channel().await);
            let requests = [
                MessageRequest::ListServices(String::new()),
                MessageRequest::FileContainingSymbol(SERVICE.into()),
            ]
            .map(|message| ServerReflectionRequest {
                host: String::new(),
                message_request: Some(message),
            });
            let mut responses = client
                .server_reflection_info(tokio_stream::iter(requests))
                .await
                .expect("server_reflection_info")
                .into_inner();
            let listed = responses
                .message()
                .await
                .expect("list services")
                .expect("a response");
            let Some(MessageResponse::ListServicesResponse(list)) = listed.message_response
            else {
                panic!("unexpected answer to ListServices: {listed:?}");
            };
            let symbol = responses
                .message()
                .await
                .expect("file containing symbol")
                .expect("a response");
            let Some(MessageResponse::FileDescriptorResponse(files)) = symbol.message_response
            else {
                panic!("unexpected answer to FileContainingSymbol: {symbol:?}");
            };
            Reflected {
                services: list.service.into_iter().map(|s| s.name).collect(),
                files: files
                    .file_descriptor_proto
                    .iter()
                    .map(|bytes| {
                        prost_types::FileDescriptorProto::decode(bytes.as_slice())
                            .expect("a FileDescriptorProto")
                    })
                    .collect(),
            }
        }
    };
}

reflect!(reflect_v1, tonic_reflection::pb::v1);
reflect!(reflect_v1alpha, tonic_reflection::pb::v1alpha);

fn assert_reflects_the_key_service(reflected: &Reflected) {
    assert!(
        reflected.services.iter().any(|s| s == SERVICE),
        "{:?}",
        reflected.services
    );
    assert!(
        reflected
            .services
            .iter()
            .any(|s| s == "grpc.health.v1.Health"),
        "{:?}",
        reflected.services
    );
    let file = reflected
        .files
        .iter()
        .find(|f| {
            f.package() == "kemon.keys.v1" && f.service.iter().any(|s| s.name() == "KeyService")
        })
        .unwrap_or_else(|| {
            panic!(
                "no file declares {SERVICE}: {:?}",
                reflected.files.iter().map(|f| f.name()).collect::<Vec<_>>()
            )
        });
    let service = file
        .service
        .iter()
        .find(|s| s.name() == "KeyService")
        .unwrap();
    let methods: Vec<&str> = service.method.iter().map(|m| m.name()).collect();
    for method in [
        "CreateKey",
        "GetKey",
        "ListKeys",
        "RenameKey",
        "UpdateKeyScopes",
        "RevealKey",
        "RevokeKey",
        "VerifyKey",
        "ListScopes",
    ] {
        assert!(methods.contains(&method), "{method} missing: {methods:?}");
    }
    assert!(
        file.message_type
            .iter()
            .any(|m| m.name() == "CreateKeyRequest"),
        "the file carries the request messages"
    );
}

#[tokio::test]
async fn reflection_v1_lists_and_describes_the_service() {
    let server = TestServer::start().await;
    assert_reflects_the_key_service(&reflect_v1(&server).await);
}

#[tokio::test]
async fn reflection_v1alpha_lists_and_describes_the_service() {
    let server = TestServer::start().await;
    assert_reflects_the_key_service(&reflect_v1alpha(&server).await);
}

/// A call cut off by the shutdown: UNAVAILABLE, or a connection-level failure raised by the
/// client's transport (e.g. the server's GOAWAY), never an error answered by the service.
fn is_shutdown_error(status: &Status) -> bool {
    if status.code() == Code::Unavailable {
        return true;
    }
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::transport::Error>() {
            return true;
        }
        source = error.source();
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_loses_nothing_acknowledged() {
    let server = TestServer::start().await;
    let data_dir = server.data_dir.clone();
    let clock = server.clock.clone();
    let master_key = server.master_key_hex.clone();
    let pool = server.clients(5).await;

    let mut tasks = Vec::new();
    for i in 0..50 {
        let mut c = pool[i % pool.len()].clone();
        tasks.push(tokio::spawn(async move {
            c.try_create(private_key(&format!("in flight {i}"), &[]))
                .await
        }));
    }
    let (tmp, result) = tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("graceful stop did not finish within 10 s");
    result.expect("graceful stop returns Ok");

    let mut acknowledged = Vec::new();
    let mut refused = 0;
    for task in tasks {
        match task.await.expect("create task") {
            Ok(response) => acknowledged.push((response.key.unwrap(), response.secret)),
            Err(status) => {
                assert!(is_shutdown_error(&status), "unexpected failure: {status:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(acknowledged.len() + refused, 50);

    let server = TestServer::start_in(&data_dir, clock, MasterKeySource::Hex(master_key))
        .await
        .expect("restart");
    let mut client = server.client().await;
    for (key, secret) in &acknowledged {
        let stored = client
            .try_get_key(&key.key_id)
            .await
            .unwrap_or_else(|s| panic!("acknowledged key {} lost: {s:?}", key.key_id));
        assert_eq!(&stored, key);
        assert_eq!(
            code(&client.verify(secret, &[], "").await),
            pb::VerifyCode::Valid
        );
    }
    let (_, result) = tokio::time::timeout(Duration::from_secs(10), server.stop())
        .await
        .expect("graceful stop did not finish within 10 s");
    result.expect("graceful stop returns Ok");
    drop(tmp);
}
