//! Settings held in files that are re-read when they change: the TLS certificate, key and
//! client CA, the access policy and the assertion JWKS. Rotating any of them needs no restart.
//!
//! Each is a [`Watched`] value: loaded once at start (a bad file refuses the start), then
//! checked every reload interval. The files are read and hashed; when their contents changed
//! they are parsed again, and the new value replaces the old one only if it is whole and valid.
//! A half-written file, or a certificate rotated before its key, is logged and the previous
//! value kept until the next check finds the pair consistent. Polling rather than inotify:
//! Kubernetes updates mounted Secrets by swapping a symlink, which file watches miss, and
//! reading a few kilobytes every few seconds costs nothing.
//!
//! Only digests of the contents are kept, never the bytes (a private key among them), and
//! errors name the file and the problem, never its contents.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context;
use sha3::{Digest, Sha3_256};

/// Parses the contents of the watched files (in the order given) into the value.
type Loader<T> = Box<dyn Fn(&[Vec<u8>]) -> anyhow::Result<T> + Send + Sync>;

/// A value loaded from files, replaced when they change.
pub struct Watched<T> {
    /// What the files hold, for log lines: "TLS certificate", "access policy".
    what: &'static str,
    files: Vec<PathBuf>,
    load: Loader<T>,
    current: RwLock<Arc<T>>,
    /// The digest of the contents `current` was loaded from, or that last failed to load
    /// (so a bad file is reported once, not at every check).
    seen: Mutex<[u8; 32]>,
}

impl<T> std::fmt::Debug for Watched<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Watched")
            .field("what", &self.what)
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

/// The digest of the files' contents, each length-prefixed so that bytes cannot move between
/// files unnoticed.
fn digest(contents: &[Vec<u8>]) -> [u8; 32] {
    let mut h = Sha3_256::new();
    for c in contents {
        h.update((c.len() as u64).to_be_bytes());
        h.update(c);
    }
    h.finalize().into()
}

impl<T: Send + Sync + 'static> Watched<T> {
    /// Reads and parses the files now; an unreadable or invalid file is an error.
    pub fn open(
        what: &'static str,
        files: Vec<PathBuf>,
        load: impl Fn(&[Vec<u8>]) -> anyhow::Result<T> + Send + Sync + 'static,
    ) -> anyhow::Result<Arc<Watched<T>>> {
        let contents = files
            .iter()
            .map(|path| std::fs::read(path).with_context(|| format!("reading {}", path.display())))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let value = load(&contents).with_context(|| format!("loading the {what}"))?;
        Ok(Arc::new(Watched {
            what,
            files,
            load: Box::new(load),
            current: RwLock::new(Arc::new(value)),
            seen: Mutex::new(digest(&contents)),
        }))
    }

    /// The value in force.
    pub fn current(&self) -> Arc<T> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the files again and, if they changed and parse, replaces the value. Returns
    /// whether it was replaced.
    pub async fn check(&self) -> bool {
        let mut contents = Vec::with_capacity(self.files.len());
        for path in &self.files {
            match tokio::fs::read(path).await {
                Ok(bytes) => contents.push(bytes),
                Err(e) => {
                    // Between the removal and the creation of a rotated file: next time.
                    tracing::debug!(what = self.what, path = %path.display(), error = %e,
                        "cannot read a watched file; keeping the current one");
                    return false;
                }
            }
        }
        let digest = digest(&contents);
        {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if *seen == digest {
                return false;
            }
            *seen = digest;
        }
        match (self.load)(&contents) {
            Ok(value) => {
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
                tracing::info!(what = self.what, files = ?self.files, "reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(what = self.what, files = ?self.files, error = format!("{e:#}"),
                    "the changed files do not load; keeping the previous ones");
                false
            }
        }
    }

    /// Checks the files every `every` until `stop` turns true.
    pub fn watch(self: &Arc<Self>, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let watched = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticker.tick().await;
            let stopped = async move {
                let _ = stop.wait_for(|stopping| *stopping).await;
            };
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = ticker.tick() => { watched.check().await; }
                    () = &mut stopped => return,
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(contents: &[Vec<u8>]) -> anyhow::Result<u32> {
        Ok(std::str::from_utf8(&contents[0])?.trim().parse()?)
    }

    #[tokio::test]
    async fn a_changed_file_replaces_the_value_only_when_it_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let watched = Watched::open("number", vec![path.clone()], number).unwrap();
        assert_eq!(*watched.current(), 1);
        assert!(!watched.check().await, "unchanged");

        std::fs::write(&path, "not a number").unwrap();
        assert!(!watched.check().await);
        assert_eq!(*watched.current(), 1, "a bad file keeps the previous value");

        std::fs::write(&path, "2").unwrap();
        assert!(watched.check().await);
        assert_eq!(*watched.current(), 2);

        std::fs::remove_file(&path).unwrap();
        assert!(!watched.check().await);
        assert_eq!(
            *watched.current(),
            2,
            "a missing file keeps the previous value"
        );
    }

    #[test]
    fn a_bad_file_refuses_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        assert!(Watched::open("number", vec![path.clone()], number).is_err());
        std::fs::write(&path, "x").unwrap();
        assert!(Watched::open("number", vec![path], number).is_err());
    }
}
