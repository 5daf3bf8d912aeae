//! `docker-compose.yml`, the `Dockerfile` and the Grafana dashboard, checked statically (no Docker engine runs here):
//! Debian's `docker-compose` resolves the file, and what it resolves to is held against the code — the processes
//! accept the environment it gives them, every variable is documented, every mounted file exists, and every series the
//! dashboard draws is one the processes export.
//!
//! Run through `scripts/test.sh`, which installs `docker-compose` if missing and sets `AURA_TEST_PYTHON` (PyYAML reads
//! the resolved file).

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The compose file as `docker-compose config` resolves it (anchors merged, `${VAR:-default}` substituted), as JSON.
fn resolved_compose(env: &[(&str, &str)]) -> Value {
    let output = Command::new("docker-compose")
        .current_dir(root())
        .env_remove("MESSAGING_BACKEND")
        .env_remove("MESSAGING_FALLBACK")
        .env_remove("DISABLED_HANDLERS")
        .env_remove("CONSUMER_MESSAGING_BACKEND")
        .env_remove("WORKER_MESSAGING_BACKEND")
        .envs(env.iter().copied())
        .args([
            "-f",
            "docker-compose.yml",
            "--profile",
            "monitoring",
            "config",
        ])
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "docker-compose: {e} (scripts/test.sh installs it: apt-get install docker-compose)"
            )
        });
    assert!(
        output.status.success(),
        "docker-compose config: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    yaml_to_json(&output.stdout)
}

