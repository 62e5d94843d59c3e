//! The README's command blocks, run as a newcomer would: the walkthrough and the auditor's
//! steps, with the real grpcurl binary and the real `kemon-keys` binary, against a server on
//! a random port. Each command is taken from README.md itself, so the two cannot drift apart.
//!
//! What is put in: the server's address for `localhost:50051`, and the key id, secret and
//! workspace hash the earlier steps printed for `key_01J…`, `sk_test_…` (or `sk_…`) and
//! `<workspaceHash>`; after a roll, `key_01J…` is the old key and `key_01K…` its successor. What is checked: every `"field": value` a `# =>` line shows (values
//! with `…` are illustrative and skipped), and for a line that is not JSON (`OK: …`,
//! `ERROR: …`) its text up to the first `…`. grpcurl is found through `KEMON_GRPCURL` or
//! `PATH`; `scripts/test` installs it. A missing grpcurl fails the test: it never skips.

use std::path::{Path, PathBuf};

use crate::helpers::*;

const README: &str = include_str!("../../README.md");

/// One command of a README block, with what the README says it prints.
#[derive(Debug)]
struct Step {
    command: String,
    expected: String,
}

/// The ```sh blocks of the section whose heading starts with `heading`.
fn sh_blocks(heading: &str) -> Vec<String> {
    let start = README
        .find(&format!("\n## {heading}"))
        .unwrap_or_else(|| panic!("README has no section {heading:?}"));
    let section = &README[start + 1..];
    let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
    let mut blocks = Vec::new();
    let mut rest = section;
    while let Some(open) = rest.find("```sh\n") {
        let body = &rest[open + 6..];
        let close = body.find("\n```").expect("closed block");
        blocks.push(body[..close].to_owned());
        rest = &body[close + 4..];
    }
    assert!(!blocks.is_empty(), "no sh block under {heading:?}");
    blocks
}

/// Splits a block into shell assignments (kept for every later command) and steps. A command
/// goes on while a line ends with `\` or a single quote is open.
fn steps(block: &str) -> (Vec<String>, Vec<Step>) {
    let mut assignments = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    let mut lines = block.lines().peekable();
    while let Some(line) = lines.next() {
        let trimmed = line.trim();
        if let Some(expected) = trimmed.strip_prefix("# =>") {
            let step = steps.last_mut().expect("a `# =>` line follows a command");
            step.expected.push_str(expected);
            // Continuation lines of the expectation: indented comments right after it.
            while let Some(next) = lines.peek() {
                match next.strip_prefix("#  ") {
                    Some(more) if next.starts_with("#  ") => {
                        step.expected.push(' ');
                        step.expected.push_str(more);
                        lines.next();
                    }
                    _ => break,
                }
            }
            continue;
        }
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let mut command = line.to_owned();
        while command.ends_with('\\') || command.matches('\'').count() % 2 == 1 {
            let next = lines.next().expect("the command goes on");
            command.push('\n');
            command.push_str(next);
        }
        if command.starts_with(|c: char| c.is_ascii_uppercase()) && command.contains('=') {
            assignments.push(command);
        } else {
            steps.push(Step {
                command,
                expected: String::new(),
            });
        }
    }
    (assignments, steps)
}

/// The `"field": value` pairs an expectation shows, without the illustrative ones.
fn shown_fields(expected: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut rest = expected;
    while let Some(open) = rest.find('"') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('"') else { break };
        let name = &after[..close];
        let tail = after[close + 1..].trim_start();
        rest = &after[close + 1..];
        let Some(value) = tail.strip_prefix(':') else {
            continue;
        };
        let value = value.trim_start();
        let value = if let Some(quoted) = value.strip_prefix('"') {
            match quoted.find('"') {
                Some(end) => format!("\"{}\"", &quoted[..end]),
                None => continue,
            }
        } else {
            value
                .split([',', '}', ' '])
                .next()
                .unwrap_or_default()
                .to_owned()
        };
        if value.is_empty() || value == "{" || value.contains('…') {
            continue;
        }
        fields.push(format!("\"{name}\":{value}"));
    }
    fields
}

fn squeeze(text: &str) -> String {
    text.chars().filter(|c| !c.is_whitespace()).collect()
}

/// The grpcurl binary: `KEMON_GRPCURL`, else `grpcurl` on PATH.
fn grpcurl() -> PathBuf {
    if let Some(path) = std::env::var_os("KEMON_GRPCURL") {
        return PathBuf::from(path);
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("grpcurl"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "grpcurl not found (KEMON_GRPCURL or PATH): run the README's test command, \
             scripts/test, which installs grpcurl 1.8.6"
        )
    })
}

