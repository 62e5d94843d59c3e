//! `kemon-keys audit …`: verify, export and point-in-time views, from a database file, a
//! running server or an export file.

use std::io::{BufRead, BufReader, Write};

use anyhow::{Context, bail};
use serde_json::json;
use tonic::Streaming;

use super::export;
use super::replay::Replay;
use super::verify::{Scope, Verifier};
use crate::config::{AuditActor, ExportArgs, KeysAsOfArgs, LogSource, VerifyArgs};
use crate::log::chain::{self, LogRecord};

use crate::proto::v1 as pb;
use crate::proto::v1::audit_service_client::AuditServiceClient;
use crate::store::{Backend, RecordFilter, Snapshot, SqliteBackend};

/// Records per page read from a database.
const PAGE: u32 = 1000;

async fn audit_client(
    url: &str,
    actor: &AuditActor,
) -> anyhow::Result<AuditServiceClient<tonic::transport::Channel>> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let mut endpoint = Endpoint::from_shared(url.to_owned()).context("--server")?;
    if let Some(ca) = &actor.tls_ca {
        let read = |path: &std::path::PathBuf| {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        };
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(read(ca)?));
        if let (Some(cert), Some(key)) = (&actor.tls_cert, &actor.tls_key) {
            tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
        }
        endpoint = endpoint.tls_config(tls).context("TLS settings")?;
    }
    let channel = endpoint
        .connect()
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(AuditServiceClient::new(channel))
}

impl AuditActor {
    /// `message` as a call of this actor and role.
    fn request<T>(&self, message: T) -> anyhow::Result<tonic::Request<T>> {
        let mut request = tonic::Request::new(message);
        request
            .metadata_mut()
            .insert("x-kemon-actor", self.actor.parse().context("--actor")?);
        request
            .metadata_mut()
            .insert("x-kemon-role", self.role.parse().context("--role")?);
        if let Some(assertion) = &self.assertion {
            request.metadata_mut().insert(
                crate::grpc::assertion::ASSERTION_HEADER,
                assertion.parse().context("--assertion")?,
            );
        }
        Ok(request)
    }
}

/// Reads records in log order from one of the sources.
enum Reader {
    Db {
        snapshot: Box<dyn Snapshot>,
        position: u64,
        filter: RecordFilter,
    },
    Server(Streaming<pb::LogEvent>),
    File {
        lines: std::io::Lines<BufReader<std::fs::File>>,
        workspace: Option<String>,
        line: u64,
    },
}

impl Reader {
    /// Opens `source`. For an export file, the workspace its header names is returned too.
    async fn open(
        source: &LogSource,
        workspace: Option<&str>,
        actor: &AuditActor,
    ) -> anyhow::Result<(Reader, Option<String>)> {
        let filter = RecordFilter {
            workspace_id: workspace.map(str::to_owned),
            ..RecordFilter::default()
        };
        if let Some(snapshot) = open_snapshot(source).await? {
            return Ok((
                Reader::Db {
                    snapshot,
                    position: 0,
                    filter,
                },
                None,
            ));
        }
        if let Some(url) = &source.server {
            let request = actor.request(pb::ReadEventsRequest {
                after_sequence: 0,
                limit: 0,
                filter: Some(pb::EventFilter {
                    workspace_id: workspace.unwrap_or_default().to_owned(),
                    ..Default::default()
                }),
            })?;
            let stream = audit_client(url, actor)
                .await?
                .read_events(request)
                .await?
                .into_inner();
            return Ok((Reader::Server(stream), None));
        }
        let path = source
            .file
            .as_ref()
            .context("one of --db, --database-url, --server, --file")?;
        let file =
            std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut lines = BufReader::new(file).lines();
        let header = lines
            .next()
            .context("the export is empty: no header line")??;
        let exported = export::parse_header(&header).map_err(anyhow::Error::msg)?;
        if let (Some(e), Some(w)) = (&exported, workspace)
            && e != w
        {
            bail!("the export is of workspace {e}, not {w}");
        }
        let keep = workspace.map(str::to_owned).or(exported.clone());
        Ok((
            Reader::File {
                lines,
                workspace: keep,
                line: 1,
            },
            exported,
        ))
    }