fn yaml_to_json(yaml: &[u8]) -> Value {
    let mut child = Command::new(aura_testkit::python())
        .args([
            "-c",
            "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(yaml).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn environment(service: &Value) -> BTreeMap<String, String> {
    service["environment"]
        .as_object()
        .map(|env| {
            env.iter()
                .map(|(k, v)| {
                    let value = match v {
                        Value::String(s) => s.clone(),
                        Value::Null => String::new(),
                        other => other.to_string(),
                    };
                    (k.clone(), value)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `(source, target)` of a service's volumes (`docker-compose config` writes them as `source:target:mode`).
fn volumes(service: &Value) -> Vec<(String, String)> {
    service["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|v| {
            let text = v.as_str().unwrap_or_else(|| panic!("volume {v}"));
            let mut parts = text.split(':');
            let source = parts.next().unwrap_or_default().to_owned();
            let target = parts
                .next()
                .unwrap_or_else(|| panic!("volume {text}"))
                .to_owned();
            (source, target)
        })
        .collect()
}

fn published_ports(service: &Value) -> Vec<(u64, u64)> {
    service["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let field = |name: &str| {
                p[name]
                    .as_u64()
                    .or_else(|| p[name].as_str().and_then(|s| s.parse().ok()))
                    .unwrap_or_else(|| panic!("port {p}"))
            };
            (field("published"), field("target"))
        })
        .collect()
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs docker-compose, promtool, Python: test.sh")]
fn the_compose_file_resolves_to_the_stack_the_runbook_describes() {
    let compose = resolved_compose(&[]);
    let services = compose["services"].as_object().unwrap();
    for name in [
        "kafka",
        "kafka-init",
        "redis",
        "qdrant",
        "kafka-ui",
        "flower",
        "vectordb-consumer",
        "vectordb-worker",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "no service {name}");
    }

    // Kafka in KRaft mode (no ZooKeeper), with the listener the other containers use.
    let kafka = &services["kafka"];
    assert!(
        kafka["image"]
            .as_str()
            .unwrap()
            .starts_with("apache/kafka:")
    );
    let kafka_env = environment(kafka);
    assert_eq!(kafka_env["KAFKA_PROCESS_ROLES"], "broker,controller");
    assert!(kafka_env["KAFKA_ADVERTISED_LISTENERS"].contains("kafka:29092"));
    assert!(!services.contains_key("zookeeper"));

    // Redis keeps its queues across a restart (AOF on a volume): a Celery rollback must survive one.
    let redis = &services["redis"];
    let redis_command: Vec<&str> = redis["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        redis_command
            .windows(2)
            .any(|w| w == ["--appendonly", "yes"])
    );
    assert!(volumes(redis).contains(&("redis-data".to_owned(), "/data".to_owned())));

    assert!(published_ports(&services["kafka-ui"]).contains(&(8090, 8080)));
    assert!(published_ports(&services["flower"]).contains(&(5555, 5555)));

    // Topic init runs our CLI and the processes wait for it.
    assert_eq!(
        services["kafka-init"]["command"],
        serde_json::json!([
            "vectordb",
            "topics",
            "create",
            "--partitions",
            "3",
            "--replication-factor",
            "1"
        ])
    );
    for process in ["vectordb-consumer", "vectordb-worker"] {
        let service = &services[process];
        assert_eq!(service["command"], serde_json::json!([process]));
        assert_eq!(
            service["depends_on"]["kafka-init"]["condition"],
            "service_completed_successfully"
        );
        let env = environment(service);
        assert_eq!(env["KAFKA_BOOTSTRAP_SERVERS"], "kafka:29092");
        assert_eq!(env["QDRANT_URL"], "http://qdrant:6334", "the gRPC port");
        // Prometheus scrapes the port the processes listen on.
        let port = env["HTTP_ADDR"].rsplit(':').next().unwrap().to_owned();
        let prometheus =
            std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).unwrap();
        assert!(
            prometheus.contains(&format!("{process}:{port}")),
            "prometheus does not scrape {process}:{port}"
        );
        assert!(
            published_ports(service)
                .iter()
                .any(|(_, target)| target.to_string() == port)
        );
    }

    // Every file mounted into a container is in the repository, and every named volume is declared.
    let mut binds = 0;
    for (name, service) in services {
        for (source, target) in volumes(service) {
            if source.starts_with('/') {
                binds += 1;
                assert!(
                    Path::new(&source).exists(),
                    "{name} mounts {source} which does not exist"
                );
            } else {
                assert!(
                    compose["volumes"].get(&source).is_some(),
                    "{name}: volume {source} for {target} is not declared"
                );
            }
        }
    }
    assert_eq!(
        binds, 5,
        "prometheus.yml and alerts.yml, alertmanager.yml, Grafana's provisioning and its dashboard"
    );
    // Prometheus loads the alert rules from where compose mounts them, and sends alerts to the Alertmanager service.
    let mounts: Vec<(String, String)> = volumes(&services["prometheus"]);
    assert!(
        mounts.iter().any(
            |(source, target)| source.ends_with("deploy/prometheus/alerts.yml")
                && target == "/etc/prometheus/alerts.yml"
        ),
        "{mounts:?}"
    );
    let prometheus =
        std::fs::read_to_string(root().join("deploy/prometheus/prometheus.yml")).unwrap();
    assert!(prometheus.contains("- alerts.yml") && prometheus.contains("alertmanager:9093"));
    assert!(published_ports(&services["alertmanager"]).contains(&(9093, 9093)));
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs docker-compose, promtool, Python: test.sh")]
fn each_process_can_be_switched_alone_and_the_fallback_is_off_unless_set() {
    // One shared variable switches both; a process's own variable switches it alone.
    let compose = resolved_compose(&[
        ("MESSAGING_BACKEND", "kafka"),
        ("CONSUMER_MESSAGING_BACKEND", "disabled"),
    ]);
    let consumer = environment(&compose["services"]["vectordb-consumer"]);
    let worker = environment(&compose["services"]["vectordb-worker"]);
    assert_eq!(consumer["MESSAGING_BACKEND"], "kafka");
    assert_eq!(consumer["CONSUMER_MESSAGING_BACKEND"], "disabled");
    assert_eq!(worker["MESSAGING_BACKEND"], "kafka");
    assert_eq!(worker["WORKER_MESSAGING_BACKEND"], "");
    assert!(!worker.contains_key("CONSUMER_MESSAGING_BACKEND"));
    // What the processes make of it: the consumer alone is disabled.
    for (process, env, expected) in [
        ("vectordb-consumer", &consumer, "disabled"),
        ("vectordb-worker", &worker, "kafka"),
    ] {
        let pairs: std::collections::HashMap<String, String> =
            env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let which = if process == "vectordb-consumer" {
            aura_runtime::settings::Process::Consumer
        } else {
            aura_runtime::settings::Process::Worker
        };
        let settings =
            aura_runtime::Settings::from_sources_for(&root().join("config"), &pairs, Some(which))
                .unwrap();
        assert_eq!(settings.messaging_backend.as_str(), expected, "{process}");
    }
    // The defaults agree with the processes' own: no fallback unless asked for.
    let compose = resolved_compose(&[]);
    for process in ["vectordb-consumer", "vectordb-worker"] {
        let env = environment(&compose["services"][process]);
        assert_eq!(env["MESSAGING_FALLBACK"], "", "{process}");
        assert_eq!(env["MESSAGING_BACKEND"], "kafka", "{process}");
    }
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs docker-compose, promtool, Python: test.sh")]
fn every_variable_compose_sets_is_documented_and_accepted_by_the_processes() {
    let reference = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    for (backend, fallback) in [("kafka", Some("celery")), ("celery", None)] {
        let compose = resolved_compose(&[
            ("MESSAGING_BACKEND", backend),
            ("MESSAGING_FALLBACK", "celery"),
        ]);
        for process in ["vectordb-consumer", "vectordb-worker"] {
            let env = environment(&compose["services"][process]);
            assert_eq!(env["MESSAGING_BACKEND"], backend);
            for key in env.keys() {
                assert!(
                    reference.contains(&format!("`{key}`")),
                    "{process}: {key} is not in docs/configuration.md"
                );
            }
            // The processes read the same settings as `vectordb check`; point the hosts of the compose network at
            // a closed local port so that the connectivity checks fail fast, and read what it would do.
            let dir = tempfile::tempdir().unwrap();
            let closed = "127.0.0.1:9";
            let rewritten: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| {
                    let v = v
                        .replace("kafka:29092", closed)
                        .replace("redis:6379", closed)
                        .replace("qdrant:6334", closed)
                        .replace("0.0.0.0:8080", "127.0.0.1:0");
                    (k.clone(), v)
                })
                .collect();
            let output = Command::new(env!("CARGO_BIN_EXE_vectordb"))
                .env_clear()
                .current_dir(dir.path())
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .envs(rewritten)
                .args(["check", "--json"])
                .output()
                .unwrap();
            let report: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
                panic!(
                    "{process} with MESSAGING_BACKEND={backend}: {e}: {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
            assert_eq!(report["messaging_backend"], backend);
            assert_eq!(
                report["fallback"].as_str(),
                fallback,
                "a fallback is inert unless the backend is kafka"
            );
            assert_eq!(
                report["enabled_handlers"],
                serde_json::json!(["mood_created", "context_aggregated", "ingest_vectors"])
            );
            let checks = report["checks"].as_array().unwrap();
            assert_eq!(checks[0]["name"], "config");
            assert_eq!(checks[0]["ok"], true);
            // Nothing listens on the rewritten hosts: each dependency is reported unreachable with a fix, and the
            // exit status says so.
            let broker = checks.iter().find(|c| c["name"] == "broker").unwrap();
            assert_eq!(broker["ok"], false, "{broker}");
            assert!(broker["fix"].as_str().unwrap().contains("BROKER_URL"));
            assert!(!output.status.success());
        }
    }
}

#[test]
fn the_dashboard_draws_only_metrics_the_processes_export() {
    let path = root().join("deploy/grafana/aura360-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let exported: Vec<&str> = aura_ops::METRICS.iter().map(|m| m.name).collect();
    let mut drawn = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        assert_eq!(
            panel["datasource"]["uid"], "prometheus",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let names: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.starts_with("aura360_"))
                .collect();
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| name.strip_suffix(suffix))
                    .unwrap_or(name);
                assert!(
                    exported.contains(&base),
                    "the dashboard draws {name}, which nothing exports"
                );
                drawn.insert(base.to_owned());
            }
        }
    }
    // And nothing exported is missing from it.
    assert_eq!(drawn.len(), exported.len(), "drawn: {drawn:?}");
    // The provisioning points Grafana at the file compose mounts.
    let provider =
        std::fs::read_to_string(root().join("deploy/grafana/provisioning/dashboards/aura360.yml"))
            .unwrap();
    let datasource = std::fs::read_to_string(
        root().join("deploy/grafana/provisioning/datasources/prometheus.yml"),
    )
    .unwrap();
    assert!(provider.contains("/var/lib/grafana/dashboards"));
    assert!(datasource.contains("uid: prometheus"));
}

#[test]
fn the_dockerfile_builds_and_ships_the_three_binaries() {
    let dockerfile = std::fs::read_to_string(root().join("Dockerfile")).unwrap();
    let stages = lines_starting(&dockerfile, "FROM ");
    assert_eq!(stages.len(), 2, "multi-stage: {stages:?}");
    let manifest = std::fs::read_to_string(root().join("crates/cli/Cargo.toml")).unwrap();
    for binary in ["vectordb", "vectordb-consumer", "vectordb-worker"] {
        assert!(manifest.contains(&format!("name = \"{binary}\"")));
        assert!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "{binary} is not copied"
        );
    }
    // The health check asks the port the image listens on.
    assert!(dockerfile.contains("HTTP_ADDR=0.0.0.0:8080"));
    assert!(dockerfile.contains("http://127.0.0.1:8080/health"));
    // The build context leaves out what would bloat it or leak local state.
    let ignore = std::fs::read_to_string(root().join(".dockerignore")).unwrap();
    for entry in ["target/", ".venv/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l == entry),
            "{entry} is not in .dockerignore"
        );
    }
}