/// A directory holding `grpcurl` and `kemon-keys`, to put first on PATH.
fn tool_dir(scratch: &Path) -> PathBuf {
    let bin = scratch.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::os::unix::fs::symlink(grpcurl(), bin.join("grpcurl")).unwrap();
    std::os::unix::fs::symlink(SERVER_BIN, bin.join("kemon-keys")).unwrap();
    bin
}

/// Values earlier steps printed, put in where the README shows placeholders.
#[derive(Default)]
struct Printed {
    key_id: Option<String>,
    /// A roll's successor.
    successor_id: Option<String>,
    secret: Option<String>,
    workspace_hash: Option<String>,
}

impl Printed {
    fn fill(&self, text: &str, addr: &str) -> String {
        let mut text = text.replace("localhost:50051", addr);
        for (placeholder, value) in [
            ("key_01J…", &self.key_id),
            ("key_01K…", &self.successor_id),
            ("sk_test_…", &self.secret),
            ("sk_…", &self.secret),
            ("<workspaceHash>", &self.workspace_hash),
        ] {
            if text.contains(placeholder) {
                let value = value.as_ref().unwrap_or_else(|| {
                    panic!("no earlier step printed what {placeholder} stands for")
                });
                text = text.replace(placeholder, value);
            }
        }
        text
    }

    fn learn(&mut self, output: &str) {
        let Ok(json) = serde_json::from_str::<serde_json::Value>(output) else {
            return;
        };
        let text = |v: &serde_json::Value| v.as_str().map(str::to_owned);
        match (
            text(&json["key"]["keyId"]),
            text(&json["previous"]["keyId"]),
        ) {
            // A roll: the old key stays `key_01J…`.
            (Some(successor), Some(old)) => {
                self.key_id = Some(old);
                self.successor_id = Some(successor);
            }
            (Some(id), None) => self.key_id = Some(id),
            _ => {}
        }
        if let Some(secret) = text(&json["secret"]).filter(|s| !s.is_empty()) {
            self.secret = Some(secret);
        }
        if let Some(hash) = text(&json["workspaceHash"]) {
            self.workspace_hash = Some(hash);
        }
    }
}

#[tokio::test]
async fn the_readme_walkthrough_and_audit_steps_work_as_written() {
    let server = TestServer::start().await;
    let scratch = tempfile::tempdir().unwrap();
    let bin = tool_dir(scratch.path());
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let addr = server.addr.to_string();
    let mut printed = Printed::default();
    let mut ran = 0;
    for heading in ["Walkthrough with grpcurl", "Auditing", "Rotating keys"] {
        for block in sh_blocks(heading) {
            let (assignments, steps) = steps(&block);
            for step in steps {
                let command = printed.fill(&step.command, &addr);
                let script = format!("{}\n{command}", assignments.join("\n"));
                let output = Cli::program("bash")
                    .arg("-c")
                    .arg(&script)
                    .current_dir(scratch.path())
                    .env("PATH", &path)
                    .run()
                    .await;
                let (stdout, stderr) = (&output.stdout, &output.stderr);
                let all = format!("{stdout}{stderr}");
                // Expectations are not filled in: their placeholders stand for values that
                // differ every run, and are skipped as illustrative.
                let expected = step.expected.replace("localhost:50051", &addr);
                let refused = expected.trim_start().starts_with("ERROR:");
                assert_eq!(
                    output.status.success(),
                    !refused,
                    "{command}\nstdout: {stdout}\nstderr: {stderr}"
                );
                for field in shown_fields(&expected) {
                    assert!(
                        squeeze(&all).contains(&squeeze(&field)),
                        "{command}\nshows {field}, printed:\n{all}"
                    );
                }
                let text = expected.trim();
                if !text.is_empty() && !text.starts_with('{') {
                    let shown = squeeze(text.split('…').next().unwrap_or_default());
                    assert!(
                        squeeze(&all).contains(&shown),
                        "{command}\nshows {text}, printed:\n{all}"
                    );
                }
                printed.learn(stdout);
                ran += 1;
            }
        }
    }
    assert!(ran >= 12, "only {ran} README commands ran");
    assert!(
        scratch.path().join("ws_acme.ndjson").is_file(),
        "the export step wrote its file"
    );
}

#[test]
fn expectations_are_read_field_by_field() {
    assert_eq!(
        shown_fields(r#"{ "valid": true, "code": "VERIFY_CODE_VALID", "keyId": "key_01J…", … }"#),
        [r#""valid":true"#, r#""code":"VERIFY_CODE_VALID""#]
    );
    assert_eq!(
        shown_fields(r#"{ "key": { "keyId": "key_01J…", "version": "1", … }"#),
        [r#""version":"1""#]
    );
}
