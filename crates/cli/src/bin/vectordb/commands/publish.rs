//! `vectordb publish`: events through the configured backend, from a JSONL file or one from flags.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use aura_cli::progress::Progress;
use aura_cli::publish::{self, configured_publisher};
use aura_runtime::Settings;
use aura_runtime::events::Event;

use super::report_failures;

#[derive(clap::Args)]
pub struct Args {
    /// JSONL file of events (one per line), or `-` for standard input.
    #[arg(long, value_name = "FILE|-", conflicts_with_all = ["event_type", "user", "data"])]
    events: Option<PathBuf>,
    /// Type of the one event to build, e.g. `user.mood.created`.
    #[arg(long = "type", value_name = "EVENT_TYPE", required_unless_present = "events")]
    event_type: Option<String>,
    #[arg(long)]
    user: Option<String>,
    /// The event's payload as JSON: `data` for `user.*` events, `context_data` for `context.*` ones.
    #[arg(long, value_name = "JSON")]
    data: Option<String>,
    #[arg(long)]
    trace_id: Option<String>,
    #[arg(long)]
    json: bool,
}

pub async fn run(args: Args, settings: Settings) -> anyhow::Result<ExitCode> {
    let Args {
        events,
        event_type,
        user,
        data,
        trace_id,
        json,
    } = args;
    let publisher = configured_publisher(&settings)?;
    let input: Box<dyn BufRead + Send> = match (events, event_type) {
        (Some(path), _) if path.as_os_str() == "-" => Box::new(BufReader::new(std::io::stdin())),
        (Some(path), _) => Box::new(BufReader::new(
            std::fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?,
        )),
        (None, Some(event_type)) => {
            let event = event_from_flags(event_type, user, data, trace_id)?;
            Box::new(std::io::Cursor::new(event.to_vec()))
        }
        (None, None) => anyhow::bail!("give --events FILE or --type (see --help)"),
    };
    let progress = Progress::new("events published", None, json);
    let summary = publish::publish_lines(publisher.as_ref(), input, |n| progress.set(n)).await?;
    progress.finish();
    if json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        let via: Vec<String> = summary
            .by_backend
            .iter()
            .map(|(backend, count)| format!("{count} via {backend}"))
            .collect();
        println!(
            "published {} event(s) ({}; MESSAGING_BACKEND={})",
            summary.published,
            if via.is_empty() {
                "none".to_owned()
            } else {
                via.join(", ")
            },
            summary.backend
        );
        for (event_type, count) in &summary.by_type {
            println!("  {event_type}: {count}");
        }
    }
    Ok(report_failures(&summary.failed, !json))
}

/// `publish --type … --user … --data …`: a new event (fresh id and timestamp) with the payload under the field its
/// type carries.
fn event_from_flags(
    event_type: String,
    user: Option<String>,
    data: Option<String>,
    trace_id: Option<String>,
) -> anyhow::Result<Event> {
    let field = if event_type.starts_with("context.") {
        "context_data"
    } else {
        "data"
    };
    let mut event = Event::new(event_type, user, trace_id);
    if let Some(data) = data {
        let value: serde_json::Value =
            serde_json::from_str(&data).context("--data is not valid JSON")?;
        event.set_field(field, value);
    }
    Ok(event)
}