/// GitHub's anchor of a Markdown heading: lower case, spaces to dashes, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
#[cfg_attr(not(feature = "services"), ignore = "needs docker-compose, promtool, Python: test.sh")]
fn every_alert_has_a_severity_a_summary_a_runbook_section_and_a_readme_mention() {
    let rules: Value = {
        let text = std::fs::read(root().join("deploy/prometheus/alerts.yml")).unwrap();
        yaml_to_json(&text)
    };
    let runbook = std::fs::read_to_string(root().join("RUNBOOK.md")).unwrap();
    let anchors: Vec<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("### ").or_else(|| l.strip_prefix("## ")))
        .map(anchor)
        .collect();
    let reference = std::fs::read_to_string(root().join("docs/observability.md")).unwrap();
    let mut names = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap().to_owned();
            assert!(name.starts_with("AURA360"), "{name}");
            let severity = rule["labels"]["severity"].as_str().unwrap_or("");
            assert!(
                ["critical", "warning", "info"].contains(&severity),
                "{name}: {severity:?}"
            );
            assert!(
                rule["annotations"]["summary"].is_string(),
                "{name}: no summary"
            );
            let link = rule["annotations"]["runbook"].as_str().unwrap_or("");
            let target = link
                .strip_prefix("RUNBOOK.md#")
                .unwrap_or_else(|| panic!("{name}: {link}"));
            assert_eq!(
                target,
                name.to_lowercase(),
                "{name}: the anchor is the alert's name"
            );
            assert!(
                anchors.iter().any(|a| a == target),
                "{name}: no RUNBOOK section #{target}"
            );
            assert!(
                reference.contains(&format!("`{name}`")),
                "{name} is not listed in docs/observability.md"
            );
            names.push(name);
        }
    }
    // The plan's three and the five an operator needs beyond them.
    for expected in [
        "AURA360ConsumerLagHigh",
        "AURA360ErrorRateHigh",
        "AURA360ThroughputAnomaly",
        "AURA360BackendDown",
        "AURA360DeadLettersGrowing",
        "AURA360WorkerHeartbeatMissing",
        "AURA360PublishFallbackInUse",
        "AURA360CeleryBacklogGrowing",
    ] {
        assert!(names.iter().any(|n| n == expected), "no {expected}");
    }
    // Every metric the rules use is one the processes export.
    let exported: Vec<&str> = aura_ops::METRICS.iter().map(|m| m.name).collect();
    let text = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
        if word.starts_with("aura360_") {
            assert!(
                exported.contains(&word),
                "alerts.yml uses {word}, which nothing exports"
            );
        }
    }
}

