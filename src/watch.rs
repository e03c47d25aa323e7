//! Reload on file change: the config file and the envoyproxy/ratelimit
//! paths are watched, and a change to what they hold sends the same
//! [`Control::Reload`] that SIGHUP sends.
//!
//! Each file is watched through its directory, not by itself: editors save
//! by writing a new file and renaming it over the old, and a Kubernetes
//! ConfigMap volume updates by pointing its `..data` symlink at a new
//! directory. Neither changes the old inode, so a watch on the file would
//! go quiet after the first update. Events are debounced, and a reload is
//! asked for only when the bytes behind the watched paths changed, so
//! unrelated files in the same directory, or a `touch`, reload nothing.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::shutdown::Control;

/// Watches files while it lives; dropping it stops the watch.
#[derive(Debug)]
pub struct FileWatch {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FileWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Watches `paths` (the config file first, then files or directories of
/// envoyproxy/ratelimit YAML) and
/// sends [`Control::Reload`] to `control` once their contents have changed
/// and stayed unchanged for `debounce`. Holds `control` weakly, so the
/// watch never keeps a server from seeing its last sender go.
pub fn spawn(
    paths: Vec<PathBuf>,
    debounce: Duration,
    control: &mpsc::Sender<Control>,
) -> notify::Result<FileWatch> {
    // What the files hold now, taken before this returns (and so before
    // the server answers anyone): taken on the task instead, it could see
    // a change made after start-up as the starting point and miss it.
    let last = fingerprint(&paths);
    // One pending wake-up is enough: the task reads the files afresh.
    let (wake, woken) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            let _ = wake.try_send(());
        }
    })?;
    for dir in directories(&paths) {
        watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    }
    let task = tokio::spawn(debounced(paths, last, debounce, woken, control.downgrade()));
    Ok(FileWatch {
        _watcher: watcher,
        task,
    })
}

/// The directories to watch: each file's directory, and each directory
/// itself and its parent (the directory may be a symlink that is swapped).
fn directories(paths: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for p in paths {
        if p.is_dir() {
            dirs.push(p.clone());
        }
        if let Some(parent) = p.parent() {
            let parent = if parent.as_os_str().is_empty() {
                Path::new(".")
            } else {
                parent
            };
            dirs.push(parent.to_owned());
        }
    }
    dirs.sort();
    dirs.dedup();
    dirs.retain(|d| d.is_dir());
    dirs
}

async fn debounced(
    paths: Vec<PathBuf>,
    mut last: u64,
    debounce: Duration,
    mut woken: mpsc::Receiver<()>,
    control: mpsc::WeakSender<Control>,
) {
    while woken.recv().await.is_some() {
        // Wait for quiet: a save in several steps, or a ConfigMap swap,
        // is one change.
        while let Ok(Some(())) = tokio::time::timeout(debounce, woken.recv()).await {}
        // An empty config file is a valid config with no scopes, and also
        // what a reader sees halfway through a write that truncates first:
        // take it as a write in progress, whose end will wake us again.
        if paths.first().is_some_and(|p| is_empty_file(p)) {
            tracing::warn!("config file is empty: waiting for it to be written");
            continue;
        }
        let now = fingerprint(&paths);
        if now == last {
            continue;
        }
        last = now;
        let Some(control) = control.upgrade() else {
            return;
        };
        tracing::info!("config files changed: reloading");
        if control.send(Control::Reload).await.is_err() {
            return;
        }
    }
}

/// A hash of what `paths` hold now: each file's bytes, each directory's
/// YAML files' names and bytes. A read error counts as content, so a file
/// that disappears and comes back is a change.
fn fingerprint(paths: &[PathBuf]) -> u64 {
    let mut h = DefaultHasher::new();
    for p in paths {
        p.hash(&mut h);
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .map(|entries| entries.flatten().map(|e| e.path()).collect())
                .unwrap_or_default();
            files.retain(|f| {
                let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.starts_with('.') && (name.ends_with(".yaml") || name.ends_with(".yml"))
            });
            files.sort();
            for f in files {
                f.hash(&mut h);
                hash_file(&f, &mut h);
            }
        } else {
            hash_file(p, &mut h);
        }
    }
    h.finish()
}

fn is_empty_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.len() == 0)
}

fn hash_file(path: &Path, h: &mut DefaultHasher) {
    match std::fs::read(path) {
        Ok(bytes) => bytes.hash(h),
        Err(e) => e.kind().hash(h),
    }
}
