//! What browsers on the dashboard cost the leader: a secure local cluster
//! (1 coordinator, 2 CPU workers) with a finished ASHA sweep of 200
//! trials, then simulated browsers on the sweep's
//! page, each doing what the page does (GET the sweep and its learning
//! curves every 2 s over one kept-alive HTTPS connection, the next poll
//! only after the last answer):
//!
//! ```text
//!   idle            no browser
//!   one token       N browsers, all with the admin's token (one team)
//!   N tokens        N browsers, each with its own viewer token (no sharing)
//! ```
//!
//! The leader's CPU time comes from /proc/PID/stat over each window, as
//! a share of one core; request latency is per GET. Run through
//! scripts/bench/dashboard.sh.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use ringleader_tests::sweeps::{client, must_finish_sweep, must_submit, BraninSweep};
use ringleader_tests::{must_create_token, TestCluster};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

const POLL: Duration = Duration::from_secs(2);

struct Options {
    browsers: usize,
    window: Duration,
}

fn options() -> Options {
    let mut args = std::env::args().skip(1);
    let browsers = args.next().map_or(20, |a| a.parse().expect("BROWSERS"));
    let seconds = args.next().map_or(60, |a| a.parse().expect("SECONDS"));
    Options {
        browsers,
        window: Duration::from_secs(seconds),
    }
}

fn tls_config(ca: &Path) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA certificate")).expect("CA added");
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One simulated browser tab: polls `paths` until `until`, returns the
/// latency of every GET.
async fn browser(
    address: SocketAddr,
    tls: Arc<ClientConfig>,
    token: String,
    paths: Vec<String>,
    until: Instant,
) -> Vec<Duration> {
    let tcp = TcpStream::connect(address).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let stream = TlsConnector::from(tls)
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("TLS");
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .expect("HTTP/1.1");
    tokio::spawn(connection);
    let mut latencies = Vec::new();
    while Instant::now() < until {
        let poll_started = Instant::now();
        for path in &paths {
            let request = hyper::Request::get(path.as_str())
                .header("host", address.to_string())
                .header("authorization", format!("Bearer {token}"))
                .body(Empty::<Bytes>::new())
                .expect("request");
            let started = Instant::now();
            let response = sender.send_request(request).await.expect("an answer");
            assert_eq!(response.status(), 200, "{path}");
            response.into_body().collect().await.expect("a body");
            latencies.push(started.elapsed());
        }
        tokio::time::sleep_until((poll_started + POLL).into()).await;
    }
    latencies
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat format")
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 (1-based, from the pid).
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / per_second)
}

fn median(mut values: Vec<Duration>) -> Duration {
    values.sort();
    values.get(values.len() / 2).copied().unwrap_or_default()
}

#[tokio::main]
async fn main() {
    let options = options();
    let mut cluster = TestCluster::start(1, 2).await;
    cluster.must_form(Duration::from_secs(60)).await;
    let admin = client(&cluster);
    let spec = BraninSweep::instant_asha(200).spec();
    let sweep = must_submit(&cluster, "sweep.toml", &spec).await;
    must_finish_sweep(&admin, &sweep, Duration::from_secs(600)).await;

    let leader = &mut cluster.cluster.coordinators()[0];
    let pid = leader.process.pid();
    let dashboard = leader.dashboard.expect("a dashboard");
    let tls = tls_config(&cluster.cluster.ca_certificate_path());
    let admin_token = admin.token.expect("secure").reveal();
    let viewers: Vec<String> = (0..options.browsers)
        .map(|i| must_create_token(&cluster, &format!("viewer-{i}"), "viewer").reveal())
        .collect();
    let paths = vec![
        format!("/api/v1/sweeps/{sweep}"),
        format!("/api/v1/sweeps/{sweep}/curves?metric=objective"),
    ];
    println!(
        "leader pid {pid}; sweep {sweep} (200 trials, finished); {} browsers polling {:?} every {POLL:?}; windows of {:?}",
        options.browsers, paths, options.window
    );
    println!(
        "{:<12} {:>12} {:>10} {:>14} {:>14}",
        "scenario", "leader CPU", "% of core", "GETs", "median GET"
    );
    for (name, tokens) in [
        ("idle", Vec::new()),
        ("one token", vec![admin_token.clone(); options.browsers]),
        ("N tokens", viewers.clone()),
    ] {
        let until = Instant::now() + options.window;
        let before = cpu_time(pid);
        let started = Instant::now();
        let tabs: Vec<_> = tokens
            .into_iter()
            .map(|token| tokio::spawn(browser(dashboard, tls.clone(), token, paths.clone(), until)))
            .collect();
        let mut latencies = Vec::new();
        for tab in tabs {
            latencies.extend(tab.await.expect("a browser"));
        }
        if latencies.is_empty() {
            tokio::time::sleep_until(until.into()).await;
        }
        let wall = started.elapsed();
        let used = cpu_time(pid) - before;
        println!(
            "{name:<12} {:>10.2} s {:>9.2}% {:>14} {:>11.1} ms",
            used.as_secs_f64(),
            100.0 * used.as_secs_f64() / wall.as_secs_f64(),
            latencies.len(),
            median(latencies).as_secs_f64() * 1000.0
        );
    }
}