/// Every Markdown document of the repository (not the build's or the venv's).
fn documents() -> Vec<PathBuf> {
    let mut docs = vec![
        root().join("README.md"),
        root().join("RUNBOOK.md"),
        root().join("BENCHMARKS.md"),
        root().join("clients/python/README.md"),
    ];
    let mut pages: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    pages.sort();
    docs.extend(pages);
    docs
}

#[test]
fn the_readme_and_docs_render_cleanly_and_link_only_inside_the_repository() {
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        let name = doc.strip_prefix(root()).unwrap().display().to_string();
        assert!(
            !text.contains("../shared"),
            "{name} links outside the repository"
        );
        // Every code fence is closed: an open one renders the rest of the page as code.
        let fences = text
            .lines()
            .filter(|l| l.trim_start().starts_with("```"))
            .count();
        assert!(fences % 2 == 0, "{name} leaves a code fence open");
        // Relative Markdown links resolve to files that exist.
        let dir = doc.parent().unwrap().to_owned();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let target = rest[..end].split('#').next().unwrap();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            assert!(
                dir.join(target).exists(),
                "{name} links to {target}, which does not exist"
            );
        }
    }
    // The README is the front door; the reference lives in docs/.
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    assert!(
        readme.lines().count() <= 200,
        "README.md has {} lines: move reference to docs/",
        readme.lines().count()
    );
    assert!(
        readme.contains("scripts/test.sh") && readme.contains("vectordb -- pipeline"),
        "the README's two commands"
    );
}

