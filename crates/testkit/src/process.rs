//! Processes under test: their peak memory, their log lines, and a plain HTTP GET of their endpoints.

/// Peak resident memory of process `pid` so far (the kernel's `VmHWM`), in bytes; 0 once it has exited.
pub fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// A plain HTTP/1.1 GET: status and body. (Not every test binary that includes this module serves HTTP.)
pub fn http_get(addr: &str, path: &str) -> (u16, String) {
    try_http_get(addr, path).unwrap_or_else(|| panic!("GET http://{addr}{path} failed"))
}

/// `http_get`, or `None` while nothing answers (the process is still starting).
pub fn try_http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    use std::io::{Read as _, Write as _};
    use std::time::Duration;
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

/// Waits until the log file `log` of process `child` holds `text` at least `times` times; panics if the process
/// exits first or `limit` passes.
pub fn wait_log(
    child: &mut std::process::Child,
    log: &std::path::Path,
    text: &str,
    times: usize,
    limit: std::time::Duration,
) {
    let started = std::time::Instant::now();
    let read = || std::fs::read_to_string(log).unwrap_or_default();
    while read().matches(text).count() < times {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("exited ({status}) before logging {text:?}:\n{}", read());
        }
        assert!(
            started.elapsed() < limit,
            "{text:?} not logged {times} times:\n{}",
            read()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Runs `command` to its end and returns its standard output; panics with its standard error, naming `what`, when
/// it fails.
pub fn stdout_of(command: &mut std::process::Command, what: &str) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        output.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap_or_else(|e| panic!("{what}: output not UTF-8: {e}"))
}

/// Asserts that `what`'s peak RSS (bytes) stayed within `limit_mb`, and prints it (a figure the run's log keeps).
pub fn assert_peak_within(what: &str, peak: u64, limit_mb: u64) {
    let mb = peak / (1024 * 1024);
    assert!(
        peak <= limit_mb * 1024 * 1024,
        "{what}: peak RSS {mb} MB over the {limit_mb} MB goal"
    );
    eprintln!("{what}: peak RSS {mb} MB");
}

/// CPU seconds this process has used (user + system), from /proc/self/stat (Linux; 10 ms resolution).
pub fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of the file (utime, stime) are 12 and 13 after the command name.
    (ticks(11) + ticks(12)) / 100.0
}