    /// Hands every record, in log order, to `each` a batch at a time until it returns false.
    /// The whole log of a database is read by the backend's bulk scan, up to the end of the
    /// snapshot.
    async fn for_each_batch(
        &mut self,
        each: &mut (dyn FnMut(Vec<LogRecord>) -> bool + Send),
    ) -> anyhow::Result<()> {
        if let Reader::Db {
            snapshot, filter, ..
        } = self
            && filter.workspace_id.is_none()
        {
            let end = snapshot.log_end().await?;
            snapshot.scan_records(end, each).await?;
            return Ok(());
        }
        loop {
            let batch = self.next_batch().await?;
            if batch.is_empty() || !each(batch) {
                return Ok(());
            }
        }
    }

    /// The next records; empty at the end.
    async fn next_batch(&mut self) -> anyhow::Result<Vec<LogRecord>> {
        match self {
            Reader::Db {
                snapshot,
                position,
                filter,
            } => {
                let page = snapshot.read_records(*position, PAGE, filter).await?;
                if let Some(last) = page.last() {
                    *position = last.sequence;
                }
                Ok(page)
            }
            Reader::Server(stream) => match stream.message().await? {
                Some(event) => Ok(vec![
                    LogRecord::from_log_event(&event).map_err(anyhow::Error::msg)?,
                ]),
                None => Ok(vec![]),
            },
            Reader::File {
                lines,
                workspace,
                line,
            } => {
                let mut batch = Vec::new();
                for text in lines.by_ref() {
                    let text = text?;
                    *line += 1;
                    if text.trim().is_empty() {
                        continue;
                    }
                    let record = export::parse_record(&text)
                        .map_err(|e| anyhow::anyhow!("line {line}: {e}"))?;
                    if workspace.as_ref().is_none_or(|w| *w == record.workspace_id) {
                        batch.push(record);
                    }
                    if batch.len() == PAGE as usize {
                        break;
                    }
                }
                Ok(batch)
            }
        }
    }
}

/// `audit verify`. Ok(true) when the log verified.
pub async fn verify(args: &VerifyArgs) -> anyhow::Result<bool> {
    let expect_head = args
        .expect_head
        .as_deref()
        .map(chain::parse_head)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--expect-head: {e}"))?;
    let (mut reader, exported) =
        Reader::open(&args.source, args.workspace.as_deref(), &args.actor).await?;
    let scope = match args.workspace.clone().or(exported) {
        Some(w) => Scope::Workspace(w),
        None => Scope::Log,
    };
    let mut verifier = Verifier::new(scope.clone(), expect_head).with_limits(args.fold.limits());
    reader
        .for_each_batch(&mut |batch| verifier.push_batch(&batch))
        .await?;
    // A database's projection is compared with the replay row by row, from the same snapshot.
    let checkpoint = match (&mut reader, &scope) {
        (Reader::Db { snapshot, .. }, Scope::Log) => Some(
            snapshot
                .scan_projection(&mut |rows| {
                    verifier.check_rows(rows);
                    true
                })
                .await?,
        ),
        _ => None,
    };
    let report = verifier.finish(checkpoint).with_context(|| {
        let dir = args.fold.limits().dir_or(&std::env::temp_dir());
        format!("replaying through temporary files in {}", dir.display())
    })?;
    println!("{report}");
    Ok(report.ok())
}