#[test]
fn the_metric_reference_is_the_code_s_catalogue() {
    let reference = std::fs::read_to_string(root().join("docs/observability.md")).unwrap();
    let table = lines_starting(&reference, "| `aura360_");
    let expected: Vec<String> = aura_ops::METRICS
        .iter()
        .map(|m| {
            let kind = format!("{:?}", m.kind).to_lowercase();
            format!("| `{}` | {kind} | {} |", m.name, m.help)
        })
        .collect();
    assert_eq!(
        table,
        expected,
        "docs/observability.md's metric table differs from aura_ops::METRICS; the table it should hold:\n{}",
        expected.join("\n")
    );
    // Every metric the code records is in the catalogue.
    let mut recorded = std::collections::BTreeSet::new();
    let mut stack = vec![root().join("crates"), root().join("handlers")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                if !path.ends_with("tests") && !path.ends_with("benches") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split('"').skip(1).step_by(2) {
                    if piece.starts_with("aura360_")
                        && piece
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                    {
                        recorded.insert(piece.to_owned());
                    }
                }
            }
        }
    }
    let catalogue: Vec<&str> = aura_ops::METRICS.iter().map(|m| m.name).collect();
    for name in &recorded {
        assert!(
            catalogue.contains(&name.as_str()),
            "{name} is recorded but not in aura_ops::METRICS"
        );
    }
}

