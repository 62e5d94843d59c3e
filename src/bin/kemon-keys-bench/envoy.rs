//! The latency and throughput Envoy's ext_authz adds to a request: plain HTTP/1.1 requests
//! from `wrk` through Envoy running the shipped sidecar config (deploy/envoy/envoy.yaml,
//! asking kemon-keys before each request), against the same config with the ext_authz filter
//! taken out, and straight to the upstream.
//!
//! The upstream is a second Envoy answering every request with a fixed 200 itself
//! (`direct_response`), so that it costs little and the same in every setup. Every process
//! (wrk, the Envoys, kemon-keys) shares the machine: the figures are for one host, as a
//! sidecar runs, and are compared within one run, in alternating rounds.

use std::fmt::Write as _;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::report::Report;
use crate::server::ServerProcess;

/// What the run needs from the command line.
pub struct EnvoySettings<'a> {
    pub server_bin: &'a Path,
    pub envoy_bin: &'a Path,
    pub wrk_bin: &'a Path,
    /// The sidecar config to measure (deploy/envoy/envoy.yaml).
    pub config: &'a Path,
    /// Connections `wrk` keeps busy, one request in flight on each.
    pub concurrency: &'a [usize],
    pub seconds: f64,
    pub rounds: usize,
    /// Envoy worker threads (`--concurrency`), for the front Envoys and the upstream.
    pub envoy_workers: usize,
}

/// The request measured: a route of the shipped config that requires `tickets:read`.
const PATH: &str = "/v1/tickets";

/// One wrk run's figures, printed by [`WRK_REPORT`] as one JSON line.
#[derive(Debug, Clone, Copy)]
struct WrkRun {
    requests: u64,
    duration_us: u64,
    /// Non-2xx/3xx answers, connect/read/write errors and timeouts.
    errors: u64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
}

/// wrk's `done` hook: the figures as one JSON line on stdout (latencies in microseconds).
const WRK_REPORT: &str = r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"p50_us":%d,"p99_us":%d,"p999_us":%d}\n',
    summary.requests, summary.duration,
    e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// The setups compared, in the order each round runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    Direct,
    EnvoyOnly,
    EnvoyExtAuthz,
}

impl Setup {
    const ALL: [Setup; 3] = [Setup::Direct, Setup::EnvoyOnly, Setup::EnvoyExtAuthz];

    fn label(self) -> &'static str {
        match self {
            Setup::Direct => "straight to the upstream",
            Setup::EnvoyOnly => "Envoy, ext_authz filter removed",
            Setup::EnvoyExtAuthz => "Envoy + ext_authz Check (shipped config)",
        }
    }
}