/// `audit export`.
pub async fn export(args: &ExportArgs) -> anyhow::Result<()> {
    let (mut reader, exported) =
        Reader::open(&args.source, args.workspace.as_deref(), &args.actor).await?;
    let workspace = args.workspace.clone().or(exported);
    let mut out: Box<dyn Write + Send> = match &args.output {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout())),
    };
    writeln!(out, "{}", export::header_line(workspace.as_deref()))?;
    let mut events = 0u64;
    let mut written = Ok(());
    reader
        .for_each_batch(&mut |batch| {
            events += batch.len() as u64;
            written = export::write_lines(&batch, &mut out);
            written.is_ok()
        })
        .await?;
    written?;
    out.flush()?;
    eprintln!("exported {events} events");
    Ok(())
}

/// The sequence of the last record of the whole log at `source` (not only a workspace's),
/// as GetKeysAsOf compares `at_sequence` with. For an export file, the last record it holds.
async fn log_end(source: &LogSource, actor: &AuditActor) -> anyhow::Result<Option<u64>> {
    if let Some(mut snapshot) = open_snapshot(source).await? {
        return Ok(Some(snapshot.log_end().await?));
    }
    if let Some(url) = &source.server {
        let request = actor.request(pb::GetLogHeadRequest::default())?;
        let head = audit_client(url, actor)
            .await?
            .get_log_head(request)
            .await?
            .into_inner();
        return Ok(Some(head.sequence));
    }
    Ok(None)
}

/// `audit keys`: the workspace's keys right after `--at`, one JSON object a line. `--at`
/// means what GetKeysAsOf's `at_sequence` means: absent or 0 is the end of the log, and a
/// sequence past the end is refused.
pub async fn keys_as_of(args: &KeysAsOfArgs) -> anyhow::Result<()> {
    let end = log_end(&args.source, &args.actor).await?;
    let (mut reader, _) = Reader::open(&args.source, Some(&args.workspace), &args.actor).await?;
    let at = args.at.filter(|&at| at > 0).unwrap_or(u64::MAX);
    let mut last_read = 0;
    let mut replay = Replay::default();
    'read: loop {
        let batch = reader.next_batch().await?;
        if batch.is_empty() {
            break;
        }
        for record in &batch {
            if record.sequence > at {
                break 'read;
            }
            last_read = record.sequence;
            replay
                .apply(record)
                .map_err(|e| anyhow::anyhow!("sequence {}: {}", e.sequence, e.reason))?;
        }
    }
    let end = end.unwrap_or(last_read);
    if at != u64::MAX && at > end {
        bail!("--at {at}: the log ends at {end}");
    }
    let mut out = std::io::stdout().lock();
    for state in replay.keys.values() {
        let line = json!({
            "key_id": state.key_id.to_string(),
            "workspace_id": state.workspace_id.as_str(),
            "name": state.name.as_str(),
                        "type": state.key_type.as_str(),
            "environment": state.environment.as_str(),
            "masked": state.masked,
            "scopes": state.scopes.names(),
            "full_access": state.full_access,
            "allowed_domains": state.allowed_domains.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
            "created_at_ms": state.created_at_ms,
            "expires_at_ms": state.expires_at_ms,
            "revoked_at_ms": state.revoked_at_ms,
            "version": state.version,
            "created_by": state.created_by,
        });
        writeln!(out, "{line}")?;
    }
    eprintln!("as of sequence {}", replay.last_sequence);
    Ok(())
}

/// One consistent view of the database `source` names (SQLite file or PostgreSQL), if it
/// names one.
async fn open_snapshot(
    source: &LogSource,
) -> anyhow::Result<Option<Box<dyn crate::store::Snapshot>>> {
    if let Some(path) = &source.db {
        let backend = SqliteBackend::open_read_only(path)
            .await
            .with_context(|| format!("opening {}", path.display()))?;
        return Ok(Some(backend.snapshot().await?));
    }
    if let Some(url) = &source.database_url {
        let backend = crate::store::PgBackend::open_read_only(url)
            .await
            .context("opening the PostgreSQL database")?;
        return Ok(Some(backend.snapshot().await?));
    }
    Ok(None)
}
