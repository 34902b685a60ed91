//! Log output: `tracing` with text or JSON lines on stderr. Records from the eBPF programs
//! (aya-log, through the `log` facade) arrive here too.
//!
//! Text lines fit where they go: coloured with a timestamp on a terminal; plain (no escape
//! codes) in a file or pipe; under systemd, whose journal adds its own timestamp, without a
//! timestamp and with the syslog priority prefix (`<3>` error … `<7>` debug) that journald
//! reads into each entry's priority.

use std::io::IsTerminal as _;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::{self, FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::EnvFilter;

/// Output format of log lines (`log.format`, `--log-format`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Where stderr goes, which decides the shape of text lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Destination {
    /// A terminal: colour (unless `NO_COLOR` is set) and timestamps.
    Terminal,
    /// systemd's journal (`JOURNAL_STREAM` names stderr): priority prefixes, no timestamps.
    Journal,
    /// A file or a pipe: plain lines with timestamps.
    Other,
}

impl Destination {
    fn of_stderr() -> Self {
        if journal_stream_is_stderr() {
            Self::Journal
        } else if std::io::stderr().is_terminal() {
            Self::Terminal
        } else {
            Self::Other
        }
    }
}

/// Whether `JOURNAL_STREAM` (`<device>:<inode>`, set by systemd) names the file stderr is
/// open on. A child that inherited the variable but not the stream does not match.
fn journal_stream_is_stderr() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((device, inode)) = value.to_str().and_then(|value| value.split_once(':')) else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    device.parse() == Ok(stat.st_dev) && inode.parse() == Ok(stat.st_ino)
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let subscriber = match format {
        LogFormat::Text => text_subscriber(filter, Destination::of_stderr(), std::io::stderr),
        LogFormat::Json => Box::new(
            fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .json()
                .flatten_event(true)
                .with_current_span(true)
                .finish(),
        ),
    };
    // Also routes the `log` facade (the eBPF programs' records) into the subscriber. Only the
    // first call in a process installs; a later one keeps the first subscriber.
    let _ = subscriber.try_init();
}

fn fmt() -> fmt::SubscriberBuilder {
    fmt::Subscriber::builder()
}

fn text_subscriber<W>(
    filter: EnvFilter,
    destination: Destination,
    writer: W,
) -> Box<dyn Subscriber + Send + Sync>
where
    W: for<'writer> MakeWriter<'writer> + Send + Sync + 'static,
{
    let colour = destination == Destination::Terminal && std::env::var_os("NO_COLOR").is_none();
    let builder = fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(colour);
    match destination {
        Destination::Journal => Box::new(
            builder
                .event_format(JournalLine(Format::default().without_time()))
                .finish(),
        ),
        Destination::Terminal | Destination::Other => Box::new(builder.finish()),
    }
}

/// A text line behind the syslog priority of its level, for journald.
struct JournalLine(Format<Full, ()>);

impl<S, N> FormatEvent<S, N> for JournalLine
where
    S: Subscriber + for<'span> LookupSpan<'span>,
    N: for<'writer> FormatFields<'writer> + 'static,
{
    fn format_event(
        &self,
        context: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        let priority = match *event.metadata().level() {
            Level::ERROR => 3,
            Level::WARN => 4,
            Level::INFO => 6,
            Level::DEBUG | Level::TRACE => 7,
        };
        write!(writer, "<{priority}>")?;
        self.0.format_event(context, writer, event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'writer> MakeWriter<'writer> for Captured {
        type Writer = Self;

        fn make_writer(&'writer self) -> Self::Writer {
            self.clone()
        }
    }

    fn lines_for(destination: Destination) -> String {
        let captured = Captured::default();
        let subscriber = text_subscriber(EnvFilter::new("info"), destination, captured.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::warn!(secret = "sec_1", "upstream refused");
            tracing::info!("appliance ready");
        });
        let bytes = captured.0.lock().unwrap().clone();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn journal_lines_carry_priorities_and_no_timestamps_or_colour() {
        let text = lines_for(Destination::Journal);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].starts_with("<4> WARN appliance::"), "{text}");
        assert!(
            lines[0].contains("upstream refused secret=\"sec_1\""),
            "{text}"
        );
        assert!(lines[1].starts_with("<6> INFO appliance::"), "{text}");
        assert!(!text.contains('\u{1b}'), "escape codes: {text:?}");
    }

    #[test]
    fn lines_to_a_file_have_timestamps_and_no_colour() {
        let text = lines_for(Destination::Other);
        assert!(!text.contains('\u{1b}'), "escape codes: {text:?}");
        let first = text.lines().next().unwrap();
        assert!(
            first.starts_with("20") && first.contains('T'),
            "no timestamp: {first}"
        );
        assert!(!first.starts_with('<'), "{first}");
    }
}