/// Runs the comparison and writes its tables into `report`.
pub async fn run(s: &EnvoySettings<'_>, report: &mut Report) -> anyhow::Result<()> {
    let shipped = std::fs::read_to_string(s.config)
        .with_context(|| format!("reading {}", s.config.display()))?;
    let dir = tempfile::tempdir()?;
    let server = ServerProcess::start(s.server_bin, dir.path(), &[]).await?;
    let channels = crate::load::connect(&server.endpoint, 1).await?;
    let (secret, _) = crate::grpc::seed_keys(&channels, 1)
        .await?
        .into_iter()
        .next()
        .context("no key created")?;
    let kemon_port: u16 = server
        .endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .context("the server's port")?;

    let upstream_port = free_port()?;
    let upstream = EnvoyProcess::start(
        s,
        dir.path(),
        "upstream",
        &upstream_config(upstream_port),
        upstream_port,
    )?;
    let front_port = free_port()?;
    let with_authz = sidecar_config(&shipped, front_port, kemon_port, upstream_port)?;
    let front = EnvoyProcess::start(s, dir.path(), "sidecar", &with_authz, front_port)?;
    let plain_port = free_port()?;
    let plain = without_ext_authz(&sidecar_config(
        &shipped,
        plain_port,
        kemon_port,
        upstream_port,
    )?)?;
    let plain = EnvoyProcess::start(s, dir.path(), "sidecar-without-authz", &plain, plain_port)?;

    // Each setup does what it claims before it is measured: the upstream answers, the plain
    // Envoy passes a request without a key, and the sidecar refuses one and passes the key.
    let key_header = ("x-api-key", secret.as_str());
    wait_for_status(upstream.port, &[], 200).await?;
    wait_for_status(plain.port, &[], 200).await?;
    wait_for_status(front.port, &[], 401).await?;
    wait_for_status(front.port, &[key_header], 200).await?;

    let script = dir.path().join("report.lua");
    std::fs::write(&script, WRK_REPORT)?;
    let header = format!("x-api-key: {secret}");

    report.section(&format!(
        "7. The Envoy path: HTTP/1.1 GET {PATH} with a valid key, {} rounds of {} s per setup",
        s.rounds, s.seconds
    ));
    report.line(format!("Load average before: {}.", load_average()));
    report.line("");
    report
        .line("| Connections | Setup | Throughput | p50 | p99 | p99.9 | p50, p99 of each round |");
    report.line("|---|---|---|---|---|---|---|");
    let mut added = String::new();
    for &c in s.concurrency {
        let mut runs: Vec<Vec<WrkRun>> = vec![Vec::new(); Setup::ALL.len()];
        // Warm every path (connections to the upstream and kemon-keys, Envoy's pools).
        for setup in Setup::ALL {
            let port = port_of(setup, &upstream, &plain, &front);
            wrk(s.wrk_bin, &script, &header, port, c, 1.0)?;
        }
        for _ in 0..s.rounds {
            for (i, setup) in Setup::ALL.into_iter().enumerate() {
                let port = port_of(setup, &upstream, &plain, &front);
                let run = wrk(s.wrk_bin, &script, &header, port, c, s.seconds)?;
                ensure!(
                    run.errors == 0,
                    "{}: {} of {} requests failed (a non-2xx answer, or a socket error)",
                    setup.label(),
                    run.errors,
                    run.requests
                );
                runs[i].push(run);
            }
        }
        let summaries: Vec<Summary> = runs.iter().map(|r| Summary::of(r)).collect();
        for (setup, (summary, rounds)) in Setup::ALL.iter().zip(summaries.iter().zip(&runs)) {
            let each: Vec<String> = rounds
                .iter()
                .map(|r| format!("{}, {}", r.p50_us, r.p99_us))
                .collect();
            report.line(format!(
                "| {c} | {} | {:.0}/s | {} µs | {} µs | {} µs | {} |",
                setup.label(),
                summary.throughput,
                summary.p50_us,
                summary.p99_us,
                summary.p999_us,
                each.join("; ")
            ));
        }
        let (plain, authz) = (&summaries[1], &summaries[2]);
        let _ = writeln!(
            added,
            "| {c} | {:+} µs | {:+} µs | {:.2} |",
            authz.p50_us as i64 - plain.p50_us as i64,
            authz.p99_us as i64 - plain.p99_us as i64,
            authz.throughput / plain.throughput
        );
    }
    report.line("");
    report.line(format!("Load average after: {}.", load_average()));
    report.line("");
    report.line("What ext_authz adds, against the same Envoy without the filter:");
    report.line("");
    report.line("| Connections | Added p50 | Added p99 | Throughput, with / without |");
    report.line("|---|---|---|---|");
    report.line(added.trim_end());
    Ok(())
}

/// One setup's rounds together: throughput over all of them, and the median round's
/// percentiles (wrk reports percentiles per run, which cannot be merged exactly).
struct Summary {
    throughput: f64,
    p50_us: u64,
    p99_us: u64,
    p999_us: u64,
}

impl Summary {
    fn of(runs: &[WrkRun]) -> Summary {
        let requests: u64 = runs.iter().map(|r| r.requests).sum();
        let micros: u64 = runs.iter().map(|r| r.duration_us).sum();
        let median = |f: fn(&WrkRun) -> u64| {
            let mut v: Vec<u64> = runs.iter().map(f).collect();
            v.sort_unstable();
            v[v.len() / 2]
        };
        Summary {
            throughput: requests as f64 / (micros.max(1) as f64 / 1e6),
            p50_us: median(|r| r.p50_us),
            p99_us: median(|r| r.p99_us),
            p999_us: median(|r| r.p999_us),
        }
    }
}

fn port_of(
    setup: Setup,
    upstream: &EnvoyProcess,
    plain: &EnvoyProcess,
    front: &EnvoyProcess,
) -> u16 {
    match setup {
        Setup::Direct => upstream.port,
        Setup::EnvoyOnly => plain.port,
        Setup::EnvoyExtAuthz => front.port,
    }
}

/// One wrk run: one thread, `connections` connections, each with one request in flight.
fn wrk(
    bin: &Path,
    script: &Path,
    header: &str,
    port: u16,
    connections: usize,
    seconds: f64,
) -> anyhow::Result<WrkRun> {
    let output = Command::new(bin)
        .args(["--threads", "1"])
        .arg("--connections")
        .arg(connections.to_string())
        .arg("--duration")
        .arg(format!("{}s", seconds.ceil().max(1.0) as u64))
        .arg("--timeout")
        .arg("10s")
        .arg("--script")
        .arg(script)
        .arg("--header")
        .arg(header)
        .arg(format!("http://127.0.0.1:{port}{PATH}"))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    ensure!(
        output.status.success(),
        "wrk failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no report line from wrk in: {stdout}"))?;
    let json: serde_json::Value = serde_json::from_str(line)?;
    let field = |name: &str| {
        json[name]
            .as_u64()
            .with_context(|| format!("wrk's {name} in {line}"))
    };
    Ok(WrkRun {
        requests: field("requests")?,
        duration_us: field("duration_us")?,
        errors: field("errors")?,
        p50_us: field("p50_us")?,
        p99_us: field("p99_us")?,
        p999_us: field("p999_us")?,
    })
}