#[test]
fn every_setting_is_in_the_configuration_reference() {
    let reference = std::fs::read_to_string(root().join("docs/configuration.md")).unwrap();
    let defaults = std::fs::read_to_string(root().join("config/default.toml")).unwrap();
    for line in defaults.lines() {
        let key = line
            .trim_start_matches("# ")
            .split(" =")
            .next()
            .unwrap_or("");
        if !line.contains(" =") || key.contains(' ') || key.is_empty() {
            continue;
        }
        let var = key.to_ascii_uppercase();
        assert!(
            reference.contains(&format!("`{var}`")),
            "{var} (config/default.toml) is not in docs/configuration.md"
        );
        // A row of this variable alone with a single value as its default shows the file's default.
        let Some(value) = line
            .split_once(" =")
            .filter(|_| !line.starts_with('#'))
            .map(|(_, v)| v.split(" #").next().unwrap_or("").trim().trim_matches('"'))
        else {
            continue;
        };
        // An empty default means "unset"; the reference says what that does instead.
        if value.is_empty() {
            continue;
        }
        let row = reference
            .lines()
            .find(|l| l.starts_with(&format!("| `{var}` |")));
        if let Some(row) = row {
            let shown = row.split('|').nth(2).unwrap_or("").trim();
            if shown.starts_with('`') && shown.ends_with('`') && shown.matches('`').count() == 2 {
                assert_eq!(
                    shown.trim_matches('`'),
                    value,
                    "docs/configuration.md shows another default for {var} than config/default.toml"
                );
            }
        }
    }
}

/// The top-level modules each crate's `src/` files belong to, and the other top-level modules they name
/// (`crate::x`), test code left out.
fn module_imports(
    src: &Path,
) -> std::collections::BTreeMap<String, std::collections::BTreeSet<String>> {
    let mut imports = std::collections::BTreeMap::new();
    let mut stack = vec![src.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let relative = path.strip_prefix(src).unwrap();
            let first = relative
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy();
            let module = first.trim_end_matches(".rs").to_owned();
            if path.extension().is_none_or(|e| e != "rs")
                || ["lib", "main", "bin"].contains(&module.as_str())
            {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let named = imports
                .entry(module.clone())
                .or_insert_with(std::collections::BTreeSet::new);
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let mut names: Vec<&str> = Vec::new();
                if let Some(group) = rest.strip_prefix('{') {
                    let group = &group[..group.find('}').unwrap_or(0)];
                    names.extend(
                        group
                            .split(',')
                            .map(|p| p.trim().split("::").next().unwrap_or("")),
                    );
                } else {
                    names.push(
                        rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                            .next()
                            .unwrap_or(""),
                    );
                }
                for name in names {
                    if name.starts_with(|c: char| c.is_ascii_lowercase()) && name != module {
                        named.insert(name.to_owned());
                    }
                }
            }
        }
    }
    imports
}

#[test]
fn no_crate_has_an_import_circle_among_its_modules() {
    let mut crates: Vec<PathBuf> = ["crates", "handlers"]
        .iter()
        .flat_map(|dir| std::fs::read_dir(root().join(dir)).unwrap())
        .map(|e| e.unwrap().path().join("src"))
        .filter(|p| p.is_dir())
        .collect();
    crates.sort();
    assert!(crates.len() >= 10, "{crates:?}");
    for src in crates {
        let imports = module_imports(&src);
        // Depth-first: a module met again while it is on the path closes a circle.
        fn visit(
            module: &str,
            imports: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
            path: &mut Vec<String>,
            done: &mut std::collections::BTreeSet<String>,
        ) -> Option<Vec<String>> {
            if let Some(at) = path.iter().position(|m| m == module) {
                let mut circle = path[at..].to_vec();
                circle.push(module.to_owned());
                return Some(circle);
            }
            if !done.insert(module.to_owned()) {
                return None;
            }
            path.push(module.to_owned());
            for next in imports.get(module).into_iter().flatten() {
                if imports.contains_key(next)
                    && let Some(circle) = visit(next, imports, path, done)
                {
                    return Some(circle);
                }
            }
            path.pop();
            None
        }
        let mut done = std::collections::BTreeSet::new();
        for module in imports.keys() {
            let circle = visit(module, &imports, &mut Vec::new(), &mut done);
            assert!(
                circle.is_none(),
                "{}: {}",
                src.display(),
                circle.unwrap_or_default().join(" → ")
            );
        }
    }
}

/// The lines of `text` that start with `prefix`.
fn lines_starting<'t>(text: &'t str, prefix: &str) -> Vec<&'t str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}
