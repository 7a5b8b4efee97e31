//! Reloading files that change under a running server (certificates, the
//! API keys file). The files are read again every [`POLL`] and compared by
//! content, not by modification time: Kubernetes swaps a mounted secret by
//! repointing a symlink (`..data`), which leaves the path's own metadata
//! alone, and a rewrite within the same second keeps the same mtime.
//! Reading a few kilobytes a second costs nothing.

use std::path::PathBuf;
use std::time::Duration;

use super::secret::sha256;

/// How often watched files are read.
pub const POLL: Duration = Duration::from_secs(1);

/// A set of files whose contents are compared with what was last seen.
pub struct FileWatch {
    paths: Vec<PathBuf>,
    seen: Option<[u8; 32]>,
}

impl FileWatch {
    /// Watches `paths`, taking their current contents as seen.
    pub fn new(paths: Vec<PathBuf>) -> Self {
        let mut watch = Self { paths, seen: None };
        watch.seen = watch.fingerprint();
        watch
    }

    /// The files' contents when any changed since the last call (including
    /// when a file appeared or vanished), else `None`. A file that cannot
    /// be read counts as changed, so its loader reports why.
    pub fn changed(&mut self) -> Option<Vec<std::io::Result<Vec<u8>>>> {
        let now = self.fingerprint();
        if now == self.seen && now.is_some() {
            return None;
        }
        let unchanged_failure = now.is_none() && self.seen.is_none();
        self.seen = now;
        if unchanged_failure {
            return None;
        }
        Some(self.paths.iter().map(std::fs::read).collect())
    }

    /// A digest of every file's contents, or `None` if one cannot be read.
    fn fingerprint(&self) -> Option<[u8; 32]> {
        let mut all = Vec::new();
        for path in &self.paths {
            let bytes = std::fs::read(path).ok()?;
            all.extend_from_slice(&sha256(&bytes));
        }
        Some(sha256(&all))
    }
}

/// Calls `reload` with the files' contents whenever they change, every
/// [`POLL`], until the task is aborted.
pub fn spawn(paths: Vec<PathBuf>, mut reload: impl FnMut(Vec<std::io::Result<Vec<u8>>>) + Send + 'static) {
    let mut watch = FileWatch::new(paths);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Some(contents) = watch.changed() {
                reload(contents);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sees_rewrites_symlink_swaps_and_vanishing_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, b, link) = (dir.path().join("a"), dir.path().join("b"), dir.path().join("link"));
        std::fs::write(&a, "one").expect("write");
        std::fs::write(&b, "two").expect("write");
        std::os::unix::fs::symlink(&a, &link).expect("symlink");
        let mut watch = FileWatch::new(vec![link.clone()]);
        assert!(watch.changed().is_none(), "nothing changed yet");
        // The swap Kubernetes does: a new link renamed over the old one.
        let fresh = dir.path().join("link.tmp");
        std::os::unix::fs::symlink(&b, &fresh).expect("symlink");
        std::fs::rename(&fresh, &link).expect("rename");
        let seen = watch.changed().expect("the swap is a change");
        assert_eq!(seen[0].as_ref().expect("readable"), b"two");
        assert!(watch.changed().is_none());
        std::fs::remove_file(&b).expect("remove");
        assert!(watch.changed().expect("vanished")[0].is_err());
        assert!(watch.changed().is_none(), "an unchanged failure is reported once");
        std::fs::write(&b, "two").expect("write");
        assert!(watch.changed().is_some(), "back again");
    }
}