/// An Envoy child process; killed on drop.
struct EnvoyProcess {
    child: Child,
    port: u16,
}

impl EnvoyProcess {
    fn start(
        s: &EnvoySettings<'_>,
        dir: &Path,
        name: &str,
        config: &str,
        port: u16,
    ) -> anyhow::Result<EnvoyProcess> {
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, config)?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(s.envoy_bin)
            .arg("-c")
            .arg(&path)
            // Several Envoys at once: each its own shared memory.
            .arg("--use-dynamic-base-id")
            .args(["--log-level", "warn"])
            .arg("--concurrency")
            .arg(s.envoy_workers.to_string())
            .stdin(Stdio::null())
            // The access log (one line per request, as shipped) is written, and dropped.
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", s.envoy_bin.display()))?;
        Ok(EnvoyProcess { child, port })
    }
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `text` with `from`, which must occur exactly once, replaced by `to`.
fn replace_once(text: &str, from: &str, to: &str) -> anyhow::Result<String> {
    let n = text.matches(from).count();
    ensure!(
        n == 1,
        "the sidecar config has `{from}` {n} times, not once"
    );
    Ok(text.replacen(from, to, 1))
}

/// The shipped sidecar config on loopback ports: the listener on `listen`, admin on a port of
/// the system's choosing, kemon-keys and the upstream where they run here. Nothing else is
/// changed (the Check timeout stays 250 ms, the access log stays on).
fn sidecar_config(
    shipped: &str,
    listen: u16,
    kemon_keys: u16,
    upstream: u16,
) -> anyhow::Result<String> {
    let config = replace_once(shipped, "address: 0.0.0.0", "address: 127.0.0.1")?;
    let config = replace_once(
        &config,
        "port_value: 10000",
        &format!("port_value: {listen}"),
    )?;
    let config = replace_once(&config, "port_value: 9901", "port_value: 0")?;
    let config = replace_once(
        &config,
        "port_value: 50051",
        &format!("port_value: {kemon_keys}"),
    )?;
    replace_once(
        &config,
        "port_value: 8080",
        &format!("port_value: {upstream}"),
    )
}

/// The same config without the ext_authz filter: the entry of `http_filters` that names it,
/// up to the next entry (the router), is taken out. Routes keep their per-filter settings,
/// which Envoy accepts for a filter not in the chain.
fn without_ext_authz(config: &str) -> anyhow::Result<String> {
    let entry = |name: &str| -> anyhow::Result<usize> {
        let marker = format!("- name: {name}\n");
        ensure!(
            config.matches(&marker).count() == 1,
            "the sidecar config should name {name} once in http_filters"
        );
        let at = config.find(&marker).expect("counted");
        // From the start of its line.
        Ok(config[..at].rfind('\n').map_or(0, |n| n + 1))
    };
    let (authz, router) = (
        entry("envoy.filters.http.ext_authz")?,
        entry("envoy.filters.http.router")?,
    );
    ensure!(authz < router, "ext_authz should come before the router");
    Ok(format!("{}{}", &config[..authz], &config[router..]))
}

/// The upstream: an Envoy answering every request with 200 and a short body, itself.
fn upstream_config(port: u16) -> String {
    format!(
        r#"static_resources:
  listeners:
    - name: upstream
      address:
        socket_address: {{address: 127.0.0.1, port_value: {port}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: upstream
                route_config:
                  virtual_hosts:
                    - name: upstream
                      domains: ["*"]
                      routes:
                        - match: {{prefix: /}}
                          direct_response: {{status: 200, body: {{inline_string: "ok\n"}}}}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"#
    )
}

/// Sends `GET PATH` with `headers` on 127.0.0.1:`port` until the answer's status is `want`
/// (Envoy takes a moment to listen, and to connect to its clusters).
async fn wait_for_status(port: u16, headers: &[(&str, &str)], want: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = String::from("no answer");
    while Instant::now() < deadline {
        match status_of(port, headers).await {
            Ok(status) if status == want => return Ok(()),
            Ok(status) => last = format!("status {status}"),
            Err(e) => last = format!("{e:#}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("127.0.0.1:{port}{PATH} never answered {want}: {last}")
}

/// The status of one HTTP/1.1 `GET PATH` on a new connection.
async fn status_of(port: u16, headers: &[(&str, &str)]) -> anyhow::Result<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut request = format!("GET {PATH} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n");
    for (name, value) in headers {
        let _ = write!(request, "{name}: {value}\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await?;
    let answer = String::from_utf8_lossy(&answer);
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {answer:?}"))
}

/// `/proc/loadavg`'s 1, 5 and 15 minute figures.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg").map_or_else(
        |_| "unknown".into(),
        |s| s.split_whitespace().take(3).collect::<Vec<_>>().join(", "),
    )
}
