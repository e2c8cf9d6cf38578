//! Looking at the dashboard and `/metrics` as outsiders do: a plain
//! HTTP/1.1 client over TLS that verifies the cluster's CA (and can send
//! what no well-behaved client would), an OpenMetrics parser, and headless
//! Chromium.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

/// An HTTP answer: status and body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends `head` (a request line and headers, without the blank line) to
/// `address` over TLS verified against `ca`, or plain when `ca` is `None`,
/// and reads the whole answer.
pub async fn request(address: SocketAddr, ca: Option<&Path>, head: &str) -> Answer {
    let tcp = TcpStream::connect(address).await.expect("connect");
    let raw = format!("{head}\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    let bytes = match ca {
        None => exchange(tcp, raw.as_bytes()).await,
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
                roots.add(cert.expect("CA certificate")).expect("CA added");
            }
            let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .expect("TLS versions")
                .with_root_certificates(roots)
                .with_no_client_auth();
            let name = ServerName::try_from("127.0.0.1").expect("server name");
            let tls = TlsConnector::from(Arc::new(config))
                .connect(name, tcp)
                .await
                .expect("TLS handshake with the cluster's CA");
            exchange(tls, raw.as_bytes()).await
        }
    };
    parse_answer(&bytes)
}

/// `GET path`, with `Authorization: Bearer token` when given.
pub async fn get(
    address: SocketAddr,
    ca: Option<&Path>,
    path: &str,
    token: Option<&str>,
) -> Answer {
    let auth = token
        .map(|t| format!("\r\nAuthorization: Bearer {t}"))
        .unwrap_or_default();
    request(address, ca, &format!("GET {path} HTTP/1.1{auth}")).await
}

async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, raw: &[u8]) -> Vec<u8> {
    let mut answer = Vec::new();
    let io = async {
        // The server may answer (and close) before it has read everything.
        let _ = stream.write_all(raw).await;
        let _ = stream.read_to_end(&mut answer).await;
    };
    tokio::time::timeout(Duration::from_secs(30), io)
        .await
        .expect("an answer within 30 s");
    answer
}

fn parse_answer(bytes: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let chunked = head
        .lines()
        .any(|l| l.eq_ignore_ascii_case("transfer-encoding: chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Answer { status, body }
}

fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if size == 0 {
            break;
        }
        body.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    body
}

/// One sample of an OpenMetrics exposition.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses OpenMetrics text strictly: every line is a `# HELP`, `# TYPE`,
/// `# UNIT` or a sample, and the last is `# EOF`; anything else panics
/// naming the line.
pub fn parse_openmetrics(text: &str) -> Vec<Sample> {
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.last(), Some(&"# EOF"), "no # EOF at the end");
    let mut samples = Vec::new();
    for (number, line) in lines[..lines.len() - 1].iter().enumerate() {
        if let Some(comment) = line.strip_prefix("# ") {
            let kind = comment.split(' ').next().unwrap_or_default();
            if !matches!(kind, "HELP" | "TYPE" | "UNIT") {
                not_openmetrics(number + 1, line);
            }
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| not_openmetrics(number + 1, line));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| not_openmetrics(number + 1, line));
        let (name, labels) = match series.split_once('{') {
            None => (series, BTreeMap::new()),
            Some((name, rest)) => {
                let inner = rest
                    .strip_suffix('}')
                    .unwrap_or_else(|| not_openmetrics(number + 1, line));
                let mut labels = BTreeMap::new();
                for pair in inner.split(',').filter(|p| !p.is_empty()) {
                    let (key, quoted) = pair
                        .split_once('=')
                        .unwrap_or_else(|| not_openmetrics(number + 1, line));
                    let value = quoted
                        .strip_prefix('"')
                        .and_then(|v| v.strip_suffix('"'))
                        .unwrap_or_else(|| not_openmetrics(number + 1, line));
                    labels.insert(key.to_string(), value.to_string());
                }
                (name, labels)
            }
        };
        let name_ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b':');
        if !name_ok {
            not_openmetrics(number + 1, line);
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    samples
}

fn not_openmetrics(line_number: usize, line: &str) -> ! {
    panic!("line {line_number}: not OpenMetrics: {line:?}")
}

/// The value of `name` with exactly `labels`, if present.
pub fn sample(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples
        .iter()
        .find(|s| s.name == name && s.labels == wanted)
        .map(|s| s.value)
}

/// Debian's Chromium, headless.
fn chromium(args: &[&str], url: &str) -> std::process::Output {
    let binary = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("chromium is not installed: scripts/setup.sh installs Debian's chromium package");
    let profile = tempfile::tempdir().expect("a browser profile directory");
    let output = Command::new(binary)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            // The cluster's CA is not the browser's: the HTTPS client
            // above checks the certificate; this checks what users see.
            "--ignore-certificate-errors",
            "--window-size=1400,1600",
            "--virtual-time-budget=8000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("chromium runs");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The DOM of `url` after its scripts ran, and a screenshot of it saved
/// at `screenshot`.
pub fn render(url: &str, screenshot: &Path) -> String {
    chromium(&[&format!("--screenshot={}", screenshot.display())], url);
    let dom = chromium(&["--dump-dom"], url);
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

/// How many elements of `dom` carry the attribute `attribute="value"`
/// (or the attribute at all, when `value` is `None`).
pub fn count_attribute(dom: &str, attribute: &str, value: Option<&str>) -> usize {
    match value {
        Some(value) => dom.matches(&format!("{attribute}=\"{value}\"")).count(),
        None => dom.matches(&format!(" {attribute}=\"")).count(),
    }
}

/// The `data-points` of the plot named `plot` in `dom`.
pub fn plot_points(dom: &str, plot: &str) -> usize {
    let marker = format!("data-plot=\"{plot}\"");
    let start = dom
        .find(&marker)
        .unwrap_or_else(|| panic!("no plot {plot} on the page"));
    let tag_start = dom[..start].rfind('<').expect("an element");
    let tag = &dom[tag_start..tag_start + dom[tag_start..].find('>').expect("a tag end")];
    let points = tag
        .split("data-points=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap_or_else(|| panic!("plot {plot} has no data-points: {tag}"));
    points.parse().expect("data-points is a number")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_samples_parse_with_labels() {
        let text =
            "# HELP x_total things\n# TYPE x counter\nx_total{state=\"a\",b=\"c\"} 3\ny 0.5\n# EOF";
        let samples = parse_openmetrics(text);
        assert_eq!(
            sample(&samples, "x_total", &[("b", "c"), ("state", "a")]),
            Some(3.0)
        );
        assert_eq!(sample(&samples, "y", &[]), Some(0.5));
    }

    #[test]
    #[should_panic(expected = "not OpenMetrics")]
    fn a_malformed_line_is_refused() {
        parse_openmetrics("x{state=\"a\" 3\n# EOF");
    }

    #[test]
    fn plots_report_their_points() {
        let dom = r#"<div class="p" data-plot="history" data-points="12"><canvas></canvas></div>"#;
        assert_eq!(plot_points(dom, "history"), 12);
        assert_eq!(count_attribute(dom, "data-plot", None), 1);
    }
}
