//! The multi-workspace scenario the audit and tamper tests share: keys of two workspaces
//! created, renamed, rescoped, revealed and revoked by several actors, one second apart.

use std::time::Duration;

use kemon_keys::proto::v1 as pb;

use crate::helpers::*;

/// The keys of the story as the API last returned them.
pub struct Story {
    /// ws_acme's first key: revoked at 6.
    pub a: pb::Key,
    /// ws_globex's public key: renamed at 7 (revoked at 12 in the long story; `b` is as of 7).
    pub b: pb::Key,
    pub b_secret: String,
    /// ws_acme's full-access key.
    pub c: pb::Key,
    /// a's scopes after the rescope at 3.
    pub rescoped: Vec<String>,
}

impl Story {
    /// Seven events over two workspaces, one second apart (event n recorded at T0 + (n-1) s):
    ///
    /// | seq | workspace  | key | event            | actor      |
    /// |-----|------------|-----|------------------|------------|
    /// | 1   | ws_acme    | a   | KeyCreated       | user_alice |
    /// | 2   | ws_acme    | a   | KeyRenamed       | user_bob   |
    /// | 3   | ws_acme    | a   | KeyScopesChanged | user_bob   |
    /// | 4   | ws_globex  | b   | KeyCreated       | user_alice |
    /// | 5   | ws_acme    | c   | KeyCreated       | user_alice |
    /// | 6   | ws_acme    | a   | KeyRevoked       | user_carol |
    /// | 7   | ws_globex  | b   | KeyRenamed       | user_bob   |
    pub async fn write(server: &TestServer) -> Story {
        let mut keys = server.client().await;
        let globex = keys.in_workspace(OTHER_WORKSPACE);
        let tick = || server.clock.advance(Duration::from_secs(1));
        let (a, _) = keys
            .create(private_key("CI deploy", &["tickets:read"]))
            .await;
        tick();
        keys.acting("user_bob", "owner")
            .rename(&a.key_id, "CI deploy (old)")
            .await;
        tick();
        let rescoped = keys
            .acting("user_bob", "admin")
            .rescope(&a.key_id, &["tickets:write", "labels:read"])
            .await
            .scopes;
        tick();
        let (b, b_secret) = keys
            .create(in_workspace(
                OTHER_WORKSPACE,
                public_key("Widget", &["tickets:read"], &["app.example.com"]),
            ))
            .await;
        tick();
        let (c, _) = keys.create(private_key("Backup", &[])).await;
        tick();
        let a = keys.acting("user_carol", "admin").revoke(&a.key_id).await;
        tick();
        let b = globex
            .acting("user_bob", "owner")
            .rename(&b.key_id, "Widget v2")
            .await;
        Story {
            a,
            b,
            b_secret,
            c,
            rescoped,
        }
    }

    /// [`Story::write`], then eight more events: fifteen in all, every kind of event in both
    /// workspaces.
    ///
    /// | seq | workspace  | key | event            | actor      |
    /// |-----|------------|-----|------------------|------------|
    /// | 8   | ws_acme    | d   | KeyCreated       | user_alice |
    /// | 9   | ws_acme    | d   | KeyRevealed      | user_dana  |
    /// | 10  | ws_globex  | e   | KeyCreated       | user_alice |
    /// | 11  | ws_acme    | d   | KeyRenamed       | user_bob   |
    /// | 12  | ws_globex  | b   | KeyRevoked       | user_carol |
    /// | 13  | ws_globex  | e   | KeyRenamed       | user_carol |
    /// | 14  | ws_acme    | c   | KeyRenamed       | user_bob   |
    /// | 15  | ws_acme    | d   | KeyRevoked       | user_dana  |
    pub async fn write_long(server: &TestServer) -> Story {
        let story = Story::write(server).await;
        let mut keys = server.client().await;
        let globex = keys.in_workspace(OTHER_WORKSPACE);
        let tick = || server.clock.advance(Duration::from_secs(1));
        tick();
        let (d, _) = keys.create(revealable(private_key("Vault", &[]))).await;
        tick();
        keys.acting("user_dana", "owner").reveal(&d.key_id).await;
        tick();
        let (e, _) = keys
            .create(in_workspace(OTHER_WORKSPACE, private_key("Ingest", &[])))
            .await;
        tick();
        keys.acting("user_bob", "admin")
            .rename(&d.key_id, "Vault (cold)")
            .await;
        tick();
        globex
            .acting("user_carol", "admin")
            .revoke(&story.b.key_id)
            .await;
        tick();
        globex
            .acting("user_carol", "admin")
            .rename(&e.key_id, "Ingest v2")
            .await;
        tick();
        keys.acting("user_bob", "admin")
            .rename(&story.c.key_id, "Backup v2")
            .await;
        tick();
        keys.acting("user_dana", "admin").revoke(&d.key_id).await;
        story
    }
}
