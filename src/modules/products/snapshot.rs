//! Search snapshots: a new API pod starts from a recent copy of the index instead of
//! building it from the whole catalogue. `flashsale search snapshot` (a CronJob in k8s)
//! brings its own index up to date, merges it and publishes a copy into
//! `search.snapshot_dir` (a shared volume). A pod whose own index is older copies the newest
//! snapshot in before it opens its index; its indexer then reads only what changed after the
//! snapshot's watermark, and `/ready` waits for that catch-up.
//!
//! Layout: `<snapshot_dir>/<watermark>-<id>/` holds one snapshot's files and
//! `<snapshot_dir>/LATEST` names the newest. Both are written by rename, so a reader sees a
//! whole snapshot or none, and the names sort by age.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use uuid::Uuid;

const LATEST: &str = "LATEST";
const STAGING_PREFIX: &str = ".staging-";
/// A pod may still be copying the previous snapshot while the next one is published.
const KEEP: usize = 2;
/// tantivy's own metadata, copied last: a copy cut short has no `meta.json`, so it reads as
/// an empty index (restored again at the next start), never as a partial one.
const META: &str = "meta.json";
/// Held by a live writer; meaningless in a copy.
const LOCKS: [&str; 2] = [".tantivy-writer.lock", ".tantivy-meta.lock"];

/// The watermark (newest `updated_at` indexed) in the last commit of the index in `dir`, read
/// from tantivy's `meta.json` without opening the index.
pub fn watermark(dir: &Path) -> Option<DateTime<Utc>> {
    let meta: serde_json::Value = serde_json::from_slice(&fs::read(dir.join(META)).ok()?).ok()?;
    super::search::parse_watermark(meta["payload"].as_str()?)
}

/// Copies the index in `index_dir` (committed, with no writer open) into a new snapshot under
/// `snapshot_dir`, points `LATEST` at it and removes all but the newest `KEEP`. Blocking.
pub fn publish(
    index_dir: &Path,
    snapshot_dir: &Path,
    watermark: DateTime<Utc>,
) -> io::Result<PathBuf> {
    fs::create_dir_all(snapshot_dir)?;
    let name = format!(
        "{}-{}",
        watermark.format("%Y%m%dT%H%M%S%.6fZ"),
        Uuid::now_v7().simple()
    );
    let staging = snapshot_dir.join(format!("{STAGING_PREFIX}{name}"));
    copy_index(index_dir, &staging)?;
    let published = snapshot_dir.join(&name);
    fs::rename(&staging, &published)?;
    let pointer = snapshot_dir.join(format!("{STAGING_PREFIX}{LATEST}"));
    fs::write(&pointer, &name)?;
    fs::rename(&pointer, snapshot_dir.join(LATEST))?;
    prune(snapshot_dir)?;
    Ok(published)
}

/// The snapshot `LATEST` names, if any.
fn latest(snapshot_dir: &Path) -> Option<PathBuf> {
    let name = fs::read_to_string(snapshot_dir.join(LATEST)).ok()?;
    let dir = snapshot_dir.join(name.trim());
    dir.is_dir().then_some(dir)
}

/// Replaces the index in `index_dir` with the newest snapshot when that is newer (a missing
/// or empty index is older than any snapshot). Answers the watermark restored, or `None`
/// when the local index was kept. Blocking.
pub fn restore_if_newer(
    snapshot_dir: &Path,
    index_dir: &Path,
) -> io::Result<Option<DateTime<Utc>>> {
    let Some(snapshot) = latest(snapshot_dir) else {
        return Ok(None);
    };
    let Some(offered) = watermark(&snapshot) else {
        return Ok(None);
    };
    if watermark(index_dir).is_some_and(|local| local >= offered) {
        return Ok(None);
    }
    // The index directory may be a mount point: empty it rather than replace it.
    fs::create_dir_all(index_dir)?;
    for entry in fs::read_dir(index_dir)? {
        let path = entry?.path();
        if path.is_dir() {
            fs::remove_dir_all(path)?;
        } else {
            fs::remove_file(path)?;
        }
    }
    copy_index(&snapshot, index_dir)?;
    Ok(Some(offered))
}

