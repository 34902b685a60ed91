//! The durable audit log: every event appended as one JSON line to `events.jsonl` under the
//! audit directory, by a thread of its own so the request path never waits on the disk.
//! Files rotate by size (`events.jsonl.1` is the newest old one) and the oldest beyond the
//! retention are deleted. Beside them, `last-used.json` keeps when each secret was last
//! injected, written at most once a minute and when the log closes.
//!
//! Lines are written in batches, each batch of whole lines with a single `write` on a file
//! opened for appending, so a killed daemon leaves whole lines. A write that fails part way
//! (a full disk) is cut back to the last whole line, and a torn last line found at start (a
//! crash of the machine) is cut off, so no later line continues one. Sequence numbers are
//! reserved ahead in `sequence`, so that events lost that way never let a number be used
//! twice after a restart.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::Recorded;

/// The file events are appended to.
const CURRENT: &str = "events.jsonl";
/// When each secret was last used, by id.
const LAST_USED: &str = "last-used.json";
/// The sequence numbers reserved so far: none at or below it is handed out after a restart.
const SEQUENCE: &str = "sequence";
/// How many sequence numbers are reserved at a time: one small write per so many events.
pub(super) const SEQUENCE_BLOCK: u64 = 10_000;
/// How often `last-used.json` is rewritten at most while events come in.
const LAST_USED_EVERY: Duration = Duration::from_secs(60);
/// How long the writer gathers events after the first of a batch. The writer shares the
/// cores with the engine: waking it and writing once per request cost a fifth of a core
/// under load (docs/benchmarks.md); once per window costs nothing measurable. An event
/// reaches the file at most this much later.
const BATCH_WINDOW: Duration = Duration::from_millis(10);

/// Where and how much the audit log keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditFileSettings {
    /// Directory of the log files.
    pub dir: PathBuf,
    /// Size at which `events.jsonl` is rotated.
    pub max_file_bytes: u64,
    /// Rotated files kept besides the current one.
    pub keep_files: usize,
}

/// When each secret was last used, shared by the log and its writer.
#[derive(Default)]
pub(super) struct LastUsed {
    times: Mutex<HashMap<Arc<str>, OffsetDateTime>>,
    changed: AtomicBool,
}

impl LastUsed {
    pub(super) fn set(&self, id: &Arc<str>, time: OffsetDateTime) {
        self.lock().insert(Arc::clone(id), time);
        self.changed.store(true, Ordering::Relaxed);
    }