/// Copies an index's files from `from` into `to` (created), `meta.json` last.
fn copy_index(from: &Path, to: &Path) -> io::Result<()> {
    fs::create_dir_all(to)?;
    let mut files = vec![];
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name();
        if entry.file_type()?.is_file() && !LOCKS.iter().any(|lock| name == *lock) {
            files.push(name);
        }
    }
    files.sort_by_key(|name| name == META);
    for name in files {
        fs::copy(from.join(&name), to.join(&name))?;
    }
    Ok(())
}

/// Removes every snapshot but the newest `KEEP`, and any staging left by a publish that
/// died (one publisher runs at a time).
fn prune(snapshot_dir: &Path) -> io::Result<()> {
    let mut snapshots = vec![];
    for entry in fs::read_dir(snapshot_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !entry.file_type()?.is_dir() {
            continue;
        }
        if name.starts_with(STAGING_PREFIX) {
            fs::remove_dir_all(entry.path())?;
        } else {
            snapshots.push(name);
        }
    }
    snapshots.sort();
    let stale = snapshots.len().saturating_sub(KEEP);
    for name in &snapshots[..stale] {
        fs::remove_dir_all(snapshot_dir.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory shaped like a committed index: a segment file and a `meta.json` whose
    /// payload is `watermark`.
    fn fake_index(dir: &Path, watermark: &str, segment: &str) {
        fs::create_dir_all(dir).unwrap();
        fs::write(dir.join(segment), segment).unwrap();
        fs::write(dir.join(LOCKS[0]), "").unwrap();
        let meta = serde_json::json!({"segments": [], "opstamp": 1, "payload": watermark});
        fs::write(dir.join(META), meta.to_string()).unwrap();
    }

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("flashsale-snapshot-{}", Uuid::now_v7()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn at(t: &str) -> DateTime<Utc> {
        super::super::search::parse_watermark(t).unwrap()
    }

    #[test]
    fn the_newest_snapshot_replaces_an_older_index_and_only_the_newest_two_are_kept() {
        let root = scratch();
        let (source, snapshots, local) = (
            root.join("source"),
            root.join("snapshots"),
            root.join("local"),
        );
        for (i, t) in [
            "2026-12-01T10:00:00Z",
            "2026-12-01T11:00:00Z",
            "2026-12-01T12:00:00Z",
        ]
        .into_iter()
        .enumerate()
        {
            fake_index(&source, t, &format!("seg{i}.idx"));
            publish(&source, &snapshots, at(t)).unwrap();
        }
        let kept: Vec<_> = fs::read_dir(&snapshots)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
            .collect();
        assert_eq!(kept.len(), KEEP);

        fake_index(&local, "2026-12-01T09:00:00Z", "stale.idx");
        let restored = restore_if_newer(&snapshots, &local).unwrap();
        assert_eq!(restored, Some(at("2026-12-01T12:00:00Z")));
        assert_eq!(watermark(&local), restored);
        assert!(!local.join("stale.idx").exists(), "the older index is gone");
        assert!(local.join("seg2.idx").exists());
        assert!(!local.join(LOCKS[0]).exists(), "lock files are not copied");

        // A local index at least as new is kept.
        assert_eq!(restore_if_newer(&snapshots, &local).unwrap(), None);
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn no_snapshot_leaves_the_index_alone() {
        let root = scratch();
        let local = root.join("local");
        fake_index(&local, "2026-12-01T09:00:00Z", "mine.idx");
        assert_eq!(restore_if_newer(&root.join("none"), &local).unwrap(), None);
        assert!(local.join("mine.idx").exists());
        fs::remove_dir_all(root).unwrap();
    }
}