    /// When `id` was last used, RFC 3339.
    pub(super) fn get(&self, id: &str) -> Option<String> {
        self.lock().get(id).map(|time| super::rfc3339(*time))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, OffsetDateTime>> {
        self.times
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn load(dir: &Path) -> Self {
        let saved: HashMap<String, String> = fs::read(dir.join(LAST_USED))
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default();
        let times = saved
            .into_iter()
            .filter_map(|(id, time)| {
                let time = OffsetDateTime::parse(&time, &Rfc3339).ok()?;
                Some((Arc::from(id), time))
            })
            .collect();
        Self {
            times: Mutex::new(times),
            changed: AtomicBool::new(false),
        }
    }

    /// Writes the times when they changed since the last save.
    fn save(&self, dir: &Path) {
        if !self.changed.swap(false, Ordering::Relaxed) {
            return;
        }
        let text = {
            let times = self.lock();
            let saved: HashMap<&str, String> = times
                .iter()
                .map(|(id, time)| (&**id, super::rfc3339(*time)))
                .collect();
            serde_json::to_vec(&saved).unwrap_or_default()
        };
        if let Err(error) = crate::files::write_atomically(&dir.join(LAST_USED), &text, 0o600) {
            tracing::warn!(%error, dir = %dir.display(), "cannot save when secrets were last used");
            self.changed.store(true, Ordering::Relaxed);
        }
    }
}

/// The writer thread and the way to it.
pub(super) struct Writer {
    lines: mpsc::Sender<Arc<Recorded>>,
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    /// Hands an event to the writer, which renders it as a line of its own.
    pub(super) fn append(&self, recorded: Arc<Recorded>) {
        // The thread only ends when the sender is dropped.
        let _ = self.lines.send(recorded);
    }

    /// Writes everything handed over so far, saves the last-used times and stops.
    pub(super) fn close(self) {
        drop(self.lines);
        let _ = self.thread.join();
    }
}

/// The sequence numbers reserved in `dir` (0 when none were).
pub(super) fn reserved_sequence(dir: &Path) -> u64 {
    fs::read_to_string(dir.join(SEQUENCE))
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(0)
}

/// Reserves the sequence numbers up to `until` in `dir`, durably.
pub(super) fn reserve_sequence(dir: &Path, until: u64) -> io::Result<()> {
    let partial = dir.join(format!(".{SEQUENCE}.partial"));
    {
        let mut file = File::create(&partial)?;
        file.write_all(format!("{until}\n").as_bytes())?;
        file.sync_all()?;
    }
    fs::rename(&partial, dir.join(SEQUENCE))
}

/// Opens the log in `settings.dir` (created 0700) and starts its writer; returns it with the
/// last `recent` events found there, oldest first.
pub(super) fn open(
    settings: AuditFileSettings,
    recent: usize,
) -> io::Result<(Writer, Arc<LastUsed>, Vec<Value>)> {
    fs::create_dir_all(&settings.dir)?;
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&settings.dir, fs::Permissions::from_mode(0o700))?;
    }
    let last_used = Arc::new(LastUsed::load(&settings.dir));
    let recent = read_recent(&settings, recent);
    let mut file = Appender::open(settings.clone())?;
    let (lines, incoming) = mpsc::channel::<Arc<Recorded>>();
    let shared = Arc::clone(&last_used);
    let thread = std::thread::Builder::new()
        .name("audit-log".into())
        .spawn(move || {
            let mut saved = Instant::now();
            loop {
                match incoming.recv_timeout(LAST_USED_EVERY) {
                    Ok(first) => {
                        std::thread::sleep(BATCH_WINDOW);
                        let batch: Vec<Arc<Recorded>> =
                            std::iter::once(first).chain(incoming.try_iter()).collect();
                        file.append(&batch);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
                if saved.elapsed() >= LAST_USED_EVERY {
                    shared.save(&file.settings.dir);
                    saved = Instant::now();
                }
            }
            shared.save(&file.settings.dir);
        })?;
    Ok((Writer { lines, thread }, last_used, recent))
}

/// The current file, rotated by size.
struct Appender {
    settings: AuditFileSettings,
    file: File,
    size: u64,
}

impl Appender {
    fn open(settings: AuditFileSettings) -> io::Result<Self> {
        let path = settings.dir.join(CURRENT);
        let file = open_for_append(&path)?;
        let mut size = file.metadata()?.len();
        // A torn last line is cut off, so that the next line does not continue it. Cutting
        // needs no room, so it works on a full disk too.
        let whole = whole_lines_length(&File::open(&path)?, size)?;
        if whole < size {
            tracing::warn!(path = %path.display(), bytes = size - whole, "the audit log ended in a torn line; cut it off");
            file.set_len(whole)?;
            size = whole;
        }
        Ok(Self {
            settings,
            file,
            size,
        })
    }

    /// Appends the events' lines, rotating before a line that would take the file past its
    /// size: each write holds whole lines.
    fn append(&mut self, batch: &[Arc<Recorded>]) {
        let mut pending = Vec::new();
        for recorded in batch {
            let line = recorded.to_line();
            let size = self.size + pending.len() as u64;
            if size > 0 && size + line.len() as u64 + 1 > self.settings.max_file_bytes {
                self.write(&std::mem::take(&mut pending));
                if let Err(error) = self.rotate() {
                    tracing::warn!(%error, dir = %self.settings.dir.display(), "cannot rotate the audit log; appending to the current file");
                }
            }
            pending.extend_from_slice(line.as_bytes());
            pending.push(b'\n');
        }
        self.write(&pending);
    }

    fn write(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        match self.file.write_all(bytes) {
            Ok(()) => self.size += bytes.len() as u64,
            Err(error) => {
                // Part of it may be on disk: cut back to the last whole line, so the next
                // batch starts a line of its own.
                let cut = self.file.set_len(self.size);
                let lost = bytes.iter().filter(|&&byte| byte == b'\n').count();
                crate::metrics::METRICS
                    .audit_events_lost
                    .inc_by(lost as u64);
                tracing::warn!(%error, lost, cut_back = cut.is_ok(), dir = %self.settings.dir.display(), "cannot append to the audit log; events lost");
            }
        }
    }

    /// `events.jsonl` becomes `.1`, `.1` becomes `.2`, … and what is past the retention goes.
    fn rotate(&mut self) -> io::Result<()> {
        let path = |index: usize| match index {
            0 => self.settings.dir.join(CURRENT),
            _ => self.settings.dir.join(format!("{CURRENT}.{index}")),
        };
        let _ = fs::remove_file(path(self.settings.keep_files));
        for index in (0..self.settings.keep_files).rev() {
            match fs::rename(path(index), path(index + 1)) {
                Ok(()) => {}
                Err(error) if error.kind() == io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        if self.settings.keep_files == 0 {
            let _ = fs::remove_file(path(0));
        }
        self.file = open_for_append(&path(0))?;
        self.size = 0;
        Ok(())
    }
}

/// The length of `file` (of `size` bytes) up to and including its last line break: what
/// holds whole lines.
fn whole_lines_length(file: &File, size: u64) -> io::Result<u64> {
    use std::os::unix::fs::FileExt as _;
    let mut chunk = [0u8; 8192];
    let mut end = size;
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.read_exact_at(part, start)?;
        if let Some(index) = part.iter().rposition(|&byte| byte == b'\n') {
            return Ok(start + index as u64 + 1);
        }
        end = start;
    }
    Ok(0)
}

fn open_for_append(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// The last `count` whole event lines of the log, oldest first, read from the end: the
/// current file, then the rotated ones from the newest, until there are enough. Lines that
/// do not parse (a torn last line) are skipped.
fn read_recent(settings: &AuditFileSettings, count: usize) -> Vec<Value> {
    let mut recent: Vec<Value> = Vec::new();
    let files = std::iter::once(settings.dir.join(CURRENT)).chain(
        (1..=settings.keep_files).map(|index| settings.dir.join(format!("{CURRENT}.{index}"))),
    );
    for path in files {
        if recent.len() >= count {
            break;
        }
        let Ok(file) = File::open(&path) else {
            continue;
        };
        let wanted = count - recent.len();
        match last_lines(&file, wanted) {
            // Newest first, so that what is kept is the newest.
            Ok(lines) => recent.extend(
                lines
                    .iter()
                    .rev()
                    .filter_map(|line| serde_json::from_slice::<Value>(line).ok()),
            ),
            Err(error) => {
                tracing::warn!(%error, path = %path.display(), "cannot read the audit log back")
            }
        }
    }
    recent.truncate(count);
    recent.reverse();
    recent
}

/// The last `count` lines of `file` (fewer when it has fewer), oldest first, read from the
/// end in chunks: the start of a large file is never read.
fn last_lines(file: &File, count: usize) -> io::Result<Vec<Vec<u8>>> {
    use std::os::unix::fs::FileExt as _;
    let mut end = file.metadata()?.len();
    let mut lines: Vec<Vec<u8>> = Vec::new();
    // The bytes read of the line the read has reached, not yet complete.
    let mut partial: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while end > 0 && lines.len() < count {
        let start = end.saturating_sub(chunk.len() as u64);
        let part = &mut chunk[..(end - start) as usize];
        file.read_exact_at(part, start)?;
        let mut rest: &[u8] = part;
        while let Some(index) = rest.iter().rposition(|&byte| byte == b'\n') {
            let mut line = rest[index + 1..].to_vec();
            line.extend_from_slice(&partial);
            partial.clear();
            if !line.is_empty() {
                lines.push(line);
                if lines.len() == count {
                    break;
                }
            }
            rest = &rest[..index];
        }
        let mut kept = rest.to_vec();
        kept.extend_from_slice(&partial);
        partial = kept;
        end = start;
    }
    if end == 0 && !partial.is_empty() && lines.len() < count {
        lines.push(partial);
    }
    lines.reverse();
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::temp_dir;

    fn recorded(sequence: u64) -> Arc<Recorded> {
        Arc::new(Recorded {
            sequence,
            time: OffsetDateTime::now_utc(),
            event: super::super::AuditEvent {
                agent: None,
                cgroup_id: 1,
                pid: 2,
                netns_cookie: 3,
                container: None,
                secrets: Vec::new(),
                host: "api.example.com".into(),
                method: http::Method::GET,
                path: "/".into(),
                status: 200,
                outcome: "forwarded",
            },
        })
    }

    fn settings(name: &str, max_file_bytes: u64, keep_files: usize) -> AuditFileSettings {
        AuditFileSettings {
            dir: temp_dir(name).join("audit"),
            max_file_bytes,
            keep_files,
        }
    }

    #[test]
    fn lines_survive_reopening_and_rotate_within_the_retention() {
        let settings = settings("audit-rotate", 64, 2);
        let (writer, _, recent) = open(settings.clone(), 100).unwrap();
        assert!(recent.is_empty());
        for seq in 1..=10 {
            writer.append(recorded(seq));
        }
        writer.close();
        let (writer, _, recent) = open(settings.clone(), 100).unwrap();
        writer.close();
        let seqs: Vec<u64> = recent
            .iter()
            .filter_map(|line| line["seq"].as_u64())
            .collect();
        // An event's line is longer than 64 bytes, so each file holds one: the current file
        // and two rotated ones remain.
        assert_eq!(seqs, [8, 9, 10]);
        assert!(!settings.dir.join(format!("{CURRENT}.3")).exists());
        // Only as many as asked for, the newest.
        let (writer, _, recent) = open(settings.clone(), 2).unwrap();
        writer.close();
        let seqs: Vec<u64> = recent
            .iter()
            .filter_map(|line| line["seq"].as_u64())
            .collect();
        assert_eq!(seqs, [9, 10]);
    }

    #[test]
    fn the_last_lines_are_read_from_the_end_across_chunks() {
        let dir = temp_dir("audit-last-lines");
        let path = dir.join("lines");
        // Lines longer than a chunk, and one without a final line break.
        let lines: Vec<String> = (0..50)
            .map(|index| format!("{index}:{}", "x".repeat(index * 3000)))
            .collect();
        fs::write(&path, lines.join("\n")).unwrap();
        let file = File::open(&path).unwrap();
        let last = last_lines(&file, 5).unwrap();
        let expected: Vec<Vec<u8>> = lines[45..]
            .iter()
            .map(|line| line.as_bytes().to_vec())
            .collect();
        assert_eq!(last, expected);
        assert_eq!(last_lines(&file, 500).unwrap().len(), 50);
    }

    #[test]
    fn a_torn_last_line_is_skipped() {
        let settings = settings("audit-torn", 1 << 20, 1);
        fs::create_dir_all(&settings.dir).unwrap();
        fs::write(
            settings.dir.join(CURRENT),
            "{\"seq\":1}\n{\"seq\":2}\n{\"se",
        )
        .unwrap();
        let (writer, _, recent) = open(settings.clone(), 100).unwrap();
        assert_eq!(recent.len(), 2);
        writer.append(recorded(3));
        writer.close();
        let (writer, _, recent) = open(settings.clone(), 100).unwrap();
        writer.close();
        let seqs: Vec<u64> = recent
            .iter()
            .filter_map(|line| line["seq"].as_u64())
            .collect();
        assert_eq!(seqs, [1, 2, 3]);
        // The torn line was cut off, not kept as a line of its own.
        let text = fs::read_to_string(settings.dir.join(CURRENT)).unwrap();
        assert!(!text.contains("{\"se\n"), "{text}");
        assert_eq!(text.lines().count(), 3);
    }

    #[test]
    fn last_used_times_are_saved_when_the_log_closes() {
        let settings = settings("audit-last-used", 1 << 20, 1);
        let (writer, last_used, _) = open(settings.clone(), 100).unwrap();
        let time = OffsetDateTime::parse("2026-12-01T00:00:00Z", &Rfc3339).unwrap();
        last_used.set(&Arc::from("sec_1"), time);
        writer.close();
        let (writer, last_used, _) = open(settings, 100).unwrap();
        writer.close();
        assert_eq!(
            last_used.get("sec_1").as_deref(),
            Some("2026-12-01T00:00:00Z")
        );
    }
}
